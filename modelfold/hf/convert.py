"""Tensor names and layouts on disk vs in memory, through transformers' own conversion mappings.

Some families keep a different layout in memory than in their checkpoints: Mixtral and the
Qwen MoE models hold every layer's experts as stacked 3D tensors but save one matrix per expert;
multimodal wrappers (Gemma 3) rename prefixes. ``from_pretrained``/``save_pretrained`` convert with
``transformers.conversion_mapping``; the per-layer loader and the layer-by-layer fold use the same
mappings (never a hand-written list) on partial state dicts.
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn as nn


def _conversions(model: nn.Module) -> list:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # older transformers: checkpoints and memory share one layout
        return []
    return [c for c in get_model_conversion_mapping(model) if type(c).__name__ != "PrefixChange"]


def has_conversions(model: nn.Module) -> bool:
    return bool(_conversions(model))


def disk_to_model_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """The in-memory parameter name each checkpoint key feeds (no tensors read)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conv = _conversions(model)
    if not conv:
        return {k: k for k in keys}
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    return {k: rename_source_key(k, renamings, converters, model.base_model_prefix, meta)[0] for k in keys}


def to_model(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (any subset of whole layers) -> the model's own names and layouts."""
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    conv = _conversions(model)
    if not conv:
        return sd
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    pending: dict[str, object] = {}
    for key, t in sorted(sd.items(), key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is not None:
            mapping = pending.setdefault(name, deepcopy(by_pattern[pattern]))
        else:
            mapping = pending.setdefault(name, WeightRenaming(key, name))
            pattern = key
        mapping.add_tensor(name, key, pattern, t)
    out: dict[str, torch.Tensor] = {}
    for name, mapping in pending.items():
        for target, t in mapping.convert(name, model=model, config=model.config).items():
            out[target] = t[0] if isinstance(t, list) else t
    return out


def to_disk(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors -> checkpoint names and layouts (what ``save_pretrained`` writes)."""
    if not has_conversions(model):
        return sd
    from transformers.core_model_loading import revert_weight_conversion

    return {k: v.contiguous() for k, v in revert_weight_conversion(model, sd).items()}
