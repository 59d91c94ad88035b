"""Layer-by-layer folding on Ray (executor="ray"): same output as in one process, despite a killed worker."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hf_models import make_model
from safetensors.torch import load_file, save_file

from modelfold.cli import main
from modelfold.errors import InvalidWeightsError, ModelFoldError
from modelfold.hf.distributed import KILL_HOOK
from modelfold.hf.stream import fold_checkpoint, prune_checkpoint

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'modelfold[ray]'; CI installs it)")

KILLED_LAYER = 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local 2-CPU Ray cluster for the module; its workers kill themselves once at layer 1."""
    marker = tmp_path_factory.mktemp("ray") / "killed"
    old = os.environ.get(KILL_HOOK)
    os.environ[KILL_HOOK] = f"{KILLED_LAYER}:{marker}"  # inherited by the workers ray.init starts
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(KILL_HOOK, None)
        else:
            os.environ[KILL_HOOK] = old


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


def test_ray_fold_is_bit_identical_to_one_process_despite_a_killed_worker(cluster, tmp_path):
    src = tmp_path / "src"
    make_model("llama", layers=4).save_pretrained(src, max_shard_size="20KB")
    plan = {0: 0.25, 1: {"mlp": 0.5, "attention": 0.5}, 3: 0.5}  # non-uniform: sizes recorded in the config
    local = fold_checkpoint(src, tmp_path / "local", ratio=plan, max_shard_size="30KB", progress=False)
    dist = fold_checkpoint(src, tmp_path / "ray", ratio=plan, max_shard_size="30KB", progress=False,
                           executor="ray")
    assert cluster.is_file()  # the worker folding layer 1 was killed once, and its layer was folded again
    _same(tmp_path / "ray", tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "config.json").read_text())["modelfold_layers"][1] != \
        json.loads((tmp_path / "ray" / "config.json").read_text())["modelfold_layers"][2]
    files = sorted(p.name for p in (tmp_path / "ray").iterdir())
    index = json.loads((tmp_path / "ray" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f for f in files if f.endswith(".safetensors")]
    assert not [f for f in files if f.startswith("part-")]  # no leftovers of the killed attempt
    assert [(g.root, g.channels_after) for g in dist.groups] == [(g.root, g.channels_after) for g in local.groups]
    assert (dist.params_after, dist.info["executor"]) == (local.params_after, "ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray", "src"]  # no temporary directories


def test_ray_prune_and_cli_match_one_process(cluster, tmp_path, capsys):
    src = tmp_path / "src"
    make_model("qwen2").save_pretrained(src, max_shard_size="20KB")
    prune_checkpoint(src, tmp_path / "local", ratio=0.5, norm=1, targets="all", progress=False)
    prune_checkpoint(src, tmp_path / "ray", ratio=0.5, norm=1, targets="all", progress=False, executor="ray")
    _same(tmp_path / "ray", tmp_path / "local")
    assert main(["fold", str(src), "--ratio", "0.3", "--out", str(tmp_path / "cli"), "--executor", "ray",
                 "--ray-cpus", "1", "--ray-memory", "200MB"]) == 0
    assert main(["fold", str(src), "--ratio", "0.3", "--out", str(tmp_path / "x"), "--ray-memory", "1GB"]) == 2
    assert "apply to --executor ray" in capsys.readouterr().err
    fold_checkpoint(src, tmp_path / "ref", ratio=0.3, progress=False)
    _same(tmp_path / "cli", tmp_path / "ref")


def test_ray_task_errors_reach_the_caller_and_leave_no_output(cluster, tmp_path):
    src = tmp_path / "src"
    make_model("mistral").save_pretrained(src)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidWeightsError, match="model.layers.2.mlp.down_proj.weight.*NaN"):
        fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False, executor="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ValueError, match="executor"):
        fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False, executor="dask")


def test_executor_ray_without_ray_installed_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_model("llama", layers=1).save_pretrained(src)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ModelFoldError, match=r"pip install 'modelfold\[ray\]'"):
        fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False, executor="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
