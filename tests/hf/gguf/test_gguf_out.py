"""GGUF output: tiny random decoders written, reloaded by transformers (gguf_file=), compared exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import make_model

import modelfold
import modelfold.hf
from modelfold.errors import CheckpointError, ModelFoldError, UnsupportedModelError
from modelfold.hf import save_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

transformers = pytest.importorskip("transformers")


def tiny(family: str = "llama", seed: int = 0, inter: int = 128) -> torch.nn.Module:
    """hidden 64 (two Q8_0/Q4_1 blocks per row), 4 query / 2 KV heads, head_dim 16."""
    torch.manual_seed(seed)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    cfg = cls[0](vocab_size=64, hidden_size=64, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=family == "llama")
    return cls[1](cfg).eval()


def reload(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def logits(m: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(x).logits


def stored(w: torch.Tensor, qtype) -> torch.Tensor:
    """What a tensor of type ``qtype`` holds after writing: the gguf package's own quantize -> dequantize."""
    a = w.detach().float().numpy()
    if qtype == T.F32:
        return torch.from_numpy(a)
    if qtype == T.F16:
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).astype(np.float32))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_1"])
def test_folded_llama_reloads_to_the_written_weights(tmp_path, dtype) -> None:
    model = modelfold.fold(tiny(), ratio=0.5, targets="all")  # 4 -> 2 heads, FFN 128 -> 64: head_dim != hidden/heads
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 64
    info = save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    again = reload(tmp_path / "m.gguf")
    qtype = T[dtype.upper()]
    got = dict(again.named_parameters())
    for name, p in model.named_parameters():  # Q/K went through llama.cpp's RoPE permutation and back
        want = stored(p, qtype if p.ndim == 2 else T.F32)
        assert torch.equal(got[name].detach(), want), name
    # 15 matrices (2 layers x 7 + the tied embedding) in the asked type, 5 norms in F32
    assert info.types == ({"F32": 20} if dtype == "f32" else {qtype.name: 15, "F32": 5}) and not info.fallbacks
    diff = (logits(again) - logits(model)).abs().max()
    tol = {"f32": 0.0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_1": 0.3}[dtype]
    assert diff <= tol


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_families_exact_in_f32(tmp_path, family) -> None:
    model = tiny(family)
    if modelfold.hf.is_supported(model):  # qwen3 folds once its adapter lands; writing does not depend on it
        model = modelfold.fold(model, ratio=0.25, targets="mlp")
    save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert torch.equal(logits(reload(tmp_path / "m.gguf")), logits(model))


def test_unaligned_width_falls_back_to_f16_and_source_metadata_is_kept(tmp_path) -> None:
    src = tmp_path / "src.gguf"
    save_gguf(tiny(), src, dtype="q8_0")
    model = modelfold.fold(reload(src), ratio=0.3, targets="mlp")  # FFN 128 -> 90: not a multiple of 32
    info = save_gguf(model, tmp_path / "out.gguf", dtype="source", source=src, pad=False)
    assert sorted(info.fallbacks) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == T.F16 and types["blk.0.ffn_up.weight"] == T.Q8_0
    assert r.fields["llama.feed_forward_length"].contents() == 90
    assert r.fields["general.name"].contents() == gguf.GGUFReader(src).fields["general.name"].contents()
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    again = reload(tmp_path / "out.gguf")
    for name, p in model.named_parameters():
        q = T.F16 if "down_proj" in name else (T.Q8_0 if p.ndim == 2 else T.F32)
        assert torch.equal(dict(again.named_parameters())[name].detach(), stored(p, q)), name


def test_unaligned_width_is_padded_by_default(tmp_path) -> None:
    """pad=True (default): 90 zero-padded to 96 neurons, every matrix Q8_0; transformers reloads the padded model,
    whose real neurons hold the quantized weights and whose padding is zero."""
    model = modelfold.fold(tiny(), ratio=0.3, targets="mlp")
    info = save_gguf(model, tmp_path / "out.gguf", dtype="q8_0")
    assert info.padded == {0: (90, 96), 1: (90, 96)} and not info.fallbacks and info.types["Q8_0"] == 15
    assert info.arch == "llama" and "padded with zero neurons" in str(info)
    again = reload(tmp_path / "out.gguf")
    assert again.config.intermediate_size == 96
    mlp, ref = again.model.layers[0].mlp, model.model.layers[0].mlp
    assert torch.equal(mlp.up_proj.weight[90:], torch.zeros(6, 64)) and torch.equal(mlp.down_proj.weight[:, 90:],
                                                                                   torch.zeros(64, 6))
    assert torch.equal(mlp.up_proj.weight[:90], stored(ref.up_proj.weight, T.Q8_0))
    assert (logits(again) - logits(model)).abs().max() <= 2e-2


def test_per_layer_sizes_are_written_as_deci(tmp_path) -> None:
    from gguf import GGUFValueType

    model = modelfold.fold(tiny(), ratio=0.5, targets="mlp", skip_first=1)  # layer 0 kept: 128, layer 1: 64
    info = save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert info.arch == "deci" and r.fields["general.architecture"].contents() == "deci"
    assert list(r.fields["deci.feed_forward_length"].contents()) == [128, 64]
    assert list(r.fields["deci.attention.head_count"].contents()) == [4, 4]
    assert r.fields["deci.attention.key_length"].contents() == 16
    # Such a file (ours, or from another tool): load_any refuses it cleanly instead of transformers' error.
    with pytest.raises(UnsupportedModelError, match="per-layer sizes"):
        modelfold.hf.load_any(tmp_path / "m.gguf")
    save_gguf(tiny(), tmp_path / "u.gguf", dtype="f32")
    r = gguf.GGUFReader(tmp_path / "u.gguf")
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        value = [128, 128] if f.name == "llama.feed_forward_length" else f.contents()
        vtype = GGUFValueType.ARRAY if f.name == "llama.feed_forward_length" else f.types[0]
        w.add_key_value(f.name, value, vtype, sub_type=GGUFValueType.UINT32 if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="per-layer sizes"):
        modelfold.hf.load_any(tmp_path / "a.gguf")


def test_per_layer_from_a_source_gguf_renames_its_keys(tmp_path) -> None:
    src = tmp_path / "src.gguf"
    save_gguf(tiny(), src, dtype="f32")
    model = modelfold.fold(reload(src), ratio={0: 0.0, 1: 0.5}, targets="mlp")
    save_gguf(model, tmp_path / "m.gguf", dtype="f16", source=src)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    keys = set(r.fields)
    assert not any(k.startswith("llama.") for k in keys)
    assert {"deci.rope.freq_base", "deci.context_length", "tokenizer.ggml.model"} <= keys
    assert list(r.fields["deci.feed_forward_length"].contents()) == [128, 64]
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)


