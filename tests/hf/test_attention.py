"""Folded GQA attention against a hand computation from the original weights."""

from __future__ import annotations

import pytest
import torch
from hf_models import make_model

from modelfold.hf.adapters import find_adapter
from modelfold.hf.attention import fold_attention, fold_attention_with_labels


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _hand(h, cos, sin, wq, bq, wk, bk, wv, bv, wo, hd):
    """Causal softmax attention of heads given as lists of (q weight, q bias, kv index, o columns)."""
    T = h.shape[1]
    mask = torch.full((T, T), float("-inf")).triu(1)
    y = 0
    for q_w, q_b, g, o_cols in zip(wq, bq, range(len(wq)), wo, strict=True):
        q = _rope(h @ q_w.T + q_b, cos, sin)
        k = _rope(h @ wk[g].T + bk[g], cos, sin)
        v = h @ wv[g].T + bv[g]
        p = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + mask, -1)
        y = y + (p @ v) @ o_cols.T
    return y


@pytest.mark.parametrize("mode", ["query", "group"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_fold_matches_hand_computation(family, mode):
    torch.manual_seed(0)
    m = make_model(family)
    a = find_adapter(m)
    spec = a.attention(m, 1)
    hd = spec.head_dim
    assert (hd, spec.num_heads, spec.num_kv_heads) == (8, 4, 2)
    lin = {n: getattr(*getattr(spec, n)) for n in "qkvo"}
    W = {n: lin[n].weight.detach().clone() for n in "qkvo"}
    B = {n: (lin[n].bias.detach().clone() if lin[n].bias is not None else torch.zeros(lin[n].out_features))
         for n in "qkv"}
    h = torch.randn(1, 6, 32)
    pos = torch.arange(6)[None]
    cos, sin = m.model.rotary_emb(h, pos)

    def head(w, i):
        return w[i * hd:(i + 1) * hd]

    if mode == "query":
        labels = torch.tensor([0, 0, 1, 1])  # both query heads of group 0 merge; same for group 1 (k=1)
        clusters = [[0, 1], [2, 3]]
        kv_of = [0, 1]
        wq = [torch.stack([head(W["q"], i) for i in c]).mean(0) for c in clusters]
        bq = [torch.stack([head(B["q"], i) for i in c]).mean(0) for c in clusters]
        wk = [head(W["k"], g) for g in kv_of]
        bk = [head(B["k"], g) for g in kv_of]
        wv = [head(W["v"], g) for g in kv_of]
        bv = [head(B["v"], g) for g in kv_of]
        wo = [sum(W["o"][:, i * hd:(i + 1) * hd] for i in c) for c in clusters]
        expect_heads, expect_kv = 2, 2
    else:
        labels = torch.tensor([0, 0])  # the two KV groups (each with 2 query heads) merge
        wk = [(head(W["k"], 0) + head(W["k"], 1)) / 2] * 2
        bk = [(head(B["k"], 0) + head(B["k"], 1)) / 2] * 2
        wv = [(head(W["v"], 0) + head(W["v"], 1)) / 2] * 2
        bv = [(head(B["v"], 0) + head(B["v"], 1)) / 2] * 2
        wq = [(head(W["q"], j) + head(W["q"], 2 + j)) / 2 for j in range(2)]
        bq = [(head(B["q"], j) + head(B["q"], 2 + j)) / 2 for j in range(2)]
        wo = [W["o"][:, j * hd:(j + 1) * hd] + W["o"][:, (2 + j) * hd:(3 + j) * hd] for j in range(2)]
        expect_heads, expect_kv = 2, 1

    fold_attention_with_labels(spec, mode, labels, a)
    attn = spec.module
    assert attn.num_key_value_groups == expect_heads // expect_kv
    assert getattr(*spec.q).out_features == expect_heads * hd
    assert getattr(*spec.k).out_features == expect_kv * hd
    mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        got, _ = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask)
    want = _hand(h, cos[0], sin[0], wq, bq, wk, bk, wv, bv, wo, hd)
    assert torch.allclose(got[0], want[0], atol=1e-5), (got - want).abs().max()


def test_query_mode_merged_logits_are_member_mean():
    """In query mode a merged head's pre-softmax scores are the mean of its members' scores."""
    m = make_model("llama")
    a = find_adapter(m)
    spec = a.attention(m, 0)
    hd = spec.head_dim
    wq = getattr(*spec.q).weight.detach().clone()
    wk = getattr(*spec.k).weight.detach().clone()
    h = torch.randn(5, 32)
    scores = [(h @ wq[i * hd:(i + 1) * hd].T) @ (h @ wk[:hd].T).T for i in (0, 1)]
    fold_attention_with_labels(spec, "query", torch.tensor([0, 0, 1, 1]), a)
    wq2 = getattr(*spec.q).weight.detach()
    merged = (h @ wq2[:hd].T) @ (h @ wk[:hd].T).T
    assert torch.allclose(merged, (scores[0] + scores[1]) / 2, atol=1e-5)
    assert getattr(*spec.q).out_features == 2 * hd and spec.module.num_key_value_groups == 1


def test_identical_query_heads_fold_exactly():
    m = make_model("mistral")
    a = find_adapter(m)
    x = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        for i in range(3):
            spec = a.attention(m, i)
            hd = spec.head_dim
            q, o = getattr(*spec.q).weight, getattr(*spec.o).weight
            for g in range(spec.num_kv_heads):  # query head 2g+1 := copy of 2g, o columns split
                q[(2 * g + 1) * hd:(2 * g + 2) * hd] = q[2 * g * hd:(2 * g + 1) * hd]
                o[:, 2 * g * hd:(2 * g + 1) * hd] *= 0.5
                o[:, (2 * g + 1) * hd:(2 * g + 2) * hd] = o[:, 2 * g * hd:(2 * g + 1) * hd]
        y0 = m(x).logits
        f_spec = [a.attention(m, i) for i in range(3)]
        assert all(s.n_rep == 2 for s in f_spec)
    import modelfold

    f = modelfold.fold(m, ratio=0.5, targets="attention")
    assert f.config.num_attention_heads == 2 and f.config.num_key_value_heads == 2
    with torch.no_grad():
        assert torch.allclose(f(x).logits, y0, atol=1e-5)


def test_query_labels_must_keep_groups_uniform():
    m = make_model("llama")
    a = find_adapter(m)
    with pytest.raises(ValueError, match="same number"):
        fold_attention_with_labels(a.attention(m, 0), "query", torch.tensor([0, 0, 1, 2]), a)
    with pytest.raises(ValueError, match="KV group"):
        fold_attention_with_labels(a.attention(m, 0), "query", torch.tensor([0, 1, 0, 1]), a)


def test_fold_attention_reports_units():
    m = make_model("llama")
    a = find_adapter(m)
    before, after, err = fold_attention(a.attention(m, 0), 0.5, a)
    assert (before, after) == (4, 2) and 0.0 <= err <= 1.0


def test_round_to_rounds_head_counts_so_projection_widths_are_multiples():
    import modelfold

    bert = make_model("bert")  # 4 heads of head_dim 8 (plain multi-head: whole heads fold)
    f, rep = modelfold.fold(bert, ratio=0.75, targets="attention", round_to=16, return_report=True)
    assert [g.channels_after for g in rep.groups] == [2] * 3  # 1 head = 8 channels -> 2 heads = 16
    assert f.encoder.layer[0].attention.self.query.out_features == 16
    assert [g.channels_after for g in modelfold.fold(bert, ratio=0.75, targets="attention",
                                                     return_report=True)[1].groups] == [1] * 3
    llama = make_model("llama")  # GQA 4 query / 2 KV heads, head_dim 8
    q = modelfold.prune(llama, ratio=0.5, targets="attention", round_to=16)  # query mode: 2 x 1 x 8 = 16
    assert q.model.layers[0].self_attn.q_proj.out_features == 16
    g = modelfold.prune(llama, ratio=0.5, targets="attention", attention_mode="group", round_to=16)
    assert g.model.layers[0].self_attn.k_proj.out_features == 16  # 1 KV group = 8 channels: both kept
