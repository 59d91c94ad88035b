"""Fold-DIR: DeepInversion REPAIR (paper §5; Yin et al., "Dreaming to Distill", CVPR 2020).

A batch of inputs is synthesized from the ORIGINAL model alone: random inputs are optimized
(Adam, cosine-decayed learning rate) so that the batch mean/variance entering every
BatchNorm layer match that layer's running statistics, plus cross-entropy towards
class-balanced targets and total-variation / L2 priors, under random jitter and flips.
The folded model's statistics are then restored on those inputs exactly like Fold-R
(BN reset, REPAIR correction for folded groups without BN). Batches are cached per
model hash and settings under ``$MODELFOLD_CACHE/dir`` (default ``~/.cache/modelfold/dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import cache as caches
from ...checks import forward
from ...device import resolve_device
from ...errors import InputShapeError
from ..engine import Planner
from . import Repair, RepairError
from .stats import BN_TYPES, PlanLog

CACHE_VERSION = 1


@dataclass(frozen=True)
class DIRSettings:
    """DeepInversion budget and loss weights (default budget: see docs/repair.md for timings)."""

    batch: int = 128
    iters: int = 100
    lr: float = 0.25
    seed: int = 0
    bn_weight: float = 1.0
    first_bn_weight: float = 10.0  # the first BN sees raw image statistics (as in DeepInversion)
    ce_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-5
    jitter: int = 2
    flip: bool = True


def cache_dir() -> Path:
    """Where DeepInversion batches are cached (``modelfold.cache.cache_dir("dir")``)."""
    return caches.cache_dir("dir")


def _bn_losses(model: nn.Module) -> tuple[list[torch.Tensor], list[Any]]:
    losses: list[torch.Tensor] = []
    handles = []

    def hook(mod: nn.modules.batchnorm._BatchNorm, inp: Any) -> None:
        x = inp[0]
        dims = [d for d in range(x.ndim) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        losses.append(torch.linalg.vector_norm(mean - mod.running_mean)
                      + torch.linalg.vector_norm(var - mod.running_var))

    for m in model.modules():
        if isinstance(m, BN_TYPES) and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(hook))
    return losses, handles


def _tv(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 3:
        return x.new_zeros(())
    return sum(((x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)) ** 2).mean()
               for d in range(2, x.ndim))


def synthesize(model: nn.Module, input_shape: tuple[int, ...], settings: DIRSettings = DIRSettings(),
               progress: bool = False, device: str | torch.device | None = None) -> tuple[torch.Tensor, list[float]]:
    """DeepInversion: (batch, *input_shape) inputs whose BN statistics match ``model``'s.

    Runs on ``device`` (a copy of the model goes there; ``model`` is not moved). Returns the inputs
    (on the CPU) and the per-step BN-matching loss (sum over BN layers).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _synthesize(model, input_shape, settings, progress, resolve_device(device))


