"""Tiny random transformers models for the hf tests (built in code, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "bert")


def make_model(family: str, seed: int = 0, layers: int = 3, inter: int = 48) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` in eval mode (GQA 4 query / 2 KV heads for decoders)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "bert":
        cfg = transformers.BertConfig(**common, hidden_act="gelu", attn_implementation="eager")
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
        cfg = cls[0](**common, num_key_value_heads=2, tie_word_embeddings=(family == "llama"),
                     attn_implementation="eager")
        model = cls[1](cfg)
    with torch.no_grad():  # non-trivial biases and norms so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (2, 9), generator=g)


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state
