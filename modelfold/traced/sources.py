"""Calibration inputs for traced CNNs: data the model makes itself ("self") or the user's data.

``"self"`` is the DeepInversion batch of Fold-DIR (``repair/dir.py``), synthesized from the original
model alone, seeded and cached on disk. For a network with BatchNorm the batch matches every BN's
running statistics; without BN only DeepInversion's class and image-prior terms remain ("class
impressions"), which docs/calibration-cnn.md measures against plain noise and real data.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..checks import forward
from ..errors import CalibrationError, InputShapeError, ModelFoldError
from .repair.dir import DIRSettings, synthetic_batch
from .repair.stats import BN_TYPES, as_batches

SOURCES = ("self",)
# The default self batch: images x optimisation steps, synthesized with the shorter side at most ``side``
# pixels where the model takes smaller images (fully convolutional); measured in benchmarks/cnn_self_batch.py.
SELF_DEFAULTS = {"batch": 16, "iters": 25, "side": 112}


def default_self_shape(model: nn.Module, example_inputs: torch.Tensor, side: int | None = None) -> tuple[int, ...]:
    """Per-sample shape of the default self batch: that of ``example_inputs``, its image scaled down so
    that the shorter side is ``side`` pixels (default ``SELF_DEFAULTS["side"]``) when the model gives an
    output of the same shape on such an image (fully convolutional models, e.g. with adaptive pooling);
    otherwise the example's shape unchanged (a model with a fixed-size flatten, or not an image)."""
    shape = tuple(example_inputs.shape[1:])
    side = SELF_DEFAULTS["side"] if side is None else side
    if len(shape) != 3 or min(shape[1:]) <= side:
        return shape
    small = (shape[0], *(max(1, round(d * side / min(shape[1:]))) for d in shape[1:]))
    work = copy.deepcopy(model).eval()
    try:
        full = forward(work, example_inputs[:1])
        reduced = forward(work, torch.zeros((1, *small), dtype=example_inputs.dtype))
    except Exception:  # noqa: BLE001 - a model that needs its input size
        return shape
    ok = isinstance(full, torch.Tensor) and isinstance(reduced, torch.Tensor) and full.shape == reduced.shape
    return small if ok else shape


def calibration_batches(calibration: Any, model: nn.Module, example_inputs: Any, seed: int = 0,
                        batch_size: int = 64, max_samples: int | None = 1024, progress: bool = False,
                        self_batch: int | None = None, self_iters: int | None = None,
                        self_shape: tuple[int, ...] | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """(batches, info) for ``calibration``: "self", a tensor of inputs, or a DataLoader of inputs.

    info: ``calibration`` ("self" | "data"), ``samples``, and for "self" the synthesis source
    ("cache" | "synthesized"), seconds, settings and shape. ``self_shape``: per-sample shape of the
    synthetic inputs (default :func:`default_self_shape`: the example's, its image scaled down to a
    shorter side of ``SELF_DEFAULTS["side"]`` pixels for a fully convolutional model). ``progress``: the
    synthesis shows a tqdm bar.
    """
    if isinstance(calibration, str):
        if calibration != "self":
            raise CalibrationError(f"calibration={calibration!r}: use 'self' (inputs the model makes itself), "
                                   "a tensor of inputs, or a DataLoader of (inputs, labels) batches")
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim < 2:
            raise InputShapeError("calibration='self' synthesizes inputs shaped like example_inputs, which must be "
                                  "one batched tensor, e.g. torch.randn(1, 3, 224, 224)")
        settings = DIRSettings(seed=seed, batch=self_batch or SELF_DEFAULTS["batch"],
                               iters=self_iters or SELF_DEFAULTS["iters"])
        has_bn = any(isinstance(m, BN_TYPES) and m.running_mean is not None for m in model.modules())
        info: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-BN warning: documented, reported in info
            shape = tuple(self_shape) if self_shape else default_self_shape(model, example_inputs)
            x = synthetic_batch(model, shape, settings, progress, True, info)
        info = {"calibration": "self", "self_source": info["source"], "self_seconds": round(info["seconds"], 2),
                "self_kind": "deepinversion" if has_bn else "class-impressions", "self_shape": list(shape),
                "self_settings": {k: v for k, v in dataclasses.asdict(settings).items() if k in ("batch", "iters", "seed")}}
        batches = list(x.split(batch_size))
    else:
        try:
            batches = as_batches(calibration, batch_size, max_samples)
        except ModelFoldError as e:
            raise CalibrationError(str(e).replace("repair='data' (Fold-R) needs data=", "calibration= needs")) from e
        ref = example_inputs if isinstance(example_inputs, torch.Tensor) else None
        if ref is not None and (batches[0].ndim != ref.ndim or batches[0].shape[1] != ref.shape[1]
                                or (ref.ndim == 2 and batches[0].shape[1:] != ref.shape[1:])):
            raise InputShapeError(f"calibration inputs have shape {tuple(batches[0].shape[1:])} per sample but "
                                  f"example_inputs has {tuple(ref.shape[1:])}; pass inputs shaped like the model's "
                                  "(the spatial size may differ for a fully convolutional model)")
        info = {"calibration": "data"}
    info["samples"] = int(sum(b.shape[0] for b in batches))
    return batches, info
