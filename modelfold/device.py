"""Where modelfold computes: one helper that turns a user's ``device=`` into a ``torch.device``.

Folding reads and returns models on their own device; ``device=`` only says where the heavy steps
run (k-means clustering, DeepInversion, and the steps that later reuse this helper). Results are
moved back, so a model on the CPU stays on the CPU.
"""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N' or 'auto'"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"cpu" -> CPU; "cuda"/"cuda:N" -> that GPU (an error if absent); "auto" -> GPU 0 if any, else CPU."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device={device!r} is not a device; use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"device={device!r}: modelfold runs on {DEVICE_CHOICES}, not {dev.type!r}")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU here")
        raise DeviceError(f"device={device!r} was asked for, but {why}; use device='cpu' (CLI: --device cpu) "
                          "or 'auto' to take a GPU only where there is one")
    count = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise DeviceError(f"device={device!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)
