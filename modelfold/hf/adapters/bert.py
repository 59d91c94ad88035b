"""BERT-style encoders (BERT, MiniLM): GELU MLP fc1/fc2, multi-head attention with biases."""

from __future__ import annotations

import torch.nn as nn

from .base import Adapter, AttnSpec, MLPSpec, get


class BertAdapter(Adapter):
    """``encoder.layer[i].intermediate.dense`` (fc1) / ``.output.dense`` (fc2) and self-attention."""

    model_types = ("bert",)
    vanilla_heads = False  # BERT derives head size as hidden_size / num_attention_heads

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.encoder.layer)

    def _prefix(self, model: nn.Module, i: int) -> str:
        base = model.base_model_prefix if model.base_model is not model else ""
        return f"{base}.encoder.layer.{i}" if base else f"encoder.layer.{i}"

    def mlp(self, model: nn.Module, i: int) -> MLPSpec:
        layer = self.layers(model)[i]
        return MLPSpec(f"{self._prefix(model, i)}", [(layer.intermediate, "dense")],
                       (layer.output, "dense"))

    def attention(self, model: nn.Module, i: int) -> AttnSpec:
        att = self.layers(model)[i].attention
        sa = att.self
        hd = int(sa.attention_head_size)
        h = get((sa, "query")).out_features // hd
        return AttnSpec(f"{self._prefix(model, i)}.attention", (sa, "query"), (sa, "key"), (sa, "value"),
                        (att.output, "dense"), sa, h, h, hd,
                        names=["self.query", "self.key", "self.value", "output.dense"])

    def set_heads(self, spec: AttnSpec, num_heads: int, num_kv_heads: int) -> None:
        spec.module.num_attention_heads = num_heads
        spec.module.all_head_size = num_heads * spec.head_dim

    def set_uniform_config(self, config: object, sizes: dict[str, int]) -> None:
        if sizes["num_attention_heads"] != config.num_attention_heads:
            raise ValueError("BERT head folds cannot be expressed in BertConfig")
        config.intermediate_size = sizes["intermediate_size"]
