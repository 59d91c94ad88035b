"""Resumable layer-by-layer runs: a stable partial directory beside the output, and what it records.

A layer-by-layer run writes into ``.<out>.partial`` next to ``out``. Its ``resume.json`` holds the
run's fingerprint (source files, method, plan, options, shard size, executor). The single-process
path records in ``progress.json`` every shard it has closed (fsynced) with the tensors in it and the
reports of the layers before the first tensor not yet in a closed shard; a layer's calibration
activations are kept in ``state-<layer>.safetensors`` until no resume can start before it. Ray tasks
record each finished layer in ``layer-<layer>.json``. Rerunning the same command after any death
continues behind what was recorded, and, because every step is deterministic, writes the same bytes
an uninterrupted run writes. A run with another fingerprint is refused. On success the partial
directory is renamed into place; on a modelfold error (bad input: rerunning would fail the same way) it
is removed; on any other failure (killed, interrupted, disk full) it is kept for the rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...errors import CheckpointError, ModelFoldError
from ...report import GroupReport

MANIFEST, PROGRESS = "resume.json", "progress.json"
FORMAT = 1


def partial_path(out: Path) -> Path:
    """Where a layer-by-layer run writing ``out`` keeps its partial output."""
    return out.parent / f".{out.name}.partial"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _file_id(p: Path) -> list:
    st = p.stat()
    small = p.suffix == ".json"  # config and index: by content; weights: by size and modification time
    return [p.name, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest() if small else st.st_mtime_ns]


def fingerprint(src: Path, method: str, plan: Mapping, options: Mapping, max_bytes: int, executor: str) -> dict:
    """What must be equal for a partial output to be continued (JSON-able)."""
    files = sorted(p for p in src.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors")))
    return _jsonable({"format": FORMAT, "source": {"path": str(src), "files": [_file_id(p) for p in files]},
                      "method": method, "plan": {str(i): p for i, p in sorted(plan.items())},
                      "options": dict(options), "max_shard_bytes": max_bytes, "executor": executor})


def write_json(path: Path, data: Any) -> None:
    """Atomically (a crash leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def group_to_dict(g: GroupReport) -> dict:
    return dataclasses.asdict(g)


def group_from_dict(d: Mapping) -> GroupReport:
    return GroupReport(**d)


class Partial:
    """The partial output directory of one run; ``resumed`` when an earlier attempt left work in it."""

    def __init__(self, path: Path, resumed: bool) -> None:
        self.path, self.resumed = path, resumed
        self.resumed_layers = 0

    # single-process runs
    def progress(self) -> dict | None:
        return read_json(self.path / PROGRESS) if self.resumed else None

    def save_progress(self, data: Mapping) -> None:
        write_json(self.path / PROGRESS, data)

    def save_state(self, i: int, state: Mapping[str, torch.Tensor]) -> None:
        tmp = self.path / f"state-{i:05d}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, self.path / f"state-{i:05d}.safetensors")

    def load_state(self, i: int) -> dict[str, torch.Tensor]:
        path = self.path / f"state-{i:05d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: the calibration activations of layer {i} are missing, so the run "
                                  f"cannot be resumed there; delete {self.path} and run again")
        return load_file(str(path))

    def drop_states(self, below: int) -> None:
        for p in self.path.glob("state-*.safetensors"):
            if int(p.name[6:11]) < below:
                p.unlink()

    # Ray runs
    def layer_record(self, name: str) -> dict | None:
        rec = read_json(self.path / f"{name}.json") if self.resumed else None
        if rec is None or not all((self.path / f).is_file() for f, _ in rec["files"]):
            return None
        return rec

    def clean(self) -> None:
        """Remove the bookkeeping before the directory becomes the output."""
        for p in self.path.iterdir():
            if (p.name in (MANIFEST, PROGRESS) or p.name.startswith("state-") or p.name.endswith(".tmp")
                    or (p.name.startswith(("layer-", "rest")) and p.suffix == ".json")):
                p.unlink()


def _differences(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k if k != "source" else "source checkpoint (files changed)" for k in keys if old.get(k) != new.get(k)]


def _remove(path: Path, tries: int = 5) -> None:
    """Remove ``path``; again if something was still writing into it while it was removed."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.2)


@contextmanager
def resumable_dir(out: Path, fp: Mapping, what: str = "the compressed checkpoint") -> Iterator[Partial]:
    """Yield the partial directory for ``out`` (continued if an earlier attempt with fingerprint ``fp`` left
    one); on success it replaces ``out`` in one rename, as ``atomic_dir`` does."""
    from ..io import check_out_dir, move_into_place

    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(out)
    old_fp = read_json(part / MANIFEST) if part.is_dir() else None
    if old_fp is not None and old_fp != _jsonable(fp):
        raise CheckpointError(
            f"{part} holds the partial output of a different run (it differs in: "
            f"{', '.join(_differences(old_fp, _jsonable(fp)))}); rerun the command that started it to resume it, "
            f"or delete {part} to start this one")
    if old_fp is None:  # none, or one that died before it recorded anything
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        write_json(part / MANIFEST, _jsonable(fp))
    partial = Partial(part, resumed=old_fp is not None)
    try:
        yield partial
        partial.clean()
        move_into_place(part, out)
    except BaseException as e:
        if isinstance(e, ModelFoldError) and not getattr(e, "resumable", False):
            _remove(part)  # bad input: a rerun would fail the same way
            raise
        note = (f"the work done so far is kept in {part}: rerun the same command to continue from there, "
                f"or delete {part} to start over")
        if not isinstance(e, Exception) or isinstance(e, ModelFoldError):
            print(f"modelfold: {note}", file=sys.stderr)
            raise
        raise CheckpointError(f"could not write {what} to {out}: {type(e).__name__}: {e}. {note}. Anything "
                              "already at the output path is unchanged; check disk space and permissions.") from e
