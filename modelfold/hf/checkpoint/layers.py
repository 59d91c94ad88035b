"""The layer loop of a layer-by-layer run: read a layer's tensors, compress it, write it, release it.

A reader thread loads the next layer and a writer thread writes the previous one while the current
one is compressed, by the very step the in-memory path uses (``LayerFn``); peak memory is about three
layers' tensors. With a :class:`~modelfold.hf.checkpoint.resume.Partial` the loop is resumable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from ...errors import CheckpointError
from ...report import GroupReport
from ..convert import to_disk, to_model
from ..model import LayerFn, fold_layer_fn, prune_layer_fn
from ..plan import Plan
from ..runcheck import check_layer_runs
from .resume import Partial, group_from_dict, group_to_dict
from .shards import ShardWriter
from .source import Source, trim_heap


def layer_fn_for(method: str, options: Mapping) -> LayerFn:
    """The per-layer step of ``method`` ("fold" or "sp-l1"/"sp-l2") with its keyword options."""
    return fold_layer_fn(**options) if method == "fold" else prune_layer_fn(**options)


def item_keys(source: Source, item: int | None) -> list[str]:
    return source.rest if item is None else source.per_layer[item]


def fold_layers(source: Source, plan: Plan, layer_fn: LayerFn, writer: ShardWriter, ids: Sequence[int], *,
                rest: bool = False, progress: bool = False, desc: str = "",
                partial: Partial | None = None) -> tuple[list[GroupReport], dict]:
    """Read, fold and write layers ``ids`` (first the non-layer tensors if ``rest``), in order.

    A reader thread loads the next layer and a writer thread writes the previous one while this
    thread folds; outputs go to ``writer`` in order, so the result does not depend on the timing.
    With ``partial`` the run is resumable: each closed shard is recorded there, and a run that finds
    such a record continues behind it (see ``modelfold.hf.checkpoint.resume``), writing the same bytes.
    Returns the group reports and the seconds spent reading, folding and writing.
    """
    loop = LayerLoop(source, plan, layer_fn, writer, ([None] if rest else []) + list(ids), partial)
    return loop.run(progress, desc, len(ids))


class LayerLoop:
    """One pass of :func:`fold_layers` over ``items`` (None: the non-layer tensors; i: layer i)."""

    def __init__(self, source: Source, plan: Plan, layer_fn: LayerFn, writer: ShardWriter,
                 items: list[int | None], partial: Partial | None) -> None:
        self.source, self.plan, self.layer_fn, self.writer = source, plan, layer_fn, writer
        self.items, self.partial = items, partial
        self.stages = {"read": 0.0, "fold": 0.0, "write": 0.0}
        self.reports: dict[int, list[GroupReport]] = {}
        self.written: set[str] = set()  # tensors already in closed shards (a resumed run)
        self.first = 0  # index into ``items`` of the first item not entirely in closed shards
        self.stateful = partial is not None and hasattr(layer_fn, "state")
        if partial is not None:
            self._resume(partial)

    def _resume(self, partial: Partial) -> None:
        """Continue behind what an earlier attempt recorded; remove the shards it was writing."""
        prog = partial.progress()
        if prog is not None:
            self.writer.restore(prog["files"], prog["sizes"])
            self.written = {k for _, keys in prog["files"] for k in keys}
            self.first = int(prog["first"])
            for i, rec in prog["layers"].items():
                self.reports[int(i)] = [group_from_dict(g) for g in rec["groups"]]
                self.source.adapter.resize(self.source.model, int(i), rec["sizes"])
            partial.resumed_layers = sum(1 for item in self.items[:self.first] if item is not None)
            if self.stateful and self.first < len(self.items) and self.items[self.first] is not None:
                self.layer_fn.restore(partial.load_state(self.items[self.first]))
        closed = {f for f, _ in self.writer.files}
        for p in partial.path.glob(f"{self.writer.prefix}-*"):
            if p.name not in closed:
                p.unlink()

    def read(self, item: int | None) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        sd = {k: self.source.reader.get(k) for k in item_keys(self.source, item)}
        self.source.reader.release()  # pages read so far stop counting against this process
        self.stages["read"] += time.perf_counter() - t
        return sd

    def record(self) -> None:
        """After a shard closed: where a rerun would start, and what it needs of the layers before."""
        items, source = self.items, self.source
        closed = {k for _, keys in self.writer.files for k in keys}
        nxt = next((j for j, item in enumerate(items) if not set(item_keys(source, item)) <= closed), len(items))
        layers = {str(item): {"groups": [group_to_dict(g) for g in self.reports[item]],
                              "sizes": source.adapter.sizes(source.model, item)}
                  for item in items[:nxt] if item is not None}
        self.partial.save_progress({"files": self.writer.files, "sizes": self.writer.sizes, "first": nxt,
                                    "layers": layers})
        if self.stateful and nxt < len(items) and items[nxt] is not None:
            self.partial.drop_states(below=items[nxt])

    def write(self, sd: dict[str, torch.Tensor]) -> None:
        t = time.perf_counter()
        n_closed = len(self.writer.files)
        for k, v in sd.items():
            if k not in self.written:
                self.writer.add(k, v)
        if self.partial is not None and len(self.writer.files) > n_closed:
            self.record()
        self.stages["write"] += time.perf_counter() - t

    def fold(self, item: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.stateful:
            self.partial.save_state(item, self.layer_fn.state())
        t = time.perf_counter()
        self.reports[item] = []
        out = fold_one(self.source, self.plan, self.layer_fn, item, sd, self.reports[item])
        self.stages["fold"] += time.perf_counter() - t
        return out

    def run(self, progress: bool, desc: str, n_layers: int) -> tuple[list[GroupReport], dict]:
        todo = self.items[self.first:]
        resumed = n_layers - sum(1 for item in todo if item is not None)
        bar = tqdm(total=n_layers, initial=resumed, disable=not progress, file=sys.stderr,
                   desc=desc + (f" (resumed: {resumed} layers already written)" if resumed else ""))
        try:
            with ThreadPoolExecutor(1, "modelfold-read") as rd, ThreadPoolExecutor(1, "modelfold-write") as wr:
                pending: Future | None = None
                nxt = rd.submit(self.read, todo[0]) if todo else None
                for j, item in enumerate(todo):
                    sd = nxt.result()
                    if j + 1 < len(todo):
                        nxt = rd.submit(self.read, todo[j + 1])
                    out = sd if item is None else self.fold(item, sd)
                    if item is not None:
                        bar.update()
                    del sd
                    if pending is not None:
                        pending.result()
                    pending = wr.submit(self.write, out)
                    del out
                    trim_heap()
                if pending is not None:
                    pending.result()
        except BaseException:
            self.writer.abort()
            raise
        finally:
            bar.close()
        groups = [g for item in self.items if item is not None for g in self.reports.get(item, [])]
        return groups, self.stages


def fold_one(source: Source, plan: Plan, layer_fn: LayerFn, i: int, sd: dict[str, torch.Tensor],
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


