"""Fold a checkpoint's layers as Ray tasks: ``fold_checkpoint(..., executor="ray")``.

Once the plan is fixed, decoder layers fold independently. Each Ray task (one per layer) opens the
input checkpoint itself (every node must see ``src`` and the output directory at the same paths),
folds its layer with the same step as the single-process path and writes its own safetensors shards
into the output's temporary directory. Meanwhile the driver copies the embeddings, norms and LM head.
When every task has returned, the driver names all shards in layer order, writes the index and the
config; the directory then moves into place. Each task records its finished layer in the partial
output (``layer-<i>.json``), so rerunning the same command after the driver died submits only the
layers not recorded (``modelfold.hf.resume``). A task whose worker dies (killed, out of memory, node
lost) is submitted again by the driver, up to ``RETRIES`` times (Ray's own ``max_retries`` is 0: its
retry path races with cancellation inside Ray, which ended drivers with "Tried to retry task that
was not pending" under load); a rerun first removes what the dead attempt left, so the output does
not depend on failures. Errors in the folding itself are not retried.
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

from ...errors import CheckpointError, ModelFoldError
from ...report import GroupReport
from ..plan import Plan
from .layers import fold_layers, layer_fn_for
from .resume import Partial, group_from_dict, group_to_dict, write_json
from .shards import ShardWriter, finalize
from .source import Source, open_source

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
              threads: int, verify: bool = True) -> dict:
    """One Ray task: fold layers ``ids`` of ``src`` and write them as shards ``part-<first layer>-*`` in ``out``."""
    torch.set_num_threads(threads)
    cpu0 = time.process_time()
    source = open_source(src)
    source.verify = verify
    for p in Path(out).glob(_prefix(ids) + "-*"):  # what an attempt killed earlier left behind
        p.unlink()
    expected = {k: source.reader.shapes[k] for i in ids for k in source.per_layer[i]}
    writer = ShardWriter(out, max_bytes, expected=expected, prefix=_prefix(ids))
    groups, stages = fold_layers(source, plan, layer_fn_for(method, options), writer, ids)
    _maybe_die(ids)
    files = writer.finish()
    result = {"ids": list(ids), "files": files, "groups": [group_to_dict(g) for g in groups], "total": writer.total,
              "numel": writer.numel, "sizes": [source.adapter.sizes(source.model, i) for i in ids],
              "stages": stages, "seconds": stages["read"] + stages["fold"] + stages["write"],
              "cpu_seconds": time.process_time() - cpu0}
    write_json(Path(out) / f"layer-{ids[0]:05d}.json", result)  # a rerun after the driver died skips this layer
    return result


def _worker_died(e: Exception) -> CheckpointError:
    err = CheckpointError(f"a Ray worker folding a layer died {RETRIES + 1} times ({type(e).__name__}); the usual "
                          "cause is memory: give each task more with ray_options={'memory': bytes} (see "
                          "docs/distributed.md) or use executor='local'")
    err.resumable = True  # the layers already folded are kept for a rerun
    return err


def gather(ray: Any, submit: Any, refs: dict, total: int, progress: bool) -> dict[int, dict]:
    """Results of the tasks ``refs`` ({ref: layer}); a task whose worker died is submitted again (up to
    ``RETRIES`` times); a task's own error is re-raised as it was raised in the task. ``refs`` keeps
    the tasks still running."""
    tries = dict.fromkeys(refs.values(), 0)
    results: dict[int, dict] = {}
    done = total - len(refs)
    bar = tqdm(total=total, initial=done, disable=not progress, file=sys.stderr,
               desc="fold on Ray" + (f" (resumed: {done} layers already written)" if done else ""))
    try:
        while refs:
            (ref,), _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise CheckpointError(f"a Ray task failed: {e}") from None
            except ray.exceptions.RayError as e:  # the worker died: run the layer again
                if tries[i] >= RETRIES:
                    raise _worker_died(e) from None
                tries[i] += 1
                refs[submit(i)] = i
                continue
            bar.update()
        return results
    finally:
        bar.close()


def _start(ray: Any, address: str | None) -> bool:
    """Start or join a Ray cluster unless one is running; True when this call started it."""
    if ray.is_initialized():
        return False
    # Ray runs its workers at niceness 15: on a busy machine they then starve (a tiny layer's task took
    # over 15 minutes beside a CPU-bound job). A cluster modelfold starts runs them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ModelFoldError(f"cannot start or reach the Ray cluster {address or '(local)'}: {e}. Start one with "
                             "`ray start --head` and pass its address (see docs/distributed.md)") from None
    return True


def _cancel_and_wait(ray: Any, refs: Mapping) -> None:
    """Cancel ``refs`` and wait until none can still write into the partial output (it is removed next)."""
    for r in refs:
        try:
            ray.cancel(r, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
    # cancelling is asynchronous: a task writing meanwhile left a file, and the directory, behind
    ray.wait(list(refs), num_returns=len(refs), timeout=120)


def fold_on_ray(source: Source, partial: Partial, plan: Plan, method: str, options: dict, max_bytes: int, *,
                address: str | None = None, options_ray: Mapping | None = None,
                progress: bool = False, verify: bool = True) -> tuple[list[GroupReport], int, int, dict]:
    """Fold every layer of ``source`` as Ray tasks into ``partial``; returns (groups, bytes, numel, stages).

    Layers an earlier attempt recorded in ``partial`` are not folded again. Leaves the driver's meta
    skeleton at the folded sizes, so its config can be written.
    """
    ray = _ray()
    tmp = partial.path
    started = _start(ray, address)
    opts = {"num_cpus": 1, **(options_ray or {}), "max_retries": 0}
    if str(options.get("device") or "").startswith("cuda"):
        opts.setdefault("num_gpus", 1)  # each task folds on a GPU of its own
    threads = max(1, int(opts["num_cpus"]))
    t0 = time.perf_counter()
    n = len(source.prefixes)
    results = {i: rec for i in range(n) if (rec := partial.layer_record(f"layer-{i:05d}")) is not None}
    partial.resumed_layers = len(results)
    try:
        remote = ray.remote(fold_task).options(**opts)

        def submit(i: int) -> Any:
            return remote.remote(str(source.path), str(tmp), plan, method, dict(options), max_bytes, [i], threads,
                                 verify)

        refs = {submit(i): i for i in range(n) if i not in results}
        try:
            stages = {"read": 0.0, "fold": 0.0, "write": 0.0}
            rest = partial.layer_record("rest")
            if rest is None:  # the driver copies embeddings, norms and LM head while the tasks fold
                for p in tmp.glob("part-rest-*"):
                    p.unlink()
                writer = ShardWriter(tmp, max_bytes, expected={k: source.reader.shapes[k] for k in source.rest},
                                     prefix="part-rest")
                if source.rest:
                    _, stages = fold_layers(source, plan, layer_fn_for(method, options), writer, [], rest=True)
                rest = {"files": writer.finish() if source.rest else [], "total": writer.total,
                        "numel": writer.numel}
                write_json(tmp / "rest.json", rest)
            results.update(gather(ray, submit, refs, n, progress))
        except BaseException:
            if not started:  # a cluster of our own goes down with ray.shutdown(), its tasks with it
                _cancel_and_wait(ray, refs)
            raise
    finally:
        if started:
            ray.shutdown()
    ordered = [results[i] for i in range(n)]
    files = [tuple(f) for f in rest["files"]] + [tuple(f) for r in ordered for f in r["files"]]
    names = {f for f, _ in files}
    for p in tmp.glob("part-*"):  # anything a dead attempt left that no result names
        if p.name not in names:
            p.unlink()
    total = rest["total"] + sum(r["total"] for r in ordered)
    finalize(tmp, files, total)
    groups: list[GroupReport] = []
    for r in ordered:
        groups.extend(group_from_dict(g) for g in r["groups"])
        for i, sizes in zip(r["ids"], r["sizes"], strict=True):
            source.adapter.resize(source.model, i, sizes)
    for k in stages:
        stages[k] += sum(r["stages"][k] for r in ordered)
    stages["wall"] = time.perf_counter() - t0
    stages["task_max"] = max((r["seconds"] for r in ordered), default=0.0)
    stages["task_cpu"] = sum(r["cpu_seconds"] for r in ordered)
    return groups, total, rest["numel"] + sum(r["numel"] for r in ordered), stages
