"""Per-family adapters: structure read from the config and module names, never traced."""

from __future__ import annotations

from typing import Any

from .base import Adapter, AttnSpec, MLPSpec
from .families import Family, StructuredAdapter
from .refs import get, put, ref_name

_NO_KV = {"num_key_value_heads": None}
_ENCODER = dict(layers=("encoder.layer",), mlp="", producers=("intermediate.dense",), consumer="output.dense",
                attn="attention", qkvo=("self.query", "self.key", "self.value", "output.dense"),
                attn_module="self", vanilla_heads=False, config_fields=_NO_KV,
                mlp_sum="output.LayerNorm")

FAMILIES: tuple[Family, ...] = (
    Family(("llama", "mistral", "qwen2", "qwen3", "gemma")),
    # Gemma 2/3 normalise the MLP's output before the residual add: no linear sum to correct towards
    Family(("gemma2", "gemma3_text"), mlp_feedback=False),
    Family(("gemma3",), layers=("language_model.layers",), text_config=True, mlp_feedback=False),
    Family(("mixtral",)),
    Family(("qwen2_moe", "qwen3_moe"), expert_key="moe_intermediate_size"),
    Family(("phi3",), fused_mlp="gate_up_proj", fused_qkv="qkv_proj", heads_in_config=True),
    Family(("gpt2",), layers=("h",), producers=("c_fc",), consumer="c_proj", attn="attn",
           qkvo=("q", "k", "v", "c_proj"), fused_qkv="c_attn", conv1d=True, vanilla_heads=False,
           config_fields={"intermediate_size": "n_inner", "num_attention_heads": "n_head", **_NO_KV}),
    Family(("opt",), layers=("decoder.layers",), mlp="", producers=("fc1",), consumer="fc2",
           qkvo=("q_proj", "k_proj", "v_proj", "out_proj"), vanilla_heads=False, mlp_feedback=False,
           config_fields={"intermediate_size": "ffn_dim", **_NO_KV}),  # OPT-350m is post-LN
    Family(("gpt_neox",), producers=("dense_h_to_4h",), consumer="dense_4h_to_h", attn="attention",
           qkvo=("q", "k", "v", "dense"), fused_qkv="query_key_value", interleaved_qkv=True,
           vanilla_heads=False, config_fields=_NO_KV),
    Family(("bert", "roberta", "xlm-roberta"), **_ENCODER),
    Family(("distilbert",), layers=("transformer.layer",), mlp="ffn", producers=("lin1",), consumer="lin2",
           attn="attention", qkvo=("q_lin", "k_lin", "v_lin", "out_lin"), vanilla_heads=False,
           mlp_sum="output_layer_norm",
           config_fields={"intermediate_size": "hidden_dim", "num_attention_heads": "n_heads", **_NO_KV}),
    # MPNet: BERT's layout; one relative position bias for all layers, one column per head
    Family(("mpnet",), **{**_ENCODER, "qkvo": ("attn.q", "attn.k", "attn.v", "attn.o"), "attn_module": "attn"},
           fixed_heads="its relative position bias (encoder.relative_attention_bias) has one column per head and "
                       "is shared by every layer, so no layer's head count can change"),
    # ModernBERT: pre-LN, fused Wqkv [q; k; v], GLU Wi [input; gate] (act(input) * gate, as [gate; up])
    Family(("modernbert",), producers=(), consumer="Wo", fused_mlp="Wi", attn="attn",
           qkvo=("q", "k", "v", "Wo"), fused_qkv="Wqkv", vanilla_heads=False, config_fields=_NO_KV),
)
ADAPTERS: tuple[Adapter, ...] = tuple(StructuredAdapter(f) for f in FAMILIES)
SUPPORTED: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for_type(model_type: str | None) -> Adapter | None:
    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def find_adapter(model: Any) -> Adapter | None:
    """The adapter for ``model``'s family, or None."""
    config = getattr(model, "config", None)
    a = adapter_for_type(getattr(config, "model_type", None))
    if a is None:
        return None
    try:
        a.layers(model)
    except AttributeError:
        return None
    return a


__all__ = ["ADAPTERS", "FAMILIES", "SUPPORTED", "Adapter", "AttnSpec", "Family", "MLPSpec", "adapter_for_type",
           "find_adapter", "get", "put", "ref_name"]
