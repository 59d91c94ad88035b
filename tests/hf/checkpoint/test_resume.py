"""Layer-by-layer runs that die continue where they stopped, and write the bytes an uninterrupted run writes.

The driver process is SIGKILLed in the middle of a run (``die_midway.py``: no clean-up, a shard write in
flight); the same call made again resumes behind the shards the dead run closed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import VOCAB, make_model

from modelfold.errors import CheckpointError, InvalidWeightsError
from modelfold.hf.checkpoint import compress_checkpoint, fold_checkpoint, prune_checkpoint
from modelfold.hf.checkpoint.resume import partial_path

SCRIPT = Path(__file__).with_name("die_midway.py")
LAYERS = 6
IDS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
CALLS = {"fold": fold_checkpoint, "prune": prune_checkpoint, "compress": compress_checkpoint}
CASES = {  # small shards: layers straddle shard boundaries, so a resume starts inside a layer
    "fold": {"ratio": {0: 0.25, 1: 0.5, 3: {"mlp": 0.5, "attention": 0.5}, 5: 0.3}, "max_shard_size": "12KB",
             "seed": 1},
    "prune": {"ratio": 0.5, "targets": "all", "max_shard_size": "12KB"},
    "compress": {"sparsity": 0.2, "calibration": IDS.tolist(), "max_shard_size": "12KB", "feedback": True},
}


def _src(tmp_path: Path, family: str = "llama") -> Path:
    src = tmp_path / "src"
    make_model(family, layers=LAYERS).save_pretrained(src, max_shard_size="20KB")
    return src


def _kwargs(call: str) -> dict:
    kw = dict(CASES[call], progress=False)
    if "calibration" in kw:
        kw["calibration"] = IDS
    return kw


def _die(src: Path, dst: Path, call: str, die_at: int) -> None:
    spec = {"call": call, "src": str(src), "dst": str(dst), "kwargs": dict(CASES[call], progress=False),
            "die_at": die_at}
    (dst.parent / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(dst.parent / "spec.json")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("call", ["fold", "prune", "compress"])
def test_a_killed_run_resumes_to_the_same_bytes(call, tmp_path, capsys):
    src = _src(tmp_path)
    ref = CALLS[call](src, tmp_path / "ref", **_kwargs(call))
    dst = tmp_path / "out"
    _die(src, dst, call, die_at=4)
    part = partial_path(dst)
    assert not dst.exists() and part.is_dir()  # nothing at the output path; the work done is kept
    assert json.loads((part / "progress.json").read_text())["first"] >= 2  # shards of >= 1 layer were closed
    rep = CALLS[call](src, dst, **{**_kwargs(call), "progress": True})
    assert "resumed: " in capsys.readouterr().err  # the progress bar says so
    assert rep.info["resumed_layers"] >= 1
    assert _files(dst) == _files(tmp_path / "ref")  # byte for byte
    assert [(g.root, g.channels_after) for g in rep.groups] == [(g.root, g.channels_after) for g in ref.groups]
    assert rep.params_after == ref.params_after
    assert not part.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref", "spec.json", "src"]


def test_a_run_with_other_settings_refuses_the_partial_output(tmp_path):
    src = _src(tmp_path)
    dst = tmp_path / "out"
    _die(src, dst, "fold", die_at=3)
    part = partial_path(dst)
    before = _files(part)
    with pytest.raises(CheckpointError, match=r"differs in: .*plan.*delete .*\.out\.partial"):
        fold_checkpoint(src, dst, **{**_kwargs("fold"), "ratio": 0.3})
    with pytest.raises(CheckpointError, match="differs in: max_shard_bytes"):
        fold_checkpoint(src, dst, **{**_kwargs("fold"), "max_shard_size": "40KB"})
    with pytest.raises(CheckpointError, match="differs in: executor"):
        pytest.importorskip("ray")
        fold_checkpoint(src, dst, **{**_kwargs("fold"), "executor": "ray"})
    assert _files(part) == before and not dst.exists()  # refused before anything was touched
    fold_checkpoint(src, dst, **_kwargs("fold"))  # the original command still resumes it
    assert not part.exists() and (dst / "config.json").is_file()


def test_interrupt_keeps_the_work_and_bad_input_leaves_nothing(tmp_path, monkeypatch):
    import modelfold.hf.checkpoint.layers as layers

    src = _src(tmp_path)
    fold_one = layers.fold_one

    def interrupted(source, plan, layer_fn, i, sd, groups):
        if i == 3:
            raise KeyboardInterrupt
        return fold_one(source, plan, layer_fn, i, sd, groups)

    monkeypatch.setattr(layers, "fold_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fold_checkpoint(src, tmp_path / "out", **_kwargs("fold"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "src"]  # kept for the rerun
    monkeypatch.setattr(layers, "fold_one", fold_one)
    rep = fold_checkpoint(src, tmp_path / "out", **_kwargs("fold"))
    assert rep.info["resumed_layers"] >= 1
    fold_checkpoint(src, tmp_path / "ref", **_kwargs("fold"))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    make_model("llama", layers=LAYERS).save_pretrained(bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.4.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidWeightsError, match="layers.4.mlp.down_proj"):
        fold_checkpoint(bad, tmp_path / "bad_out", **_kwargs("fold"))
    assert not (tmp_path / "bad_out").exists() and not partial_path(tmp_path / "bad_out").exists()
