"""Fold a transformers checkpoint that does not fit in RAM: one layer at a time, shard to shard.

The model is built on the ``meta`` device from ``config.json`` (no memory), so the family adapter
can name every projection. Then, for each decoder/encoder layer, only that layer's tensors are
read from the memory-mapped safetensors shards, folded by the very step ``fold_model`` uses
(``core.fold_layer_fn``), written to the output shards and released. Embeddings, norms and the
LM head are copied through tensor by tensor. Reading the next layer and writing the previous one
run in two threads while the current one folds. Peak memory is about three layers' tensors plus
the folding temporaries of one, whatever the size of the checkpoint or of the output shards.
With ``executor="ray"`` the layers are folded by Ray tasks (``on_ray``). Runs are resumable (``resume``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...checks import check_round_to
from ...errors import CheckpointError
from ...report import FoldReport
from ..model import LayerFn, record_sizes, resolve_ratio, width_info
from ..plan import make_plan
from .layers import fold_layers, layer_fn_for
from .resume import fingerprint, resumable_dir
from .shards import ShardWriter, parse_size
from .source import Source, copy_extras, open_source

EXECUTORS = ("local", "ray")


def run_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None, method: str,
            options: dict, *, targets: str | Iterable[str], skip_first: int, skip_last: int,
            repair: str, max_shard_size: int | str, progress: bool, sparsity: float | None,
            attention_mode: str, executor: str, ray_address: str | None, ray_options: Mapping | None,
            layer_fn: LayerFn | None = None, prepare: Callable[[Source], Any] | None = None,
            verify: bool = True) -> FoldReport:
    t0, cpu0 = time.perf_counter(), time.process_time()
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of {EXECUTORS}: 'local' folds in this process, "
                         "'ray' spreads the layers over a Ray cluster")
    # check the options before any file is touched; Ray workers resolve the device themselves
    if layer_fn is None:
        layer_fn = layer_fn_for(method, {**options, "device": None} if executor == "ray" and "device" in options
                                else options)
    elif executor != "local":
        raise ValueError("this compression runs its layers in order (calibration activations flow from layer "
                         "to layer); use executor='local'")
    src_p, dst_p = Path(src).resolve(), Path(dst).resolve()
    if dst_p == src_p or src_p in dst_p.parents:
        raise CheckpointError(f"the output {dst_p} must be outside the input checkpoint {src_p}; "
                              "choose another output directory (the input is never overwritten)")
    max_bytes = parse_size(max_shard_size)
    source = open_source(src_p)
    source.verify = verify
    model, adapter = source.model, source.adapter
    n_layers = len(source.prefixes)
    if prepare is not None:  # e.g. calibration: may measure the layers first and return a per-layer plan
        override = prepare(source)
        if override is not None:
            ratio, sparsity, skip_first, skip_last = override, None, 0, 0
    round_to = check_round_to(options.get("round_to"))
    ratio = resolve_ratio(model, adapter, ratio, sparsity, targets=targets, skip_first=skip_first,
                          skip_last=skip_last, attention_mode=attention_mode, round_to=round_to)
    plan = make_plan(ratio, n_layers, targets, skip_first, skip_last)
    fp = fingerprint(src_p, method, plan, {**options, **getattr(layer_fn, "fingerprint", dict)()}, max_bytes,
                     executor)
    with resumable_dir(dst_p, fp, "the folded checkpoint") as partial:
        tmp = partial.path
        if executor == "ray":
            from .on_ray import fold_on_ray

            groups, total, numel, stages = fold_on_ray(source, partial, plan, method, options, max_bytes,
                                                       address=ray_address, options_ray=ray_options,
                                                       progress=progress, verify=verify)
        else:
            writer = ShardWriter(tmp, max_bytes, expected=source.reader.shapes)
            groups, stages = fold_layers(source, plan, layer_fn, writer, range(n_layers), rest=True,
                                         progress=progress, desc=f"{method} layer by layer", partial=partial)
            writer.close()
            total, numel = writer.total, writer.numel
        record_sizes(model, adapter)
        model.config.save_pretrained(tmp)
        copy_extras(src_p, tmp)
    rmax = max((r for p in plan.values() for r in p.values()), default=0.0)
    per_layer = {"ratios": "per layer"} if len({r for p in plan.values() for r in p.values()}) > 1 else {}
    info = {**width_info(model, adapter, round_to), **per_layer, "executor": executor,
            **({"resumed_layers": partial.resumed_layers} if partial.resumed else {}), "output_bytes": total, "cpu_seconds": round(time.process_time() - cpu0, 2),
            **{f"{k}_seconds": round(v, 2) for k, v in stages.items()}}
    return FoldReport(method, rmax, source.reader.numel(), numel, None, None, time.perf_counter() - t0,
                      groups, repair, info=info)


def fold_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None = None, *,
                    sparsity: float | None = None, targets: str | Iterable[str] = "mlp", skip_first: int = 0,
                    skip_last: int = 0, repair: str = "none", seed: int = 0, n_init: int = 3,
                    attention_mode: str = "auto", max_shard_size: int | str = "2GB", progress: bool = True,
                    executor: str = "local", ray_address: str | None = None,
                    ray_options: Mapping | None = None, device: str | torch.device | None = None,
                    round_to: int | None = None, verify: bool = True) -> FoldReport:
    """Fold the transformers checkpoint directory ``src`` into ``dst`` one layer at a time.

    Same arguments and bit-identical result as ``fold_model`` + ``save``, but only a few layers' tensors
    are in memory at once, so checkpoints larger than RAM fold; output shards hold at most
    ``max_shard_size`` bytes. Reads safetensors (single file or sharded with an index); tensors keep their
    stored dtype; tokenizer and other files are copied. ``dst`` is written atomically; ``src`` is never
    modified. ``executor="ray"`` folds the layers as Ray tasks on the cluster at ``ray_address`` (a local
    one if None and none is running; ``src`` and ``dst`` must be on storage every node sees);
    ``ray_options`` go to the tasks' ``.options()`` (e.g. ``{"num_cpus": 4, "memory": 40e9}``). See
    docs/distributed.md. ``device``: where k-means runs ("cpu", "cuda", "cuda:N", "auto"; on Ray, each
    worker resolves it, so give GPU tasks ``ray_options={"num_gpus": 1}``). ``round_to``: kept widths at
    multiples of it (see ``modelfold.fold``). ``verify``: each folded layer runs once on a tiny input
    before it is written (a ``ResultError`` otherwise). A run that dies (killed, interrupted, disk
    full) keeps its work in ``.<dst>.partial``: the same call again continues from there and writes
    the same bytes (``modelfold.hf.resume``).
    """
    options = {"repair": repair, "seed": seed, "n_init": n_init, "attention_mode": attention_mode,
               "device": None if device is None else str(device), "round_to": round_to}
    return run_checkpoint(src, dst, ratio, "fold", options, targets=targets, skip_first=skip_first,
                   skip_last=skip_last, repair=repair, max_shard_size=max_shard_size, progress=progress,
                   sparsity=sparsity, attention_mode=attention_mode, executor=executor,
                   ray_address=ray_address, ray_options=ray_options, verify=verify)


def prune_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None = None, *,
                     sparsity: float | None = None, norm: int = 2, targets: str | Iterable[str] = "mlp",
                     skip_first: int = 0, skip_last: int = 0, attention_mode: str = "auto",
                     max_shard_size: int | str = "2GB", progress: bool = True, executor: str = "local",
                     ray_address: str | None = None, ray_options: Mapping | None = None,
                     round_to: int | None = None, verify: bool = True) -> FoldReport:
    """Magnitude-prune (SP-L1/L2) a checkpoint directory layer by layer; see ``fold_checkpoint``."""
    return run_checkpoint(src, dst, ratio, f"sp-l{norm}", {"norm": norm, "attention_mode": attention_mode,
                                                      "round_to": round_to},
                   targets=targets, skip_first=skip_first, skip_last=skip_last, repair="none",
                   max_shard_size=max_shard_size, progress=progress, sparsity=sparsity,
                   attention_mode=attention_mode, executor=executor, ray_address=ray_address,
                   ray_options=ray_options, verify=verify)


