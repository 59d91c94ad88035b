"""Fold a transformers checkpoint that does not fit in RAM: one layer at a time, shard to shard.

The model is built on the ``meta`` device from ``config.json`` (no memory), so the family adapter
can name every projection. Then, for each decoder/encoder layer, only that layer's tensors are
read from the memory-mapped safetensors shards, folded by the very step ``fold_model`` uses
(``core.fold_layer_fn``), written to the output shards and released. Embeddings, norms and the
LM head are copied through tensor by tensor. Peak memory is about one layer's tensors, whatever the
size of the checkpoint or of the output shards.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidWeightsError
from ..report import FoldReport, GroupReport
from .convert import disk_to_model_names, to_disk, to_model
from .core import LayerFn, _adapter, fold_layer_fn, prune_layer_fn, record_sizes, resolve_ratio
from .io import _model_class, atomic_dir, is_hf_dir
from .plan import make_plan
from .validate import check_model_dir

INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


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
            other = sorted(p.name for p in self.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
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
        return sum(_prod(s) for s in self.shapes.values())


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a larger tensor gets its own).

    Each tensor goes to disk as soon as it is added (safetensors' own ``save_file`` needs a whole
    shard in memory), so memory stays at one tensor whatever the shard size: the data is appended to
    a body file and, when the shard is full, the header is written and the body appended to it.
    The layout (8-byte little-endian header length, JSON header padded to 8 bytes, raw data) is the
    safetensors format; the tests read every shard back with ``safetensors.torch.load_file``.
    """

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.body = None
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0
        self.numel = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nb = t.numel() * t.element_size()
        if self.entries and self.offset + nb > self.max_bytes:
            self._flush()
        if self.body is None:
            self.body = open(self.out / f".body-{len(self.files):05d}", "wb")  # noqa: SIM115 - closed in _flush
        self.body.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if nb else b"")
        self.entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nb]}
        self.offset += nb
        self.total += nb
        self.numel += t.numel()

    def _flush(self) -> None:
        name = f"part-{len(self.files):05d}.safetensors"
        body_path = self.out / f".body-{len(self.files):05d}"
        if self.body is None:
            self.body = open(body_path, "wb")  # noqa: SIM115
        self.body.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.out / name, "wb") as f, open(body_path, "rb") as body:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            shutil.copyfileobj(body, f, 16 << 20)
        body_path.unlink()
        self.files.append((name, list(self.entries)))
        self.entries, self.offset, self.body = {}, 0, None

    def close(self) -> None:
        """Write the last shard, give the shards their transformers names and write the index."""
        if self.entries or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.rename(self.out / self.files[0][0], self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self.out / tmp, self.out / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


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


def _layer_prefixes(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] + "." for layer in layers]


def _load_layer(model: nn.Module, layer: nn.Module, prefix: str, reader: ShardReader, keys: list[str]) -> None:
    sd = to_model(model, {k: reader.get(k) for k in keys})  # checkpoint layout -> the model's (MoE experts)
    sd = {k[len(prefix):]: v for k, v in sd.items()}
    missing, unexpected = layer.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{reader.path}: the tensors of {prefix.rstrip('.')} do not match the model "
                              f"config.json describes (missing {missing[:4]}, unexpected {unexpected[:4]}); "
                              "the checkpoint and its config disagree")


