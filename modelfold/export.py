"""ONNX export of (folded) models: ``export_onnx(model, example_inputs, path)``.

Folded models are plain ``nn.Module``s with smaller layers, so torch's exporter handles them as
any other; this wrapper adds what the rest of modelfold guarantees: an eval-mode check, an atomic
write (an existing file survives a failed export), the model checked by ``onnx.checker``, and
modelfold errors that say what to install or change. Needs the ``onnx`` extra
(``pip install 'modelfold[onnx]'``: onnx, onnxscript for torch's exporter, onnxruntime to run it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io as _io
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ExportError, ModelModeError
from .io import atomic_write

REQUIRED = ("onnx", "onnxscript")  # torch.onnx.export (torch.export-based) needs both


def _require() -> None:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs the package(s) {', '.join(missing)}, which are not installed; "
                          "install them with: pip install 'modelfold[onnx]' (or pip install onnx onnxscript "
                          "onnxruntime)")


def _inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = False,
                opset: int | None = None) -> Path:
    """Export ``model`` (e.g. a folded CNN) to an ONNX file at ``path``, atomically; returns the path.

    example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, as for ``fold``.
    dynamic_batch: let the first dimension of every tensor input vary (default: the example's shapes).
    opset: ONNX opset version (default: torch's). The file holds the weights inline, so models above
    protobuf's 2 GB limit cannot be written. Raises :class:`modelfold.errors.ExportError`.
    """
    _require()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ModelModeError("the model is in training mode; call model.eval() first (BatchNorm and dropout "
                             "would be exported in their training behaviour)")
    args, kwargs = _inputs(example_inputs)
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))] + list(kwargs)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(tensors) != len(names):
        raise ExportError("example_inputs must be tensors (a tensor, a tuple or a dict of tensors)")
    dynamic = None
    if dynamic_batch:  # one shared batch dimension; torch's exporter takes a structure like the inputs
        batch = torch.export.Dim.DYNAMIC
        dynamic = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)

    def write(tmp: str) -> None:
        import onnx

        log = _io.StringIO()  # the exporter reports its steps on stdout
        try:
            with torch.no_grad(), contextlib.redirect_stdout(log):
                torch.onnx.export(model, args, tmp, kwargs=kwargs or None, input_names=names,
                                  output_names=None, opset_version=opset, dynamic_shapes=dynamic,
                                  external_data=False, verbose=False)
            onnx.checker.check_model(tmp, full_check=True)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside torch's exporter or the checker
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e)[:2000]}. The model must be "
                              "traceable by torch.export; a model above 2 GB cannot be written inline") from e

    return atomic_write(path, write)


__all__ = ["export_onnx"]
