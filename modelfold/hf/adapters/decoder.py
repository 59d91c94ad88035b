"""Llama-style decoders: Llama, Mistral, Qwen2 (SwiGLU MLP, GQA attention, RoPE)."""

from __future__ import annotations

import torch.nn as nn

from .base import Adapter, AttnSpec, MLPSpec, get


class DecoderAdapter(Adapter):
    """``base_model.layers[i].mlp.{gate,up,down}_proj`` and ``.self_attn.{q,k,v,o}_proj``."""

    model_types = ("llama", "mistral", "qwen2")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.layers)

    def _prefix(self, model: nn.Module, i: int) -> str:
        base = model.base_model_prefix if model.base_model is not model else ""
        return f"{base}.layers.{i}" if base else f"layers.{i}"

    def mlp(self, model: nn.Module, i: int) -> MLPSpec:
        mlp = self.layers(model)[i].mlp
        return MLPSpec(f"{self._prefix(model, i)}.mlp", [(mlp, "gate_proj"), (mlp, "up_proj")],
                       (mlp, "down_proj"), owner=mlp)

    def attention(self, model: nn.Module, i: int) -> AttnSpec:
        attn = self.layers(model)[i].self_attn
        hd = int(attn.head_dim)
        hq = get((attn, "q_proj")).out_features // hd
        hkv = get((attn, "k_proj")).out_features // hd
        return AttnSpec(f"{self._prefix(model, i)}.self_attn", (attn, "q_proj"), (attn, "k_proj"),
                        (attn, "v_proj"), (attn, "o_proj"), attn, hq, hkv, hd,
                        names=["q_proj", "k_proj", "v_proj", "o_proj"])

    def set_heads(self, spec: AttnSpec, num_heads: int, num_kv_heads: int) -> None:
        # transformers 5.x reads only head_dim and num_key_value_groups at run time (-1 in view()).
        spec.module.num_key_value_groups = num_heads // num_kv_heads
        for attr, val in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(spec.module, attr):
                setattr(spec.module, attr, val)

    def set_uniform_config(self, config: object, sizes: dict[str, int]) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.head_dim = head_dim  # keep head_dim explicit: it must not follow the head count
        config.intermediate_size = sizes["intermediate_size"]
        config.num_attention_heads = sizes["num_attention_heads"]
        config.num_key_value_heads = sizes["num_key_value_heads"]