def _copy_extras(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other non-weight files travel with the model."""
    for p in sorted(src.iterdir()):
        if p.name in ("config.json", INDEX) or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)
        elif p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, dst / p.name)


def _stream(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None, method: str,
            layer_fn: LayerFn, *, targets: str | Iterable[str], skip_first: int, skip_last: int,
            repair: str, max_shard_size: int | str, progress: bool, sparsity: float | None,
            attention_mode: str) -> FoldReport:
    t0 = time.perf_counter()
    src_p, dst_p = Path(src).resolve(), Path(dst).resolve()
    if not is_hf_dir(src_p):
        hint = (" GGUF files are dequantized and folded in memory: modelfold.hf.load_any + fold_model "
                "(CLI: --stream never)") if src_p.suffix == ".gguf" else ""
        raise CheckpointError(f"{src_p} is not a transformers model directory (no config.json).{hint}")
    check_model_dir(src_p, foldable=True)  # before any output: config, family, weights
    if dst_p == src_p or src_p in dst_p.parents:
        raise CheckpointError(f"the output {dst_p} must be outside the input checkpoint {src_p}; "
                              "choose another output directory (the input is never overwritten)")
    max_bytes = parse_size(max_shard_size)
    reader = ShardReader(src_p)
    model = skeleton(src_p)
    adapter = _adapter(model)
    layers = adapter.layers(model)
    ratio = resolve_ratio(model, adapter, ratio, sparsity, targets=targets, skip_first=skip_first,
                          skip_last=skip_last, attention_mode=attention_mode)
    plan = make_plan(ratio, len(layers), targets, skip_first, skip_last)
    prefixes = _layer_prefixes(model, layers)
    per_layer: list[list[str]] = [[] for _ in layers]
    rest: list[str] = []
    names = disk_to_model_names(model, reader.keys())
    for key in reader.keys():
        hit = next((i for i, p in enumerate(prefixes) if names[key].startswith(p)), None)
        (rest if hit is None else per_layer[hit]).append(key)
    empty = [prefixes[i].rstrip(".") for i, keys in enumerate(per_layer) if not keys]
    if empty:
        raise CheckpointError(f"{src_p}: no tensors for {empty[:3]} in the checkpoint; its tensor names do not "
                              "follow the model config.json describes (re-save it with save_pretrained)")
    groups: list[GroupReport] = []
    with atomic_dir(dst_p, "the folded checkpoint") as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for key in rest:
            writer.add(key, reader.get(key))
            reader.release()
        bar = tqdm(range(len(layers)), desc=f"{method} layer by layer", disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for i in bar:
                layer, prefix = layers[i], prefixes[i]
                _load_layer(model, layer, prefix, reader, per_layer[i])
                groups.extend(layer_fn(model, adapter, i, plan.get(i, {})))
                layer = adapter.layers(model)[i]
                for k, v in to_disk(model, {prefix + k: v for k, v in layer.state_dict().items()}).items():
                    if k in reader.weight_map:
                        writer.add(k, v)
                layer.to("meta")  # release this layer's tensors before the next one is read
                reader.release()
                _trim_heap()
        writer.close()
        record_sizes(model, adapter)
        model.config.save_pretrained(tmp)
        _copy_extras(src_p, tmp)
    rmax = max((r for p in plan.values() for r in p.values()), default=0.0)
    return FoldReport(method, rmax, reader.numel(), writer.numel, None, None, time.perf_counter() - t0,
                      groups, repair)


def fold_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None = None, *,
                    sparsity: float | None = None, targets: str | Iterable[str] = "mlp", skip_first: int = 0, skip_last: int = 0,
                    repair: str = "none", seed: int = 0, n_init: int = 3, attention_mode: str = "auto",
                    max_shard_size: int | str = "2GB", progress: bool = True) -> FoldReport:
    """Fold the transformers checkpoint directory ``src`` into ``dst`` one layer at a time.

    Same arguments and bit-identical result as ``fold_model`` + ``save``, but only one layer's tensors
    are in memory at once, so checkpoints larger than RAM fold; output shards hold at most
    ``max_shard_size`` bytes. Reads safetensors (single file or sharded with an index); tensors keep their stored
    dtype; tokenizer and other files are copied. ``dst`` is written atomically; ``src`` is never modified.
    """
    fn = fold_layer_fn(repair=repair, seed=seed, n_init=n_init, attention_mode=attention_mode)
    return _stream(src, dst, ratio, "fold", fn, targets=targets, skip_first=skip_first, skip_last=skip_last,
                   repair=repair, max_shard_size=max_shard_size, progress=progress, sparsity=sparsity,
                   attention_mode=attention_mode)


def prune_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, ratio: float | Mapping | None = None, *,
                     sparsity: float | None = None, norm: int = 2, targets: str | Iterable[str] = "mlp", skip_first: int = 0, skip_last: int = 0,
                     attention_mode: str = "auto", max_shard_size: int | str = "2GB",
                     progress: bool = True) -> FoldReport:
    """Magnitude-prune (SP-L1/L2) a checkpoint directory layer by layer; see ``fold_checkpoint``."""
    fn = prune_layer_fn(norm=norm, attention_mode=attention_mode)
    return _stream(src, dst, ratio, f"sp-l{norm}", fn, targets=targets, skip_first=skip_first,
                   skip_last=skip_last, repair="none", max_shard_size=max_shard_size, progress=progress,
                   sparsity=sparsity, attention_mode=attention_mode)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files in a transformers directory (0 if there are none)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
