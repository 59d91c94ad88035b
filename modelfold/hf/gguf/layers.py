"""Per-layer sizes and block-aligned widths for GGUF output (used by :func:`modelfold.hf.gguf.write.save_gguf`).

llama.cpp reads ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` as per-layer
arrays for every architecture, but only some of its loaders build each layer at its own size. Two of those
match the families modelfold compresses (facts from llama.cpp's ``llama-model.cpp`` / ``src/models/*.cpp``):

- ``deci`` (Nemotron-51B, ``build_deci``): llama tensor names, normal (pair-wise) RoPE like ``llama``, so Q/K
  rows (and Q/K biases) are permuted as for ``llama``; optional Q/K/V biases, added before RoPE as qwen2 does.
  -> llama, mistral, qwen2. (Older llama.cpp sources size the deci Q bias as the hidden width; the llama.cpp of
  llama-cpp-python 0.3.36 loads a qwen2 layer with fewer query heads and its bias, logits equal: tested.)
- ``openelm`` (``build_openelm``): fused QKV, per-head RMS norms on Q and K before RoPE, NeoX RoPE (the
  transformers layout, no permutation), no biases, and the output head is always the token embedding.
  -> qwen3 with tied embeddings and no attention bias.

Anything else with per-layer sizes is refused with the reason and the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...errors import UnsupportedModelError

#: transformers ``model_type`` -> the llama.cpp architecture that holds per-layer sizes for it.
PER_LAYER = {"llama": "deci", "mistral": "deci", "qwen2": "deci", "qwen3": "openelm"}
#: Architectures whose Q/K rows llama.cpp expects in its pair-wise RoPE order.
PERMUTE_QK = frozenset({"llama", "deci"})
#: Width multiple each GGUF type needs in a matrix row (``--round-to`` for compressing towards that type).
ROUND_TO = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32}

_WAY_OUT = ("Compress with one size for every layer (--budget uniform, or a uniform --ratio) to write GGUF, or "
            "save a transformers directory (--out DIR), which keeps per-layer sizes")


def choose_arch(config: Any, sizes: dict[str, list[int]], head_dim: int, sd: dict[str, torch.Tensor],
                default: str) -> str:
    """``default`` (the family's own GGUF architecture), or the per-layer one where llama.cpp needs it: per-layer
    sizes, or a qwen2 model with fewer query heads than hidden / head_dim (llama.cpp's qwen2 loader sizes the Q
    projection as hidden x hidden and refuses it: measured with llama-cpp-python 0.3.36)."""
    if any(len(set(v)) > 1 for v in sizes.values()):
        return per_layer_arch(config, sizes, sd)
    if config.model_type == "qwen2" and sizes["heads"][0] * head_dim != config.hidden_size:
        return PER_LAYER["qwen2"]
    return default


def per_layer_arch(config: Any, sizes: dict[str, list[int]], sd: dict[str, torch.Tensor]) -> str:
    """The llama.cpp architecture for a model with per-layer sizes, or ``UnsupportedModelError`` saying why none."""
    mt = config.model_type
    uneven = "; ".join(f"{k}: {v}" for k, v in sizes.items() if len(set(v)) > 1)
    if mt not in PER_LAYER:
        raise UnsupportedModelError(f"per-layer sizes ({uneven}) of a {mt!r} model cannot be written as GGUF: no "
                                    f"llama.cpp architecture builds its layers at different sizes. {_WAY_OUT}")
    if mt == "qwen3":
        why = None
        if not config.tie_word_embeddings:
            why = "it has a separate output head (tie_word_embeddings=False)"
        elif any(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")) for k in sd):
            why = "it has attention biases"
        if why:
            raise UnsupportedModelError(
                f"per-layer sizes ({uneven}) of a qwen3 model fit only llama.cpp's openelm architecture (q/k norms, "
                f"per-layer sizes), which always reads the output head from the token embedding and has no attention "
                f"biases; this model cannot go there: {why}. {_WAY_OUT}")
    return PER_LAYER[mt]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's RoPE row order for Q/K rows or biases (inverse of transformers' ``_reverse_permute_weights``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pad_ffn(sd: dict[str, torch.Tensor], n_layers: int, multiple: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Zero neurons appended (in place in ``sd``) so that layer i's FFN width is a multiple of ``multiple[i]``.

    A zero gate/up row gives silu(0) * 0 = 0 and a zero down column adds nothing: the model computes exactly
    the same function, and every matrix row splits into the quantization blocks. Returns {layer: (old, new)}.
    """
    padded = {}
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        if p + "down_proj.weight" not in sd or multiple.get(i, 1) <= 1:
            continue
        n = sd[p + "down_proj.weight"].shape[1]
        extra = -n % multiple[i]
        if not extra:
            continue
        for proj in ("gate_proj", "up_proj"):
            w = sd[p + f"{proj}.weight"]
            sd[p + f"{proj}.weight"] = torch.cat([w, w.new_zeros(extra, w.shape[1])])
            if p + f"{proj}.bias" in sd:
                b = sd[p + f"{proj}.bias"]
                sd[p + f"{proj}.bias"] = torch.cat([b, b.new_zeros(extra)])
        w = sd[p + "down_proj.weight"]
        sd[p + "down_proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra)], dim=1)
        padded[i] = (n, n + extra)
    return padded


def gguf_tensors(sd: dict[str, torch.Tensor], arch: str, sizes: dict[str, list[int]],
                 names: Any) -> Iterator[tuple[str, str, np.ndarray]]:
    """(transformers key, GGUF name, float32 array) for every tensor to write, in ``arch``'s layout."""
    for key, t in sd.items():
        base, _, suffix = key.rpartition(".")
        layer = int(base.split(".")[2]) if base.startswith("model.layers.") else -1
        if arch == "openelm" and base.endswith(("self_attn.k_proj", "self_attn.v_proj")):
            continue  # fused into attn_qkv at q_proj
        if arch == "openelm" and base.endswith("self_attn.q_proj"):
            p = base[: -len("q_proj")]
            data = torch.cat([sd[f"{p}{x}_proj.{suffix}"] for x in "qkv"])
            yield key, f"blk.{layer}.attn_qkv.{suffix}", data.detach().to(torch.float32).cpu().numpy()
            continue
        gname = names.get_name(base)
        if gname is None:
            raise UnsupportedModelError(f"no GGUF tensor name for {key} in the {arch} architecture")
        gname = f"{gname}.{suffix}"
        data = t.detach().to(torch.float32).cpu().numpy()
        if arch in PERMUTE_QK and (gname.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.bias",
                                                   ".attn_k.bias"))):
            data = permute(data, sizes["heads" if ".attn_q." in gname else "kv_heads"][layer])
        yield key, gname, data
