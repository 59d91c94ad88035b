"""Helpers of the llama.cpp GGUF tests: tiny decoders, their stored (quantize -> dequantize) weights, llama.cpp logits."""

from __future__ import annotations

import copy

import numpy as np
import torch


def tiny(family: str = "llama", tie: bool = True, seed: int = 0) -> torch.nn.Module:
    """hidden 128, 4 query / 2 KV heads of 32 (rows of every matrix split into 32-value blocks), 3 layers."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = cls[0](vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=tie)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, sharper predictions than the init gives
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.03))
    return model


def stored(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy of ``model`` holding what a GGUF of ``dtype`` stores: matrices quantized and dequantized by the
    ``gguf`` package (the writer's own quantizer), 1-D tensors unchanged (written as F32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim != 2 or dtype == "f32":
                continue
            a = p.detach().float().numpy()
            if dtype == "f16":
                a = a.astype(np.float16).astype(np.float32)
            else:
                a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).astype(np.float32)
            p.copy_(torch.from_numpy(a))
    return out


def llama_cpp_logits(path, ids: torch.Tensor) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[:len(ids)])


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |difference| / max |reference logit|."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())
