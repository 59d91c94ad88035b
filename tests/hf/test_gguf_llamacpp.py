"""llama.cpp itself reads the GGUF files modelfold writes. Needs llama-cpp-python: scripts/install.sh installs the
portable prebuilt wheel from ../shared/wheels/ when it lies beside the repo (see docs/gguf.md); skipped otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh installs it from "
    "../shared/wheels/llama_cpp_python-*.whl when present; pip install llama-cpp-python compiles it for ~1 h)")
transformers = pytest.importorskip("transformers")

import modelfold  # noqa: E402
from modelfold.hf import save_gguf  # noqa: E402


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_cpp_logits(path, ids: torch.Tensor) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[:len(ids)])


@pytest.mark.parametrize("targets", ["mlp", "all"])
def test_llama_cpp_logits_equal_the_folded_model(tmp_path, targets) -> None:
    model = modelfold.fold(tiny(), ratio=0.5, targets=targets)  # all: 4 -> 2 heads, key_length != hidden/heads
    save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    ids = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[None]).logits[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", ids) - ref).max() < 1e-3
