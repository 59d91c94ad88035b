"""device= for calibrated compression of transformers, and device-clean code.

No GPU is available to the test suite, so the oracle for "runs on any device" is: with torch's default
device set to ``meta`` every tensor the pipeline creates without naming its device lands on ``meta``
and the first mix with real tensors fails; a device-clean pipeline gives exactly the normal result.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import make_model

import modelfold
from modelfold.device import DeviceError
from modelfold.hf.calib.compress import compress_model

CONFIGS = [dict(ratio=0.3), dict(sparsity=0.1), dict(ratio=0.3, method="fold", targets="all"),
           dict(ratio=0.3, score="obs", targets="all"), dict(sparsity=0.1, targets="all")]


def _ids() -> torch.Tensor:
    return torch.randint(3, 61, (6, 20), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_no_tensor_is_created_on_the_default_device(kw) -> None:
    model = make_model("llama", layers=2)
    ids = _ids()
    ref = compress_model(model, calibration=ids, **kw)
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = compress_model(model, calibration=ids, **kw)
    finally:
        torch.set_default_device(before)
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert b.device.type == "cpu" and torch.equal(a, b), name


def test_the_row_space_refit_is_device_clean() -> None:
    """Fewer calibration rows (2 x 8) than kept MLP neurons: the ridge choice and refit in the row space."""
    model = make_model("llama", layers=2)
    ids = torch.randint(3, 61, (2, 8), generator=torch.Generator().manual_seed(6))
    assert ids.numel() < 0.7 * model.model.layers[0].mlp.down_proj.in_features  # the row-space path
    ref = compress_model(model, ratio=0.3, calibration=ids)
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = compress_model(model, ratio=0.3, calibration=ids)
    finally:
        torch.set_default_device(before)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values(), strict=True))


def test_self_calibration_is_device_clean() -> None:
    model = make_model("llama", layers=2)
    ref = compress_model(model, ratio=0.3, calibration="self", n_calib=2, calib_len=12)
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = compress_model(model, ratio=0.3, calibration="self", n_calib=2, calib_len=12)
    finally:
        torch.set_default_device(before)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values(), strict=True))


def test_device_cpu_equals_default_and_cuda_without_gpu_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = compress_model(model, ratio=0.3, calibration=_ids(), targets="all")
    cpu = compress_model(model, ratio=0.3, calibration=_ids(), targets="all", device="cpu")
    folded = modelfold.fold(model, ratio=0.3, calibration=_ids(), device="cpu")
    assert folded.config.intermediate_size < model.config.intermediate_size
    for (n, a), (_, b) in zip(ref.state_dict().items(), cpu.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(DeviceError, match="cuda"):
        compress_model(model, ratio=0.3, calibration=_ids(), device="cuda")
    with pytest.raises(DeviceError, match="cuda"):
        modelfold.compress(model, ratio=0.3, calibration=_ids(), device="cuda:0")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched


def test_cli_compress_device(tmp_path, capsys, monkeypatch) -> None:
    from modelfold.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = tmp_path / "src"
    make_model("llama", layers=2).save_pretrained(src)
    torch.save(_ids(), tmp_path / "ids.pt")
    args = ["compress", str(src), "--ratio", "0.3", "--calibration", str(tmp_path / "ids.pt"), "--stream", "never"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    a, b = (modelfold.hf.load_pretrained(tmp_path / d).state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main([*args, "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
    assert "cuda" in capsys.readouterr().err and not (tmp_path / "c").exists()
    streamed = ["compress", str(src), "--ratio", "0.3", "--calibration", str(tmp_path / "ids.pt"), "--stream", "always"]
    assert main([*streamed, "--out", str(tmp_path / "d")]) == 0  # layer by layer, on the CPU ...
    assert main([*streamed, "--device", "cpu", "--out", str(tmp_path / "e")]) == 0  # ... the same with --device cpu
    d, e = (modelfold.hf.load_pretrained(tmp_path / x).state_dict() for x in "de")
    assert all(torch.equal(d[k], e[k]) for k in d)
    capsys.readouterr()
    assert main([*streamed, "--device", "cuda", "--out", str(tmp_path / "f")]) == 2  # no GPU: refused, nothing written
    assert "cuda" in capsys.readouterr().err and not (tmp_path / "f").exists()
