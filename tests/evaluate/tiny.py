"""A byte-level tokenizer and tiny random models for the evaluation tests (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def byte_tokenizer(bos: bool = True):
    """One token per UTF-8 byte (exact decode, character offsets), plus <s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["<pad>"] = len(vocab), len(vocab) + 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>" if bos else None,
                                                pad_token="<pad>")


VOCAB = 258


def tiny_llama(seed: int = 0, ctx: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx,
                                   bos_token_id=256, eos_token_id=256, pad_token_id=257)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=257)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()
