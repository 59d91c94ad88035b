"""Tiny random transformers models for the hf tests (built in code, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "bert")  # the families the older, broader tests run on
# every supported family (llama3: Llama with Llama 3 rope scaling); see tests/hf/test_families.py
ALL_FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
                "mixtral", "qwen2_moe", "qwen3_moe", "gpt2", "opt", "gpt_neox", "bert", "roberta", "distilbert", "mpnet",
                "modernbert")
ENCODERS = ("bert", "roberta", "distilbert", "mpnet", "modernbert")
FIXED_HEADS = ("mpnet",)  # head counts cannot change (attention targets refused); see tests/hf/test_fixed_heads.py
VOCAB = 61


def _config(family: str, layers: int, inter: int):
    T = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    gqa = dict(common, num_key_value_heads=2)
    rope3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    text = dict(gqa, head_dim=8, sliding_window=4, hidden_activation="gelu_pytorch_tanh")
    return {
        "llama": lambda: (T.LlamaConfig(**gqa, tie_word_embeddings=True), T.LlamaForCausalLM),
        "llama3": lambda: (T.LlamaConfig(**gqa, rope_parameters=rope3), T.LlamaForCausalLM),
        "mistral": lambda: (T.MistralConfig(**gqa, sliding_window=4), T.MistralForCausalLM),
        "qwen2": lambda: (T.Qwen2Config(**gqa), T.Qwen2ForCausalLM),
        "qwen3": lambda: (T.Qwen3Config(**gqa, head_dim=8), T.Qwen3ForCausalLM),
        "gemma": lambda: (T.GemmaConfig(**dict(gqa, head_dim=8, hidden_activation="gelu_pytorch_tanh")),
                          T.GemmaForCausalLM),
        "gemma2": lambda: (T.Gemma2Config(**text, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                          query_pre_attn_scalar=8), T.Gemma2ForCausalLM),
        "gemma3_text": lambda: (T.Gemma3TextConfig(**text, query_pre_attn_scalar=8), T.Gemma3ForCausalLM),
        "phi3": lambda: (T.Phi3Config(**gqa, pad_token_id=0), T.Phi3ForCausalLM),
        "mixtral": lambda: (T.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2), T.MixtralForCausalLM),
        "qwen2_moe": lambda: (T.Qwen2MoeConfig(**gqa, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter,
                                               shared_expert_intermediate_size=inter), T.Qwen2MoeForCausalLM),
        "qwen3_moe": lambda: (T.Qwen3MoeConfig(**gqa, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter,
                                               mlp_only_layers=[0], head_dim=8), T.Qwen3MoeForCausalLM),
        "gpt2": lambda: (T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=inter, n_layer=layers, n_head=4,
                                      n_positions=64, attn_implementation="eager"), T.GPT2LMHeadModel),
        "opt": lambda: (T.OPTConfig(**{k: v for k, v in common.items() if k != "intermediate_size"}, ffn_dim=inter,
                                    word_embed_proj_dim=32, pad_token_id=1), T.OPTForCausalLM),
        "gpt_neox": lambda: (T.GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=True,
                                             attention_bias=True), T.GPTNeoXForCausalLM),
        "bert": lambda: (T.BertConfig(**common, hidden_act="gelu"), T.BertModel),
        "roberta": lambda: (T.RobertaConfig(**dict(common, max_position_embeddings=72), pad_token_id=1),
                            T.RobertaModel),
        "distilbert": lambda: (T.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=inter, n_layers=layers,
                                                  n_heads=4, max_position_embeddings=64, attn_implementation="eager"),
                               T.DistilBertModel),
        "mpnet": lambda: (T.MPNetConfig(**{k: v for k, v in common.items() if k != "attn_implementation"},
                                        hidden_act="gelu"), T.MPNetForMaskedLM),
        "modernbert": lambda: (T.ModernBertConfig(**common, global_attn_every_n_layers=2, local_attention=4,
                                                  pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0,
                                                  sep_token_id=0, mlp_bias=True, attention_bias=True),
                               T.ModernBertModel),
    }[family]()


def _gemma3(layers: int, inter: int):
    T = transformers
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                max_position_embeddings=64, query_pre_attn_scalar=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=60,
                         boi_token_index=58, eoi_token_index=59, attn_implementation="eager")
    return T.Gemma3ForConditionalGeneration(cfg)


def make_model(family: str, seed: int = 0, layers: int = 3, inter: int = 48) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` in eval mode (GQA 4 query / 2 KV heads for the decoders that have it)."""
    torch.manual_seed(seed)
    if family == "gemma3":
        model = _gemma3(layers, inter)
    else:
        cfg, cls = _config(family, layers, inter)
        model = cls(cfg, add_pooling_layer=False) if family in ("bert", "roberta") else cls(cfg)
    with torch.no_grad():  # non-trivial biases and norms so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 58, (2, 9), generator=g)


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state
