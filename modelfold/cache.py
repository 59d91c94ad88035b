"""Where modelfold caches what it makes (DeepInversion batches, self-made calibration text), and model keys.

``$MODELFOLD_CACHE`` if set, else ``~/.cache/modelfold``; one folder per kind. A cached file is keyed by
:func:`model_hash` of the model it was made from and the settings that made it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

SAMPLE = 4096  # values hashed per tensor by a sampled hash


def cache_dir(kind: str) -> Path:
    """``$MODELFOLD_CACHE/<kind>`` if the variable is set, else ``~/.cache/modelfold/<kind>``."""
    root = os.environ.get("MODELFOLD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "modelfold") / kind


def model_hash(model: nn.Module, sampled: bool = False) -> str:
    """SHA-256 of the state_dict: names, dtypes, shapes and every byte; ``sampled``: a strided sample of
    about ``SAMPLE`` values per tensor instead (cheap for billion-parameter models; 24 hex digits)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if sampled:
            flat = t.reshape(-1)
            h.update(flat[::max(1, flat.numel() // SAMPLE)].float().cpu().numpy().tobytes())
        elif t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24] if sampled else h.hexdigest()
