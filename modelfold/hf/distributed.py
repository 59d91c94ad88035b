"""Fold a checkpoint's layers as Ray tasks: ``fold_checkpoint(..., executor="ray")``.

Once the plan is fixed, decoder layers fold independently. Each Ray task (one per layer) opens the
input checkpoint itself (every node must see ``src`` and the output directory at the same paths),
folds its layer with the same step as the single-process path and writes its own safetensors shards
into the output's temporary directory. Meanwhile the driver copies the embeddings, norms and LM head.
When every task has returned, the driver names all shards in layer order, writes the index and the
config; ``atomic_dir`` then moves the directory into place. A task whose worker dies (killed, out of
memory, node lost) is re-run by Ray (``max_retries``); a rerun first removes what the dead attempt
left, so the output does not depend on failures. Errors in the folding itself are not retried.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, ModelFoldError
from ..report import GroupReport
from .plan import Plan
from .shards import ShardWriter, finalize
from .stream import Source, fold_layers, layer_fn_for, open_source

RETRIES = 3  # reruns of a task whose worker died
KILL_HOOK = "MODELFOLD_TEST_KILL_LAYER"  # "<layer>:<marker file>": that layer's task kills its worker once


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModelFoldError("executor='ray' needs the ray package: pip install 'modelfold[ray]' "
                             "(or pip install ray), or use executor='local'") from None
    return ray


def _prefix(ids: Sequence[int]) -> str:
    return f"part-{ids[0]:05d}"


def _maybe_die(ids: Sequence[int]) -> None:
    """Fault injection for the retry tests: the first attempt at the chosen layer kills its own worker."""
    hook = os.environ.get(KILL_HOOK)
    if hook:
        layer, marker = hook.split(":", 1)
        if int(layer) in ids and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def fold_task(src: str, out: str, plan: Plan, method: str, options: dict, max_bytes: int, ids: list[int],
              threads: int) -> dict:
    """One Ray task: fold layers ``ids`` of ``src`` and write them as shards ``part-<first layer>-*`` in ``out``."""
    torch.set_num_threads(threads)
    cpu0 = time.process_time()
    source = open_source(src)
    for p in Path(out).glob(_prefix(ids) + "-*"):  # what an attempt killed earlier left behind
        p.unlink()
    expected = {k: source.reader.shapes[k] for i in ids for k in source.per_layer[i]}
    writer = ShardWriter(out, max_bytes, expected=expected, prefix=_prefix(ids))
    groups, stages = fold_layers(source, plan, layer_fn_for(method, options), writer, ids)
    _maybe_die(ids)
    files = writer.finish()
    return {"ids": list(ids), "files": files, "groups": groups, "total": writer.total, "numel": writer.numel,
            "sizes": [source.adapter.sizes(source.model, i) for i in ids], "stages": stages,
            "seconds": stages["read"] + stages["fold"] + stages["write"], "cpu_seconds": time.process_time() - cpu0}


def _gather(ray: Any, refs: list, progress: bool) -> list[dict]:
    """Results of ``refs`` in order; a task's own error is re-raised as it was raised in the task."""
    bar = tqdm(total=len(refs), desc="fold on Ray", disable=not progress, file=sys.stderr)
    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            bar.update(len(ready))
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise CheckpointError(f"a Ray task failed: {e}") from None
    except ray.exceptions.RayError as e:
        raise CheckpointError(f"a Ray worker folding a layer died {RETRIES + 1} times ({type(e).__name__}); "
                              "the usual cause is memory: give each task more with ray_options={'memory': "
                              "bytes} (see docs/distributed.md) or use executor='local'") from None
    finally:
        bar.close()


def fold_on_ray(source: Source, tmp: Path, plan: Plan, method: str, options: dict, max_bytes: int, *,
                address: str | None = None, options_ray: Mapping | None = None,
                progress: bool = False) -> tuple[list[GroupReport], int, int, dict]:
    """Fold every layer of ``source`` as Ray tasks into ``tmp``; returns (groups, bytes, numel, stages).

    Leaves the driver's meta skeleton at the folded sizes, so its config can be written.
    """
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ModelFoldError(f"cannot start or reach the Ray cluster {address or '(local)'}: {e}. Start one with "
                                 "`ray start --head` and pass its address (see docs/distributed.md)") from None
    opts = {"max_retries": RETRIES, "num_cpus": 1, **(options_ray or {})}
    if str(options.get("device") or "").startswith("cuda"):
        opts.setdefault("num_gpus", 1)  # each task folds on a GPU of its own
    threads = max(1, int(opts["num_cpus"]))
    t0 = time.perf_counter()
    try:
        remote = ray.remote(fold_task).options(**opts)
        refs = [remote.remote(str(source.path), str(tmp), plan, method, dict(options), max_bytes, [i], threads)
                for i in range(len(source.prefixes))]
        try:
            rest_files: list = []
            stages = {"read": 0.0, "fold": 0.0, "write": 0.0}
            writer = ShardWriter(tmp, max_bytes, expected={k: source.reader.shapes[k] for k in source.rest},
                                 prefix="part-rest")
            if source.rest:  # the driver copies embeddings, norms and LM head while the tasks fold
                _, stages = fold_layers(source, plan, layer_fn_for(method, options), writer, [], rest=True)
                rest_files = writer.finish()
            results = _gather(ray, refs, progress)
        except BaseException:
            for r in refs:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
            raise
    finally:
        if started:
            ray.shutdown()
    files = rest_files + [f for r in results for f in r["files"]]
    names = {f for f, _ in files}
    for p in tmp.glob("part-*"):  # anything a dead attempt left that no result names
        if p.name not in names:
            p.unlink()
    finalize(tmp, files, writer.total + sum(r["total"] for r in results))
    groups: list[GroupReport] = []
    for r in results:
        groups.extend(r["groups"])
        for i, sizes in zip(r["ids"], r["sizes"], strict=True):
            source.adapter.resize(source.model, i, sizes)
    for k in stages:
        stages[k] += sum(r["stages"][k] for r in results)
    stages["wall"] = time.perf_counter() - t0
    stages["task_max"] = max((r["seconds"] for r in results), default=0.0)
    stages["task_cpu"] = sum(r["cpu_seconds"] for r in results)
    return groups, writer.total + sum(r["total"] for r in results), writer.numel + sum(r["numel"] for r in results), stages
