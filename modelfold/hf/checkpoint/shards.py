"""Reading and writing safetensors shards one tensor at a time (memory of one tensor, each byte written once).

A safetensors file is an 8-byte little-endian header length, a JSON header (which may end in spaces)
and the raw tensor data. ``ShardWriter`` reserves room for the header at the start of each shard,
streams tensor data straight behind it and fills the header in when the shard is closed, so every
output byte is written once. The room reserved is an upper bound computed from the names and shapes
the writer is told to expect (folding only shrinks shapes); a shard whose header would not fit is
rewritten once behind a larger header, so the result is right in every case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ...errors import CheckpointError, InvalidWeightsError

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "500MB", "2GB", "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMG]I?B|B)?", str(size).strip().upper())
        n = int(float(m.group(1)) * _UNITS[m.group(2) or ""]) if m else 0
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} is not a positive size; write e.g. 2GB or 500MB")
    return n


def prod(shape: Iterable[int]) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


class ShardReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); the checkpoint "
                                      "may be corrupt, re-save it with save_pretrained") from None
        elif (self.path / "model.safetensors").is_file():
            self.weight_map = {}
            files = ["model.safetensors"]
        else:
            other = sorted(p.name for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            raise CheckpointError(f"{self.path} has no safetensors weights (found {other or 'none'}); "
                                  "layer-by-layer folding reads safetensors only: load the model and "
                                  "save_pretrained() it (safetensors is the default), or fold in memory")
        self._open = safe_open
        self._files: dict[str, object] = {}
        if not self.weight_map:
            self.weight_map = {k: f for f in files for k in self._file(f).keys()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for key, fname in self.weight_map.items():
            try:
                self.shapes[key] = tuple(self._file(fname).get_slice(key).get_shape())
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{self.path / fname}: tensor {key!r} listed in the index cannot be "
                                      f"read ({type(e).__name__}: {e}); the checkpoint is corrupt") from None
        self.release()

    def _file(self, fname: str) -> object:
        if fname not in self._files:
            f = self.path / fname
            if not f.is_file():
                raise CheckpointError(f"shard {f} named in {INDEX} is missing; the checkpoint is incomplete")
            try:
                self._files[fname] = self._open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                      "the checkpoint is corrupt or truncated") from None
        return self._files[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def release(self) -> None:
        """Close the memory maps: the pages read so far stop counting against this process."""
        self._files.clear()

    def get(self, key: str) -> torch.Tensor:
        """One tensor; raises if it cannot be read or holds NaN/Inf (folding would spread them)."""
        try:
            t = self._file(self.weight_map[key]).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path / self.weight_map[key]}: cannot read tensor {key!r} "
                                  f"({type(e).__name__}: {e}); the checkpoint is corrupt") from None
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidWeightsError(f"tensor '{key}' in {self.path / self.weight_map[key]} contains NaN or Inf "
                                      "values; folding would spread them into merged neurons. Repair or "
                                      "re-export the checkpoint first.")
        return t

    def numel(self) -> int:
        return sum(prod(s) for s in self.shapes.values())


DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_HEAD = len(b'{"__metadata__":{"format":"pt"}}')
_UNKNOWN_RESERVE = 1 << 16  # header room when the writer was not told which tensors to expect


def _entry_bound(name: str, shape: Sequence[int]) -> int:
    """Header bytes one tensor can take: its real shape or any smaller one, any dtype, any offsets."""
    entry = {name: {"dtype": "F8_E4M3", "shape": [int(s) for s in shape], "data_offsets": [2**64, 2**64]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1  # + the separating comma


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a larger tensor gets its own).

    Each tensor's data is written, once, to its final place in the shard as soon as it is added, so
    memory stays at one tensor whatever the shard size. ``expected`` ({name: shape}) lists the tensors
    that may still come; it sizes the header room reserved at the start of each shard.
    ``close`` names the shards as transformers does and writes the index; ``finish`` only closes the
    last shard and leaves naming to the caller (``finalize``), for shards written by several processes.
    """

    def __init__(self, out: str | os.PathLike, max_bytes: int, expected: Mapping[str, Sequence[int]] | None = None,
                 prefix: str = "part") -> None:
        self.out, self.max_bytes, self.prefix = Path(out), max_bytes, prefix
        self._bounds = None if expected is None else {k: _entry_bound(k, s) for k, s in expected.items()}
        self._left = sum(self._bounds.values()) if self._bounds is not None else 0
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self._f = None
        self._reserve = 0
        self.files: list[tuple[str, list[str]]] = []
        self.sizes: list[tuple[int, int]] = []  # (bytes, numel) of every closed shard
        self.total = 0
        self.numel = 0
        self._bytes = self._numel = 0  # of the open shard

    def restore(self, files: Sequence[tuple[str, Sequence[str]]], sizes: Sequence[Sequence[int]]) -> None:
        """Continue after the closed shards ``files`` of an earlier attempt (a resumed run)."""
        self.files = [(f, list(k)) for f, k in files]
        self.sizes = [(int(b), int(n)) for b, n in sizes]
        self.total = sum(b for b, _ in self.sizes)
        self.numel = sum(n for _, n in self.sizes)
        if self._bounds is not None:
            for _, keys in self.files:
                for k in keys:
                    self._left -= self._bounds.pop(k, 0)

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.files):05d}.safetensors"

    def _open(self) -> None:
        room = _HEAD + (self._left if self._bounds is not None else _UNKNOWN_RESERVE)
        self._reserve = room + (-room % 8)  # tensor data stays 8-byte aligned
        self._f = open(self.out / self._name(), "wb")  # noqa: SIM115 - closed in _flush
        self._f.seek(8 + self._reserve)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nb = t.numel() * t.element_size()
        if self.entries and self.offset + nb > self.max_bytes:
            self._flush()
        if self._f is None:
            self._open()
        if nb:
            self._f.write(t.reshape(-1).view(torch.uint8).numpy())
        self.entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nb]}
        if self._bounds is not None:
            self._left -= self._bounds.pop(name, 0)
        self.offset += nb
        self.total += nb
        self.numel += t.numel()
        self._bytes += nb
        self._numel += t.numel()

    def _flush(self) -> None:
        if self._f is None:
            self._open()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        path = self.out / self._name()
        if len(header) <= self._reserve:
            self._f.seek(0)
            self._f.write(self._reserve.to_bytes(8, "little") + header + b" " * (self._reserve - len(header)))
            self._f.flush()
            os.fsync(self._f.fileno())  # a closed shard survives a crash: resumed runs start behind it
            self._f.close()
        else:  # a tensor the writer was not told about: rewrite this shard once behind a larger header
            self._f.close()
            header += b" " * (-len(header) % 8)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f, open(path, "rb") as body:
                f.write(len(header).to_bytes(8, "little") + header)
                body.seek(8 + self._reserve)
                shutil.copyfileobj(body, f, 16 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self.files.append((path.name, list(self.entries)))
        self.sizes.append((self._bytes, self._numel))
        self.entries, self.offset, self._f = {}, 0, None
        self._bytes = self._numel = 0

    def finish(self) -> list[tuple[str, list[str]]]:
        """Close the last shard; returns [(file name, tensor names)] in writing order."""
        if self.entries or not self.files:
            self._flush()
        return self.files

    def abort(self) -> None:
        """Close an open shard after a failure (the caller removes the directory)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> None:
        """Write the last shard, give the shards their transformers names and write the index."""
        finalize(self.out, self.finish(), self.total)


def finalize(out: Path, files: Sequence[tuple[str, Sequence[str]]], total: int) -> None:
    """Rename shards (in order) to ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` and index them."""
    n = len(files)
    if n == 1:
        os.rename(out / files[0][0], out / "model.safetensors")
        return
    weight_map = {}
    for i, (tmp, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(out / tmp, out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
