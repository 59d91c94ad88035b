"""Layer-by-layer folding on Ray (executor="ray"): same output as in one process, despite a killed worker.

The Ray driver runs in a child process (``ray_scenarios.py``): Ray ends a driver with ``_exit(1)`` when its
raylet dies, which must not end the test session without a report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import make_model
from ray_scenarios import CLI, DIE_AFTER, FOLD, OUTPUTS, PRUNE
from safetensors.torch import load_file, save_file

from modelfold.cli import main
from modelfold.errors import ModelFoldError
from modelfold.hf.checkpoint import fold_checkpoint, prune_checkpoint
from modelfold.hf.checkpoint.on_ray import KILL_HOOK

pytest.importorskip("ray", reason="ray is not installed (pip install 'modelfold[ray]'; CI installs it)")

KILLED_LAYER = 1
SCRIPT = Path(__file__).with_name("ray_scenarios.py")
RAY_LOGS = Path("/tmp/ray/session_latest/logs")


def _ray_logs(lines: int = 30) -> str:
    """The tails of the last Ray session's raylet, GCS and agent logs (why a driver died)."""
    parts = []
    for name in ("raylet.out", "raylet.err", "gcs_server.err", "dashboard_agent.err", "runtime_env_agent.err"):
        path = RAY_LOGS / name
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no Ray logs under {RAY_LOGS})"


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """Sources, and the work directory and results of the child runs of ray_scenarios.py: a driver killed
    mid-fold, then the scenarios (the killed fold resumed first). Not retried: a death fails the test."""
    root = tmp_path_factory.mktemp("ray")
    src = root / "src"
    make_model("llama", layers=4).save_pretrained(src / "llama", max_shard_size="20KB")
    make_model("qwen2").save_pretrained(src / "qwen2", max_shard_size="20KB")
    make_model("mistral").save_pretrained(src / "nan")
    sd = load_file(str(src / "nan" / "model.safetensors"))
    sd["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(src / "nan" / "model.safetensors"), metadata={"format": "pt"})
    work = root / "work"
    work.mkdir()
    env = {**os.environ, KILL_HOOK: f"{KILLED_LAYER}:{work / 'killed'}"}  # inherited by the Ray workers
    die = subprocess.Popen([sys.executable, str(SCRIPT), "die", str(src), str(work)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = die.communicate(timeout=900)
    try:
        os.killpg(die.pid, signal.SIGKILL)  # what the dead driver's Ray processes left running
    except ProcessLookupError:
        pass
    assert die.returncode == -signal.SIGKILL, f"exit {die.returncode}\n{out[-3000:]}\n{err[-3000:]}\n{_ray_logs()}"
    (work / "killed").unlink(missing_ok=True)  # the worker kill is injected again in the next run
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", str(src), str(work)], env=env, capture_output=True,
                          text=True, timeout=900)
    if not (work / "result.json").is_file():
        pytest.fail(f"the Ray driver died without a result: exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\n"
                    f"stderr: {proc.stderr[-3000:]}\n{_ray_logs()}")
    result = json.loads((work / "result.json").read_text())
    assert "error" not in result, result["error"]
    return src, work, result


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_ray_fold_is_bit_identical_to_one_process_despite_a_killed_worker(ray_run, tmp_path):
    src, work, result = ray_run
    local = fold_checkpoint(src / "llama", tmp_path / "local", **FOLD)
    out = work / "fold_ray"
    assert (work / "killed").is_file()  # the worker folding layer 1 was killed once, and its layer folded again
    _same(out, tmp_path / "local")
    layers = json.loads((out / "config.json").read_text())["modelfold_layers"]
    assert layers[1] != layers[2]
    files = sorted(p.name for p in out.iterdir())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f for f in files if f.endswith(".safetensors")]
    assert not [f for f in files if f.startswith("part-")]  # no leftovers of the killed attempt
    assert result["fold"]["groups"] == [[g.root, g.channels_after] for g in local.groups]
    assert (result["fold"]["params_after"], result["fold"]["executor"]) == (local.params_after, "ray")
    # nothing but the outputs, the kill marker and the result: no temporary directories, no failed output
    assert sorted(p.name for p in work.iterdir()) == sorted([*OUTPUTS, "killed", "result.json"])


def test_a_killed_ray_driver_resumes_to_the_same_bytes(ray_run, tmp_path):
    src, work, result = ray_run
    assert result["resumed_layers"] >= DIE_AFTER  # the layers the dead driver's tasks finished were kept
    files = {p.name: p.read_bytes() for p in sorted((work / "resumed").iterdir())}
    assert files == {p.name: p.read_bytes() for p in sorted((work / "fold_ray").iterdir())}


def test_ray_prune_and_cli_match_one_process(ray_run, tmp_path, capsys):
    src, work, result = ray_run
    prune_checkpoint(src / "qwen2", tmp_path / "local", **PRUNE)
    _same(work / "prune_ray", tmp_path / "local")
    assert result["cli_rc"] == 0
    fold_checkpoint(src / "qwen2", tmp_path / "ref", ratio=float(CLI[1]), progress=False)
    _same(work / "cli_ray", tmp_path / "ref")
    assert main(["fold", str(src / "qwen2"), "--ratio", "0.3", "--out", str(tmp_path / "x"),
                 "--ray-memory", "1GB"]) == 2
    assert "apply to --executor ray" in capsys.readouterr().err


def test_ray_task_errors_reach_the_caller_and_leave_no_output(ray_run, tmp_path):
    src, work, result = ray_run
    name, message = result["nan_error"]
    assert name == "InvalidWeightsError"
    assert "model.layers.2.mlp.down_proj.weight" in message and "NaN" in message
    assert not (work / "nan_out").exists()
    with pytest.raises(ValueError, match="executor"):
        fold_checkpoint(src / "nan", tmp_path / "out", ratio=0.3, progress=False, executor="dask")


def test_executor_ray_without_ray_installed_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_model("llama", layers=1).save_pretrained(src)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ModelFoldError, match=r"pip install 'modelfold\[ray\]'"):
        fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False, executor="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
