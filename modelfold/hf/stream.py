"""Fold a transformers checkpoint that does not fit in RAM: one layer at a time, shard to shard.

The model is built on the ``meta`` device from ``config.json`` (no memory), so the family adapter
can name every projection. Then, for each decoder/encoder layer, only that layer's tensors are
read from the memory-mapped safetensors shards, folded by the very step ``fold_model`` uses
(``core.fold_layer_fn``), written to the output shards and released. Embeddings, norms and the
LM head are copied through tensor by tensor. Reading the next layer and writing the previous one
run in two threads while the current one folds. Peak memory is about three layers' tensors plus
the folding temporaries of one, whatever the size of the checkpoint or of the output shards.
With ``executor="ray"`` the layers are folded by Ray tasks (``modelfold.hf.distributed``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import check_round_to
from ..errors import CheckpointError
from ..report import FoldReport, GroupReport
from .adapters import Adapter
from .convert import disk_to_model_names, to_disk, to_model
from .core import LayerFn, _adapter, fold_layer_fn, prune_layer_fn, record_sizes, resolve_ratio
from .io import _model_class, is_hf_dir
from .plan import Plan, make_plan
from .resume import Partial, fingerprint, group_from_dict, group_to_dict, resumable_dir
from .runcheck import check_layer_runs
from .shards import INDEX, WEIGHT_SUFFIXES, ShardReader, ShardWriter, parse_size
from .validate import check_model_dir

__all__ = ["ShardReader", "ShardWriter", "checkpoint_bytes", "fold_checkpoint", "parse_size",
           "prune_checkpoint", "skeleton"]
EXECUTORS = ("local", "ray")


def skeleton(path: Path) -> nn.Module:
    """The model ``config.json`` describes, on the meta device (shapes only), at any recorded fold sizes."""
    from transformers import AutoConfig

    check_model_dir(path, weights=False, foldable=True)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}/config.json cannot be read by transformers ({type(e).__name__}: {e})") from None
    cls = _model_class(config)
    build = getattr(cls, "_from_config", None) or cls.from_config
    with torch.device("meta"):
        model = build(config)
    layers = getattr(config, "modelfold_layers", None)
    if layers:
        adapter = _adapter(model)
        if len(adapter.layers(model)) != len(layers):
            raise CheckpointError(f"{path}: config.modelfold_layers does not match the number of layers")
        for i, sizes in enumerate(layers):
            adapter.resize(model, i, sizes)
    return model.eval()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim  # noqa: B018 - glibc only
        return lib
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: RSS would creep per layer)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


@dataclass
class Source:
    """A checkpoint directory opened for layer-by-layer work: its reader, meta skeleton and tensor names."""

    path: Path
    reader: ShardReader
    model: nn.Module
    adapter: Adapter
    prefixes: list[str]  # "model.layers.3." for every layer
    per_layer: list[list[str]]  # tensor names of every layer
    rest: list[str]  # embeddings, final norm, LM head ...
    verify: bool = True  # each folded layer runs once on a tiny input before it is written


def open_source(src: str | os.PathLike) -> Source:
    """Open ``src`` (a transformers directory with safetensors weights); no weights are read."""
    src_p = Path(src).resolve()
    if not is_hf_dir(src_p):
        hint = (" GGUF files are dequantized and folded in memory: modelfold.hf.load_any + fold_model "
                "(CLI: --stream never)") if src_p.suffix == ".gguf" else ""
        raise CheckpointError(f"{src_p} is not a transformers model directory (no config.json).{hint}")
    check_model_dir(src_p, foldable=True)  # config, family, weights
    reader = ShardReader(src_p)
    model = skeleton(src_p)
    adapter = _adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in adapter.layers(model)]
    per_layer: list[list[str]] = [[] for _ in prefixes]
    rest: list[str] = []
    names = disk_to_model_names(model, reader.keys())  # checkpoint layout -> the model's (MoE experts)
    for key in reader.keys():
        hit = next((i for i, p in enumerate(prefixes) if names[key].startswith(p)), None)
        (rest if hit is None else per_layer[hit]).append(key)
    empty = [prefixes[i].rstrip(".") for i, keys in enumerate(per_layer) if not keys]
    if empty:
        raise CheckpointError(f"{src_p}: no tensors for {empty[:3]} in the checkpoint; its tensor names do not "
                              "follow the model config.json describes (re-save it with save_pretrained)")
    return Source(src_p, reader, model, adapter, prefixes, per_layer, rest)


def layer_fn_for(method: str, options: Mapping) -> LayerFn:
    """The per-layer step of ``method`` ("fold" or "sp-l1"/"sp-l2") with its keyword options."""
    return fold_layer_fn(**options) if method == "fold" else prune_layer_fn(**options)


def _item_keys(source: Source, item: int | None) -> list[str]:
    return source.rest if item is None else source.per_layer[item]


def fold_layers(source: Source, plan: Plan, layer_fn: LayerFn, writer: ShardWriter, ids: Sequence[int], *,
                rest: bool = False, progress: bool = False, desc: str = "",
                partial: Partial | None = None) -> tuple[list[GroupReport], dict]:
    """Read, fold and write layers ``ids`` (first the non-layer tensors if ``rest``), in order.

    A reader thread loads the next layer and a writer thread writes the previous one while this
    thread folds; outputs go to ``writer`` in order, so the result does not depend on the timing.
    With ``partial`` the run is resumable: each closed shard is recorded there, and a run that finds
    such a record continues behind it (see ``modelfold.hf.resume``), writing the same bytes.
    Returns the group reports and the seconds spent reading, folding and writing.
    """
    reader = source.reader
    stages = {"read": 0.0, "fold": 0.0, "write": 0.0}
    items: list[int | None] = ([None] if rest else []) + list(ids)
    reports: dict[int, list[GroupReport]] = {}
    written: set[str] = set()
    first = 0  # index into ``items`` of the first item not entirely in closed shards
    stateful = partial is not None and hasattr(layer_fn, "state")
    prog = partial.progress() if partial is not None else None
    if prog is not None:
        writer.restore(prog["files"], prog["sizes"])
        written = {k for _, keys in prog["files"] for k in keys}
        first = int(prog["first"])
        for i, rec in prog["layers"].items():
            reports[int(i)] = [group_from_dict(g) for g in rec["groups"]]
            source.adapter.resize(source.model, int(i), rec["sizes"])
        partial.resumed_layers = sum(1 for item in items[:first] if item is not None)
        if stateful and first < len(items) and items[first] is not None:
            layer_fn.restore(partial.load_state(items[first]))
    if partial is not None:  # shards an attempt was writing when it died
        closed = {f for f, _ in writer.files}
        for p in partial.path.glob(f"{writer.prefix}-*"):
            if p.name not in closed:
                p.unlink()

    def read(item: int | None) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        sd = {k: reader.get(k) for k in _item_keys(source, item)}
        reader.release()  # pages read so far stop counting against this process
        stages["read"] += time.perf_counter() - t
        return sd

    def record() -> None:
        """After a shard closed: where a rerun would start, and what it needs of the layers before."""
        closed = {k for _, keys in writer.files for k in keys}
        nxt = next((j for j, item in enumerate(items) if not set(_item_keys(source, item)) <= closed), len(items))
        layers = {str(item): {"groups": [group_to_dict(g) for g in reports[item]],
                              "sizes": source.adapter.sizes(source.model, item)}
                  for item in items[:nxt] if item is not None}
        partial.save_progress({"files": writer.files, "sizes": writer.sizes, "first": nxt, "layers": layers})
        if stateful and nxt < len(items) and items[nxt] is not None:
            partial.drop_states(below=items[nxt])

    def write(sd: dict[str, torch.Tensor]) -> None:
        t = time.perf_counter()
        n_closed = len(writer.files)
        for k, v in sd.items():
            if k not in written:
                writer.add(k, v)
        if partial is not None and len(writer.files) > n_closed:
            record()
        stages["write"] += time.perf_counter() - t

    todo = items[first:]
    n_layers = sum(1 for item in todo if item is not None)
    resumed = len(ids) - n_layers
    bar = tqdm(total=len(ids), initial=resumed, disable=not progress, file=sys.stderr,
               desc=desc + (f" (resumed: {resumed} layers already written)" if resumed else ""))
    try:
        with ThreadPoolExecutor(1, "modelfold-read") as rd, ThreadPoolExecutor(1, "modelfold-write") as wr:
            pending: Future | None = None
            nxt = rd.submit(read, todo[0]) if todo else None
            for j, item in enumerate(todo):
                sd = nxt.result()
                if j + 1 < len(todo):
                    nxt = rd.submit(read, todo[j + 1])
                if item is None:
                    out = sd
                else:
                    if stateful:
                        partial.save_state(item, layer_fn.state())
                    t = time.perf_counter()
                    reports[item] = []
                    out = _fold_one(source, plan, layer_fn, item, sd, reports[item])
                    stages["fold"] += time.perf_counter() - t
                    bar.update()
                del sd
                if pending is not None:
                    pending.result()
                pending = wr.submit(write, out)
                del out
                _trim_heap()
            if pending is not None:
                pending.result()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    groups = [g for item in items if item is not None for g in reports.get(item, [])]
    return groups, stages


def load_layer(source: Source, i: int) -> None:
    """Materialise layer ``i`` of the skeleton from the shards (``release_layer`` undoes it)."""
    prefix = source.prefixes[i]
    sd = to_model(source.model, {k: source.reader.get(k) for k in source.per_layer[i]})
    source.adapter.layers(source.model)[i].load_state_dict({k[len(prefix):]: v for k, v in sd.items()},
                                                           strict=False, assign=True)


def release_layer(source: Source, i: int) -> None:
    source.adapter.layers(source.model)[i].to("meta")
    source.reader.release()
    _trim_heap()


def _fold_one(source: Source, plan: Plan, layer_fn: LayerFn, i: int, sd: dict[str, torch.Tensor],
              groups: list[GroupReport]) -> dict[str, torch.Tensor]:
    """Fold layer ``i`` from its tensors ``sd``; returns its output tensors (the layer goes back to meta)."""
    model, adapter, prefix = source.model, source.adapter, source.prefixes[i]
    layer = adapter.layers(model)[i]
    sd = to_model(model, sd)  # checkpoint layout -> the model's (MoE experts)
    missing, unexpected = layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=False,
                                                assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{source.path}: the tensors of {prefix.rstrip('.')} do not match the model "
                              f"config.json describes (missing {missing[:4]}, unexpected {unexpected[:4]}); "
                              "the checkpoint and its config disagree")
    with torch.no_grad():
        groups.extend(layer_fn(model, adapter, i, plan.get(i, {})))
        if source.verify and plan.get(i):
            check_layer_runs(model, adapter, i)  # a layer that cannot run is never written
    layer = adapter.layers(model)[i]
    out = to_disk(model, {prefix + k: v for k, v in layer.state_dict().items()})
    out = {k: v for k, v in out.items() if k in source.reader.weight_map}
    layer.to("meta")  # the module lets go of this layer's tensors; ``out`` holds them until written
    return out


def _copy_extras(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other non-weight files travel with the model."""
    for p in sorted(src.iterdir()):
        if p.name in ("config.json", INDEX) or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)
        elif p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)


def _stream(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None, method: str,
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
            from .distributed import fold_on_ray

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
        _copy_extras(src_p, tmp)
    rmax = max((r for p in plan.values() for r in p.values()), default=0.0)
    info = {**({"round_to": round_to} if round_to else {}), "executor": executor,
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
    return _stream(src, dst, ratio, "fold", options, targets=targets, skip_first=skip_first,
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
    return _stream(src, dst, ratio, f"sp-l{norm}", {"norm": norm, "attention_mode": attention_mode,
                                                      "round_to": round_to},
                   targets=targets, skip_first=skip_first, skip_last=skip_last, repair="none",
                   max_shard_size=max_shard_size, progress=progress, sparsity=sparsity,
                   attention_mode=attention_mode, executor=executor, ray_address=ray_address,
                   ray_options=ray_options, verify=verify)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files in a transformers directory (0 if there are none)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