def test_errors_write_nothing(tmp_path) -> None:
    out = tmp_path / "m.gguf"
    with pytest.raises(UnsupportedModelError, match="not 'bert'"):
        save_gguf(make_model("bert"), out)
    with pytest.raises(ModelFoldError, match="unknown GGUF type"):
        save_gguf(tiny(), out, dtype="q3_k")
    with pytest.raises(ModelFoldError, match="needs source="):
        save_gguf(tiny(), out, dtype="source")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(CheckpointError, match="cannot read the source GGUF"):
        save_gguf(tiny(), out, source=tmp_path / "bad.gguf")
    save_gguf(tiny("qwen2"), tmp_path / "q.gguf", dtype="f32")
    with pytest.raises(CheckpointError, match="is a 'qwen2' GGUF"):
        save_gguf(tiny(), out, source=tmp_path / "q.gguf")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "q.gguf"]


def test_cli_gguf_in_gguf_out(tmp_path, capsys) -> None:
    from modelfold.cli import main
    from modelfold.hf import load_any

    src = tmp_path / "src.gguf"
    save_gguf(tiny(), src, dtype="f32")
    out = tmp_path / "folded.gguf"
    assert main(["fold", str(src), "--ratio", "0.25", "--out", str(out), "--gguf-type", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    ref = modelfold.fold(load_any(src), ratio=0.25, targets="mlp")
    assert torch.equal(logits(reload(out)), logits(ref))
    assert main(["fold", str(src), "--ratio", "0.25", "--out", str(out), "--stream", "always"]) == 2
    assert "--stream always" in capsys.readouterr().err
    assert main(["fold", "resnet18_fmnist", "--ratio", "0.25", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "transformers causal LMs" in capsys.readouterr().err


def test_cli_quantized_gguf_output_rounds_widths_to_the_block(tmp_path, capsys) -> None:
    """A quantized --gguf-type makes kept widths multiples of its 32-value block (no zero padding); an
    explicit --round-to 1 keeps exact widths, which the writer pads."""
    from modelfold.cli import main

    src = tmp_path / "src.gguf"
    save_gguf(tiny(inter=160), src, dtype="f32")  # 160 * 0.7 = 112: not a multiple of 32
    widths = {}
    for name, extra in (("auto", []), ("exact", ["--round-to", "1"])):
        out = tmp_path / f"{name}.gguf"
        assert main(["prune", str(src), "--ratio", "0.3", "--out", str(out), "--gguf-type", "q8_0", *extra]) == 0
        printed = capsys.readouterr().out
        assert ("blocks of 32" in printed) == (name == "auto")
        assert ("padded with zero neurons" in printed) == (name == "exact")
        r = gguf.GGUFReader(str(out))
        ffn = next(f for k, f in r.fields.items() if k.endswith("feed_forward_length"))
        widths[name] = int(ffn.parts[ffn.data[0]][0])
    assert widths["auto"] in (96, 128) and widths["exact"] == 128  # 112 kept, stored padded to 128
