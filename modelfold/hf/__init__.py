"""Hugging Face transformers support: fold/prune MLP neurons and attention heads, save and reload.

Families: see ``SUPPORTED`` and docs/families.md (Llama, Mistral, Mixtral, Qwen2/3 and their MoE,
Gemma 1-3, Phi-3, GPT-2, OPT, GPT-NeoX, BERT, RoBERTa, DistilBERT). Structure comes from module
names and a short per-family declaration (adapters/__init__.py), not from tracing. ``fold_checkpoint``
folds a checkpoint directory layer by layer, for models larger than RAM.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .adapters import SUPPORTED, find_adapter
from .attention import fold_attention, prune_attention
from .calib.compress import compress_model
from .checkpoint import fold_checkpoint, prune_checkpoint
from .gguf import save_gguf
from .io import is_hf_dir, load_any, load_pretrained, load_tokenizer, save
from .model import HF_REPAIRS, fold_model, prune_model
from .plan import InvalidPlanError, make_plan
from .validate import check_gguf, check_model_dir, unsupported_type


def is_transformers(model: Any) -> bool:
    """True if ``model`` is a transformers ``PreTrainedModel`` (supported family or not)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers not installed
        return False
    return isinstance(model, PreTrainedModel)


def unsupported(model: Any) -> UnsupportedModelError:
    """The error for a transformers model of a family modelfold has no adapter for."""
    return unsupported_type(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)


def is_supported(model: Any) -> bool:
    """True if ``model`` is a transformers model of a family modelfold knows."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers not installed
        return False
    return isinstance(model, PreTrainedModel) and find_adapter(model) is not None


__all__ = ["HF_REPAIRS", "SUPPORTED", "InvalidPlanError", "check_gguf", "check_model_dir", "compress_model",
           "fold_attention", "fold_checkpoint", "fold_model", "is_hf_dir", "is_transformers", "unsupported",
           "is_supported", "load_any", "load_pretrained", "load_tokenizer", "make_plan", "prune_attention",
           "prune_checkpoint", "prune_model", "save", "save_gguf"]