def _synthesize(model: nn.Module, input_shape: tuple[int, ...], settings: DIRSettings,
                progress: bool, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    work = _frozen_copy(model).to(device)
    gen = torch.Generator().manual_seed(settings.seed)  # random draws on the CPU: the same on every device
    x = torch.randn((settings.batch, *input_shape), generator=gen).to(device).requires_grad_(True)
    with torch.no_grad():
        n_cls = forward(work, x[:1]).shape[-1]
    targets = (torch.arange(settings.batch) % n_cls)[torch.randperm(settings.batch, generator=gen)].to(device)
    opt = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9), eps=1e-8)
    losses, handles = _bn_losses(work)
    if not handles:
        warnings.warn("Fold-DIR: the model has no BatchNorm; DeepInversion only has its class and prior "
                      "terms, so the synthetic inputs carry little statistical information", stacklevel=2)
    history: list[float] = []
    spatial = list(range(2, x.ndim))
    bar = tqdm(range(settings.iters), desc="DeepInversion", disable=not progress, leave=False)
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.iters))
            inp = x
            if spatial and settings.jitter:
                shifts = torch.randint(-settings.jitter, settings.jitter + 1, (len(spatial),), generator=gen)
                inp = torch.roll(inp, [int(s) for s in shifts], spatial)
            if len(spatial) == 2 and settings.flip and bool(torch.rand((), generator=gen) < 0.5):
                inp = inp.flip(3)
            losses.clear()
            out = work(inp)
            bn = sum(w * v for w, v in zip([settings.first_bn_weight] + [1.0] * len(losses), losses,
                                           strict=False)) if losses else out.new_zeros(())
            loss = (settings.bn_weight * bn + settings.ce_weight * F.cross_entropy(out, targets)
                    + settings.tv_weight * _tv(inp) + settings.l2_weight * inp.pow(2).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(sum(float(v.detach()) for v in losses)))
            bar.set_postfix(bn=f"{history[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return x.detach().cpu(), history


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def synthetic_batch(model: nn.Module, input_shape: tuple[int, ...], settings: DIRSettings,
                    progress: bool = False, use_cache: bool = True, info: dict[str, Any] | None = None,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """:func:`synthesize`, cached on disk per (model hash, input shape, settings, device type).

    ``info`` (if given) receives ``source`` ("cache" or "synthesized") and ``seconds``.
    """
    info = {} if info is None else info
    t0 = time.perf_counter()
    device = resolve_device(device)
    meta = {"v": CACHE_VERSION, "shape": list(input_shape), **dataclasses.asdict(settings)}
    if device.type != "cpu":  # GPU arithmetic differs in the last bits: its batches are cached apart
        meta["device"] = device.type
    key = hashlib.sha256((caches.model_hash(model) + json.dumps(meta, sort_keys=True)).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.pt"
    if use_cache and path.is_file():
        try:
            x = torch.load(path, weights_only=True)["x"]
            info.update(source="cache", seconds=time.perf_counter() - t0)
            return x
        except Exception:  # noqa: BLE001 - a corrupt cache entry is regenerated
            pass
    x, history = synthesize(model, input_shape, settings, progress, device)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"x": x, "bn_loss": torch.tensor(history), "meta": json.dumps(meta)}, tmp)
        tmp.replace(path)
    info.update(source="synthesized", seconds=time.perf_counter() - t0)
    return x


class FoldDIR(Repair):
    """Fold-DIR: restore the folded model's statistics on DeepInversion inputs (no real data)."""

    name = "dir"

    def __init__(self, original: nn.Module, input_shape: tuple[int, ...], settings: DIRSettings,
                 progress: bool = False, use_cache: bool = True, device: torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.original = original
        self.input_shape = input_shape
        self.settings = settings
        self.progress = progress
        self.use_cache = use_cache
        self.log = PlanLog()
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_kwargs(cls, model: nn.Module | None = None, example_inputs: Any = None, seed: int = 0,
                    progress: bool = False, dir_batch: int | None = None, dir_iters: int | None = None,
                    dir_lr: float | None = None, dir_settings: DIRSettings | None = None,
                    dir_cache: bool = True, device: str | torch.device | None = None, **kwargs: Any) -> FoldDIR:
        from .data import reject_options

        reject_options(kwargs, "dir")
        if model is None:
            raise RepairError("repair='dir' needs the original model")
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim < 2:
            raise InputShapeError("repair='dir' synthesizes inputs shaped like example_inputs, which must be "
                                  "one batched tensor, e.g. torch.randn(1, 1, 32, 32)")
        s = dir_settings or DIRSettings(seed=seed)
        over = {k: v for k, v in (("batch", dir_batch), ("iters", dir_iters), ("lr", dir_lr)) if v is not None}
        if any((not isinstance(v, int | float)) or v <= 0 for v in over.values()):
            raise RepairError(f"dir_batch/dir_iters/dir_lr must be positive, got {over}")
        s = dataclasses.replace(s, **over)
        return cls(model, tuple(example_inputs.shape[1:]), s, progress, dir_cache, device)

    def wrap(self, planner: Planner) -> Planner:
        return self.log.wrap(planner)

    def after(self, model: nn.Module) -> nn.Module:
        from .data import restore_statistics

        info: dict[str, Any] = {}
        x = synthetic_batch(self.original, self.input_shape, self.settings, self.progress, self.use_cache, info,
                            self.device)
        self.summary = {"dir_batch": info["source"], "dir_seconds": round(info["seconds"], 2),
                        **restore_statistics(model, self.original, self.log, list(x.split(256)))}
        return model
