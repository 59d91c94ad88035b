"""device= for transformers folds (in memory and layer by layer): CPU equals the default, CUDA fails clearly."""

from __future__ import annotations

import pytest
import torch
from hf_models import make_model

import modelfold.hf as mh
from modelfold.cli import main
from modelfold.device import DeviceError
from modelfold.hf.checkpoint import fold_checkpoint


def test_hf_fold_device_cpu_equals_default_and_cuda_without_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model("llama")
    ref = mh.fold_model(model, ratio=0.5, targets="all")
    cpu = mh.fold_model(model, ratio=0.5, targets="all", device="cpu")
    for (n, a), (_, b) in zip(ref.state_dict().items(), cpu.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(DeviceError, match="cuda"):
        mh.fold_model(model, ratio=0.5, device="cuda")
    src = tmp_path / "src"
    model.save_pretrained(src)
    fold_checkpoint(src, tmp_path / "a", ratio=0.5, targets="all", progress=False)
    fold_checkpoint(src, tmp_path / "b", ratio=0.5, targets="all", progress=False, device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(DeviceError, match="cuda"):
        fold_checkpoint(src, tmp_path / "c", ratio=0.5, progress=False, device="cuda:0")
    assert main(["fold", str(src), "--ratio", "0.5", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
