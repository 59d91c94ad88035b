"""Per-family adapters: structure read from the config and module names, never traced."""

from __future__ import annotations

from typing import Any

from .base import Adapter, AttnSpec, MLPSpec
from .bert import BertAdapter
from .decoder import DecoderAdapter

ADAPTERS: tuple[Adapter, ...] = (DecoderAdapter(), BertAdapter())


def find_adapter(model: Any) -> Adapter | None:
    """The adapter for ``model``'s family, or None."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if mtype in a.model_types:
            try:
                a.layers(model)
            except AttributeError:
                return None
            return a
    return None


__all__ = ["ADAPTERS", "Adapter", "AttnSpec", "MLPSpec", "find_adapter"]
