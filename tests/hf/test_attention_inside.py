"""Narrowing head_dim inside the heads (modelfold.hf.attention_inside): exact algebra, config, save/reload."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from modelfold.errors import UnsupportedModelError  # noqa: E402
from modelfold.hf import attention_inside as ai  # noqa: E402
from modelfold.hf.adapters import find_adapter  # noqa: E402
from modelfold.hf.adapters.refs import get, linear_like, put  # noqa: E402
from modelfold.report import count_params  # noqa: E402

VOCAB = 53


def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    T = transformers
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    cfg, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                "mistral": (T.MistralConfig, T.MistralForCausalLM)}[family]
    torch.manual_seed(seed)
    m = cls(cfg(**kw)).eval()
    with torch.no_grad():  # random biases too (Qwen2 has q/k/v biases), so they are exercised
        for p in m.parameters():
            if p.ndim == 1 and p.shape[0] != 64:
                p.normal_(0, 0.3)
    return m


def ids(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(m, x):
    with torch.no_grad():
        return m(input_ids=x).logits


def simulated(model, pairs, bases):
    """The original shapes with the dropped pairs' q rows zeroed and v projected on the bases (P P^T)."""
    m = __import__("copy").deepcopy(model)
    a = find_adapter(m)
    for i in range(len(a.layers(m))):
        spec = a.attention(m, i)
        hd, half = spec.head_dim, spec.head_dim // 2
        q = get(spec.q)
        drop = torch.tensor([j for j in range(half) if j not in pairs])
        rows = torch.cat([drop, drop + half])
        w, b = q.weight.detach().clone().view(spec.num_heads, hd, -1), q.bias
        w[:, rows] = 0
        b = None if b is None else b.detach().clone().view(spec.num_heads, hd)
        if b is not None:
            b[:, rows] = 0
        put(spec.q, linear_like(w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1)))
        v = get(spec.v)
        pp = torch.block_diag(*[p @ p.T for p in bases[i]])
        put(spec.v, linear_like(pp @ v.weight.detach(), None if v.bias is None else pp @ v.bias.detach()))
    return m


@pytest.mark.parametrize("family,mode", [("llama", "free"), ("qwen2", "free"), ("mistral", "theta")])
def test_narrowed_model_is_the_projected_original(family, mode):
    """Narrow q/k to chosen rotary pairs and v/o to random subspaces, write the config: the smaller
    model computes exactly what the original computes with those pairs zeroed and v projected."""
    model = tiny(family)
    a = find_adapter(model)
    hd, dn = 16, 10
    pairs = [0, 2, 3, 5, 7] if mode == "free" else [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(3)
    bases = [[torch.linalg.qr(torch.randn(hd, dn, generator=g)).Q for _ in range(2)] for _ in range(2)]
    ref = simulated(model, pairs, bases)
    inv = model.model.rotary_emb.inv_freq.detach().float()
    work = __import__("copy").deepcopy(model)
    for i in range(2):
        ai.narrow_block(a.attention(work, i), pairs, bases[i], dn)
    rope = ai.set_config(work, inv, pairs, dn)
    assert rope["rope_type"] == ("longrope" if mode == "free" else "default")
    x = ids()
    torch.testing.assert_close(logits(work, x), logits(ref, x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(model, x), logits(ref, x), atol=1e-3)  # the projection did change it
    assert get(a.attention(work, 0).q).out_features == 4 * dn and get(a.attention(work, 0).v).out_features == 2 * dn


def test_theta_pairs_keep_plain_rope_with_new_theta():
    model = tiny()
    inv = model.model.rotary_emb.inv_freq.detach().float()
    rope = ai.rope_parameters(model.config, inv, [0, 2, 4], 6)
    assert rope["rope_type"] == "default"
    assert math.isclose(rope["rope_theta"], model.config.rope_parameters["rope_theta"] ** (2 * 6 / 16))
    scores = torch.tensor([1.0, 0, 1, 0, 1, 0, 0, 0])
    assert ai.choose_pairs(scores, 3, "theta") == [0, 2, 4]
    assert ai.choose_pairs(scores + torch.arange(8) * 0.01, 3, "free") == [0, 2, 4]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_reload_identical(tmp_path, family):
    model = tiny(family)
    small, rep = ai.narrow_heads(model, 10, calibration=ids(6, 32), return_report=True)
    assert small.config.head_dim == 10 and len(rep.pairs) == 5
    removed = 1 - count_params(small) / count_params(model)
    attn = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n)
    assert math.isclose(removed * count_params(model), attn * 6 / 16, rel_tol=1e-6)
    small.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert back.config.head_dim == 10
    x = ids(2, 40, seed=5)
    assert torch.equal(logits(back, x), logits(small, x))


def test_nothing_removed_is_the_identity():
    model = tiny("qwen2")
    same = ai.narrow_heads(model, 16, calibration=ids())
    x = ids(2, 20, seed=7)
    assert torch.equal(logits(same, x), logits(model, x))
    assert same is not model and getattr(same.config, "head_dim", 16) == 16


@pytest.mark.parametrize("subspace", ["rrr", "pca"])
def test_refit_never_increases_output_error(subspace):
    """With the evaluation inputs as calibration, the least-squares o_proj is at least as good as the
    plain projection on every layer (the refit minimises exactly that error)."""
    model = tiny("llama", seed=2)
    _, rep = ai.narrow_heads(model, 8, calibration=ids(), subspace=subspace, lam=1e-9, return_report=True)
    assert len(rep.errors) == 2
    for e, p in zip(rep.errors, rep.errors_plain, strict=True):
        assert e <= p + 1e-9
    assert min(p - e for e, p in zip(rep.errors, rep.errors_plain, strict=True)) > 1e-4  # it did something


def test_refused_families_and_widths():
    m = tiny()
    with pytest.raises(ValueError, match="even"):
        ai.narrow_heads(m, 7, calibration=ids())
    with pytest.raises(ValueError, match="pairs"):
        ai.choose_pairs(torch.ones(4), 2, "middle")
    T = transformers
    q3 = T.Qwen3ForCausalLM(T.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(UnsupportedModelError):
        ai.narrow_heads(q3, 4, calibration=ids())


def test_theta_pairs_round_trip_through_gguf(tmp_path):
    """pairs="theta" keeps plain RoPE (a new rope_theta): the GGUF writer and transformers' GGUF loader
    carry it; the longrope factors of pairs="free" are refused by the writer instead of being dropped."""
    pytest.importorskip("gguf")
    from modelfold.hf import save_gguf

    model = tiny("llama")
    small = ai.narrow_heads(model, 10, calibration=ids(6, 32), pairs="theta")
    save_gguf(small, tmp_path / "x.gguf", dtype="f32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="x.gguf").eval()
    assert back.config.head_dim == 10
    x = ids(2, 40, seed=5)
    torch.testing.assert_close(logits(back, x), logits(small, x), rtol=1e-5, atol=1e-5)
    free = ai.narrow_heads(model, 10, calibration=ids(6, 32), pairs="free")
    if free.config.rope_parameters["rope_type"] == "longrope":
        with pytest.raises(UnsupportedModelError, match="longrope"):
            save_gguf(free, tmp_path / "y.gguf", dtype="f32")
