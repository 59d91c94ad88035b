"""device=: one resolver; CPU requests give the default result; CUDA requests without CUDA are clear errors."""

from __future__ import annotations

import pytest
import torch
from nets import MLP, VGGish, randomize_bn

import modelfold
from modelfold.cli import main
from modelfold.device import DeviceError, resolve_device
from modelfold.errors import ModelFoldError
from modelfold.traced.repair.dir import DIRSettings, synthesize


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_cpu_auto_and_errors(no_cuda, monkeypatch):
    for d in (None, "cpu", " CPU ", torch.device("cpu"), "auto"):
        assert resolve_device(d) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"device='cuda' was asked for.*device='cpu'"):
        resolve_device("cuda")
    assert issubclass(DeviceError, ModelFoldError)
    for bad in ("gpu0", "tpu", 3.5):
        with pytest.raises(DeviceError, match="cpu"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device("auto")
    with pytest.raises(DeviceError, match="1 GPU"):
        resolve_device("cuda:3")


def test_fold_on_cpu_device_equals_default_and_cuda_request_fails_early(no_cuda, tmp_path):
    model = MLP(w=24).eval()
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    ref = modelfold.fold(model, x, ratio=0.5, verify=False)
    cpu = modelfold.fold(model, x, ratio=0.5, device="cpu", verify=False)
    for (n, a), (_, b) in zip(ref.state_dict().items(), cpu.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(DeviceError, match="cuda"):
        modelfold.fold(model, x, ratio=0.5, device="cuda")
    torch.save(model, tmp_path / "m.pt")
    out = tmp_path / "f.pt"
    assert main(["fold", str(tmp_path / "m.pt"), "--input-shape", "1,12", "--ratio", "0.5", "--device", "cuda",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_deepinversion_on_cpu_device_equals_default(no_cuda):
    model = randomize_bn(VGGish()).eval()
    s = DIRSettings(batch=4, iters=3, seed=1)
    a, ha = synthesize(model, (3, 16, 16), s)
    b, hb = synthesize(model, (3, 16, 16), s, device="cpu")
    assert torch.equal(a, b) and ha == hb and a.device.type == "cpu"
    with pytest.raises(DeviceError):
        synthesize(model, (3, 16, 16), s, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_fold_on_cuda_gives_a_cpu_model_of_the_same_shape():
    model = randomize_bn(VGGish()).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = modelfold.fold(model, x, ratio=0.5)
    gpu = modelfold.fold(model, x, ratio=0.5, device="cuda", repair="dir", dir_batch=8, dir_iters=3)
    assert {k: v.shape for k, v in gpu.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(v.device.type == "cpu" for v in gpu.state_dict().values())
