"""Hugging Face transformers support: fold/prune MLP neurons and attention heads, save and reload.

Families: Llama, Mistral, Qwen2 (decoders with GQA) and BERT/MiniLM encoders. Structure comes from
the config and module names (one small adapter per family), not from tracing. ``fold_checkpoint``
folds a checkpoint directory layer by layer, for models larger than RAM.
"""

from __future__ import annotations

from typing import Any

from .adapters import find_adapter
from .attention import fold_attention, prune_attention
from .core import HF_REPAIRS, compress_model, fold_model, prune_model
from .gguf_out import save_gguf
from .io import is_hf_dir, load_any, load_pretrained, load_tokenizer, save
from .plan import InvalidPlanError, make_plan
from .stream import fold_checkpoint, prune_checkpoint


def is_supported(model: Any) -> bool:
    """True if ``model`` is a transformers model of a family modelfold knows."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers not installed
        return False
    return isinstance(model, PreTrainedModel) and find_adapter(model) is not None


__all__ = ["HF_REPAIRS", "compress_model", "InvalidPlanError", "fold_attention", "fold_checkpoint", "fold_model", "is_hf_dir",
           "is_supported", "load_any", "load_pretrained", "load_tokenizer", "make_plan", "prune_attention",
           "prune_checkpoint", "prune_model", "save", "save_gguf"]
