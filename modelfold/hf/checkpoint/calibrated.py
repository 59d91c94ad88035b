"""Calibrated compression layer by layer, from safetensors shards (checkpoints larger than RAM).

The calibration activations stream from layer to layer beside the weights: a front model (the
embeddings and everything outside the blocks, plus one block that never runs) catches the first
block's inputs; then each block is read from the shards, measured (``budget="auto"``: a first pass
over all blocks), compressed by the same step as in memory (:class:`~modelfold.hf.calib.step.Calibrated`),
run on the activations, written and released. Memory: one block plus the activations. The result
is bit-identical to :func:`~modelfold.hf.calib.compress.compress_model` on the same model loaded whole.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ...checks import check_sparsity
from ...device import resolve_device
from ...report import FoldReport
from ..adapters import Adapter
from ..calib import data as cdata
from ..calib.blocks import BlockInputs, capture
from ..calib.compress import CompressConfig
from ..calib.layer import CalibOptions
from ..calib.sensitivity import PROBE_SHAPE, Sensitivity
from ..calib.step import Calibrated
from .run import run_checkpoint
from .source import Source, load_layer, release_layer, trim_heap


def _to(x: Any, dev: torch.device) -> Any:
    """``x`` with every tensor inside (tuples, lists, dicts: a block's keyword arguments) on ``dev``."""
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, tuple | list):
        return type(x)(_to(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


def inputs_to(inputs: BlockInputs, dev: torch.device) -> BlockInputs:
    """The activations and keyword arguments that flow between blocks, on ``dev`` (the same objects on their own device)."""
    return BlockInputs([x.to(dev) for x in inputs.xs], [_to(kw, dev) for kw in inputs.kwargs])


class OnDevice(Calibrated):
    """The calibrated step with the block and its calibration activations on ``device``; everything else
    (the other blocks, the shards) stays on the CPU or disk, and the compressed block comes back to the
    CPU to be written. On the CPU the moves are no-ops: the same code path as without a device."""

    def __init__(self, ids: torch.Tensor, opts: CalibOptions, device: torch.device) -> None:
        super().__init__(ids, opts)
        self.device = device

    def __call__(self, work: nn.Module, adapter: Adapter, i: int, p: dict[str, float]) -> list:
        adapter.layers(work)[i].to(self.device)
        try:
            return super().__call__(work, adapter, i, p)
        finally:
            adapter.layers(work)[i].to("cpu")

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        super().restore({k: v.to(self.device) for k, v in state.items()})


def _front(ctx: Source) -> nn.Module:
    """The model with a single block, on CPU, holding the checkpoint's non-block tensors."""
    from ..io import model_class

    config = copy.deepcopy(ctx.model.config)
    config.num_hidden_layers = 1
    for attr in ("layer_types", "modelfold_layers"):
        if isinstance(getattr(config, attr, None), list):
            setattr(config, attr, getattr(config, attr)[:1])
    cls = model_class(config)
    build = getattr(cls, "_from_config", None) or cls.from_config
    dtype = next((ctx.reader.get(k).dtype for k in ctx.rest if ctx.reader.get(k).is_floating_point()), None)
    with torch.device("cpu"):  # also under another default device: the front (and its rotary tables) runs here
        front = build(config, dtype=dtype) if dtype is not None else build(config)
    from ..convert import to_model

    front.load_state_dict(to_model(front, {k: ctx.reader.get(k) for k in ctx.rest}), strict=False, assign=True)
    ctx.reader.release()
    return front.eval()


def _full_model(src: Any) -> nn.Module:
    from ..io import load_any

    return load_any(src)


def compress_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None = None, *,
                        sparsity: float | None = None, calibration: Any = "self", tokenizer: Any = None,
                        method: str = "select", score: str = "act", compensate: str = "ls", budget: str = "auto",
                        targets: str | Iterable[str] = "mlp", skip_first: int = 0, skip_last: int = 0,
                        n_calib: int | None = None, calib_len: int | None = None, lam: float | str = "auto",
                        feedback: bool = False, weighting: str = "token", seed: int = 0,
                        n_init: int = 3, attention_mode: str = "auto", max_ratio: float = 0.8,
                        max_shard_size: int | str = "2GB", progress: bool = True,
                        round_to: int | None = None, verify: bool = True,
                        device: str | torch.device | None = None) -> FoldReport:
    """:func:`~modelfold.hf.calib.compress.compress_model` + save, one block in memory at a time.

    ``calibration="self"`` for a causal LM samples the text from the whole model first (loaded
    memory-mapped; cached on disk, so later runs skip it); token ids or texts need no full load.
    ``device`` ("cpu", "cuda", "cuda:N", "auto"): where the current block and the calibration
    activations live while it is measured and compressed (the embeddings, the other blocks and the
    self-sampling stay on the CPU); default the CPU, by the same code.
    """
    cfg = CompressConfig(ratio=ratio, sparsity=sparsity, calibration=calibration, tokenizer=tokenizer,
                         method=method, score=score, compensate=compensate, budget=budget, targets=targets,
                         skip_first=skip_first, skip_last=skip_last, n_calib=n_calib, calib_len=calib_len, lam=lam,
                         feedback=feedback, weighting=weighting, seed=seed, n_init=n_init,
                         attention_mode=attention_mode, max_ratio=max_ratio, round_to=round_to)
    return compress_checkpoint_with(src, dst, cfg, max_shard_size=max_shard_size, progress=progress, verify=verify,
                                    device=device)


def compress_checkpoint_with(src: str | os.PathLike, dst: str | os.PathLike, cfg: CompressConfig, *,
                             max_shard_size: int | str = "2GB", progress: bool = True, verify: bool = True,
                             device: str | torch.device | None = None) -> FoldReport:
    """:func:`compress_checkpoint` with its options as one :class:`~modelfold.hf.calib.compress.CompressConfig`."""
    check_sparsity(cfg.sparsity, cfg.ratio)  # before any file is read
    dev = resolve_device(device)
    opts = cfg.options()
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    fn = OnDevice(torch.empty(0, dtype=torch.long, device="cpu"), opts, dev)

    def prepare(ctx: Source) -> Any:
        ctx.adapter.check_heads(cfg.ratio, cfg.targets)  # before the calibration data are made
        sampled = cfg.self_made and cfg.calibration == "self" and cdata.is_causal_lm(ctx.model)
        if sampled:  # the whole model samples, and is gone before the front is built: peak max(), not sum
            whole = _full_model(ctx.path)
            ids = cfg.ids(whole, progress, info)
            del whole
            gc.collect()
            trim_heap()
        front = _front(ctx)
        if not sampled:
            ids = cfg.ids(front, progress, info)
        info.update(calibration="self" if cfg.self_made else "data",
                    calibration_tokens=int(ids.numel()), calibration_seconds=round(time.perf_counter() - t0, 2))
        with torch.no_grad():
            start = inputs_to(capture(front, ctx.adapter, ids), dev)
            probe_ref = inputs_to(capture(front, ctx.adapter, ids[:PROBE_SHAPE[0], :PROBE_SHAPE[1]]), dev)
        del front
        plan = None
        t_sens = time.perf_counter()
        if cfg.auto:
            sens = Sensitivity(opts, cfg.targets, cfg.max_ratio)
            sens.inputs = start
            sens.ref = probe_ref if sens.probe else None
            n = len(ctx.per_layer)
            with torch.no_grad():
                for i in tqdm(range(n), desc="measuring sensitivity", disable=not progress, leave=False):
                    load_layer(ctx, i)
                    ctx.adapter.layers(ctx.model)[i].to(dev)
                    sens.step(ctx.model, ctx.adapter, i)
                    release_layer(ctx, i)
            plan = sens.plan(cfg.sparsity * ctx.reader.numel())
            info["sensitivity_seconds"] = round(time.perf_counter() - t_sens, 2)
        fn.inputs, fn.ids = start, ids  # ids: the fingerprint of a resumable run
        return plan

    report = run_checkpoint(src, dst, cfg.ratio, cfg.name, {"round_to": cfg.round_to}, targets=cfg.targets,
                            skip_first=cfg.skip_first, skip_last=cfg.skip_last, repair="calibrated",
                            max_shard_size=max_shard_size, progress=progress, sparsity=cfg.sparsity,
                            attention_mode=cfg.attention_mode, executor="local", ray_address=None,
                            ray_options=None, layer_fn=fn, prepare=prepare, verify=verify)
    info["plan"] = {g.root: g.channels_after for g in report.groups}
    report.repair_info = info
    report.seconds = time.perf_counter() - t0
    return report
