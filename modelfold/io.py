"""Loading models named on the command line, and writing outputs atomically."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

ZOO = ("resnet18_fmnist", "vgg11_bn_fmnist")


def _why(e: BaseException) -> str:
    """``Type: first sentence`` of an exception from a file reader (torch's run to many lines)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    first = first.split(". ")[0][:160]
    return f"{type(e).__name__}: {first}" if first else f"{type(e).__name__} (the file ends early)"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step.

    An existing file at ``path`` survives any failure untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """``torch.save`` the whole module atomically (reload with ``torch.load(path, weights_only=False)``)."""
    return atomic_write(path, lambda tmp: torch.save(model, tmp))


def _load_state(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(f"cannot read weights file {path} ({_why(e)}); it is truncated, corrupt or not a "
                              "state_dict: pass a complete one saved with torch.save or safetensors") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model a CLI argument names, in eval mode.

    spec: a modelfold zoo name (resnet18_fmnist, vgg11_bn_fmnist), a torchvision model
    name, a ``torch.save``d full model file, or ``package.module:factory``.
    weights: optional state_dict file (.pt/.pth/.safetensors) loaded into the model.
    """
    path = Path(spec)
    if spec in ZOO:
        from .zoo import load_pretrained

        model = load_pretrained(spec)
    elif path.is_file():
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load model file {path} ({_why(e)}); it is truncated, corrupt or not a "
                                  "model: pass a file written by torch.save(model), or a torchvision name with "
                                  "--weights") from e
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a full nn.Module; if it is a "
                                  "state_dict, pass the architecture as MODEL and this file as --weights")
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise CheckpointError(f"cannot import {spec!r}: {e}") from e
        model = factory()
    else:
        import torchvision

        if spec not in torchvision.models.list_models(module=torchvision.models):
            raise CheckpointError(f"unknown model {spec!r}: not a file, not package.module:factory, and not a "
                                  f"torchvision classification model (see torchvision.models.list_models()) "
                                  f"nor one of {', '.join(ZOO)}")
        model = torchvision.models.get_model(spec, weights=None)
    if weights is not None:
        state = _load_state(Path(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{weights} does not fit {spec}: {e}") from e
    return model.eval()


def default_input_shape(spec: str) -> tuple[int, ...] | None:
    """A sensible example-input shape for known model names (None if unknown)."""
    if spec in ZOO:
        return (1, 1, 32, 32)
    if ":" not in spec and not Path(spec).exists():
        if spec.startswith("inception"):
            return (1, 3, 299, 299)
        return (1, 3, 224, 224)
    return None


def load_inputs(spec: str, limit: int = 1024) -> torch.Tensor:
    """Input tensors for Fold-R from the command line (at most ``limit`` of them).

    ``fmnist`` (the Fashion-MNIST training images, as the shipped models expect them), a
    ``torch.save``d tensor (or (inputs, labels) pair, or a dict with "inputs") in ``.pt``/``.pth``,
    or a NumPy ``.npy`` array.
    """
    if spec == "fmnist":
        from .datasets import fashion_mnist

        return fashion_mnist("train")[0][:limit]
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"data file {path} does not exist; pass a .pt/.pth tensor, a .npy array or 'fmnist'")
    if path.stat().st_size == 0:
        raise CheckpointError(f"data file {path} is empty; pass a tensor of inputs (N, ...) saved with "
                              "torch.save(x, path), a .npy array or 'fmnist'")
    try:
        if path.suffix == ".npy":
            import numpy as np

            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(f"cannot read data file {path} ({_why(e)}); pass a tensor of inputs (N, ...) saved "
                              "with torch.save(x, path), a .npy array (np.save) or 'fmnist'") from None
    if isinstance(obj, dict):
        obj = obj.get("inputs", obj.get("x"))
    elif isinstance(obj, list | tuple) and obj:
        obj = obj[0]
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point() or obj.ndim < 2:
        raise CheckpointError(f"{path} must hold a floating-point tensor of inputs (N, ...) — or an (inputs, "
                              "labels) pair or a dict with 'inputs'")
    if not bool(torch.isfinite(obj).all()):
        raise CheckpointError(f"{path} holds NaN or Inf inputs")
    return obj[:limit].float()
