"""A transformers checkpoint directory opened for layer-by-layer work, without loading its weights.

The model is built on the ``meta`` device from ``config.json`` (no memory), so the family adapter can
name every projection; tensors are read one layer at a time from the memory-mapped safetensors shards.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import CheckpointError
from ..adapters import Adapter
from ..convert import disk_to_model_names, to_model
from ..io import is_hf_dir, model_class
from ..model import adapter_of
from ..validate import check_model_dir
from .shards import INDEX, WEIGHT_SUFFIXES, ShardReader


def skeleton(path: Path) -> nn.Module:
    """The model ``config.json`` describes, on the meta device (shapes only), at any recorded fold sizes."""
    from transformers import AutoConfig

    check_model_dir(path, weights=False, foldable=True)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}/config.json cannot be read by transformers ({type(e).__name__}: {e})") from None
    cls = model_class(config)
    build = getattr(cls, "_from_config", None) or cls.from_config
    with torch.device("meta"):
        model = build(config)
    layers = getattr(config, "modelfold_layers", None)
    if layers:
        adapter = adapter_of(model)
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


def trim_heap() -> None:
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
    adapter = adapter_of(model)
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


def load_layer(source: Source, i: int) -> None:
    """Materialise layer ``i`` of the skeleton from the shards (``release_layer`` undoes it)."""
    prefix = source.prefixes[i]
    sd = to_model(source.model, {k: source.reader.get(k) for k in source.per_layer[i]})
    source.adapter.layers(source.model)[i].load_state_dict({k[len(prefix):]: v for k, v in sd.items()},
                                                           strict=False, assign=True)


def release_layer(source: Source, i: int) -> None:
    source.adapter.layers(source.model)[i].to("meta")
    source.reader.release()
    trim_heap()


def copy_extras(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other non-weight files travel with the model."""
    for p in sorted(src.iterdir()):
        if p.name in ("config.json", INDEX) or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)
        elif p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files in a transformers directory (0 if there are none)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
