"""ONNX export of folded CNNs: same outputs in onnxruntime, atomic writes, clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from nets import ResNetish, randomize_bn

import modelfold
from modelfold.errors import ExportError, ModelModeError


def _folded() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(16)).eval()
    x = torch.randn(2, 3, 16, 16)
    return modelfold.fold(model, x, ratio=0.5, round_to=8), x


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_folded_resnet_runs_the_same_in_onnxruntime(tmp_path, dynamic_batch) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    folded, x = _folded()
    path = modelfold.export_onnx(folded, x, tmp_path / "folded.onnx", dynamic_batch=dynamic_batch)
    assert path == tmp_path / "folded.onnx" and [p.name for p in tmp_path.iterdir()] == ["folded.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    batches = [x, torch.randn(5, 3, 16, 16)] if dynamic_batch else [x]
    for xb in batches:
        got = session.run(None, {"input": xb.numpy()})[0]
        with torch.no_grad():
            want = folded(xb).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_a_failed_export_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnx")
    folded, x = _folded()
    old = tmp_path / "m.onnx"
    old.write_bytes(b"previous export")

    def boom(*args, **kwargs):
        with open(args[2], "wb") as f:
            f.write(b"partial")
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError, match="ONNX export failed: RuntimeError: unsupported operator"):
        modelfold.export_onnx(folded, x, old)
    assert old.read_bytes() == b"previous export" and list(tmp_path.iterdir()) == [old]


def test_missing_onnx_and_training_mode_give_modelfold_errors(tmp_path, monkeypatch) -> None:
    folded, x = _folded()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ExportError, match=r"pip install 'modelfold\[onnx\]'"):
        modelfold.export_onnx(folded, x, tmp_path / "m.onnx")
    monkeypatch.undo()
    if importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None:
        with pytest.raises(ModelModeError, match="eval"):
            modelfold.export_onnx(folded.train(), x, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
