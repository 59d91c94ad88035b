"""Perplexity windows, the Wikipedia split and embedding cosine on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import byte_tokenizer, tiny_bert, tiny_llama

import modelfold.evaluate.text as text_mod
from modelfold.errors import ModelFoldError, UnsupportedModelError
from modelfold.evaluate import (
    embedding_cosine,
    embedding_cosines,
    eval_windows,
    perplexity,
    sentence_embeddings,
    wiki_articles,
    wiki_split,
    wiki_text,
    window_starts,
)

TEXT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 bytes


def test_perplexity_is_exp_mean_nll_by_hand() -> None:
    tok, model = byte_tokenizer(), tiny_llama()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT) == 135
    ctx, step = 16, 15
    total = len(ids) // step  # 9 windows fit; asking for all of them uses every one
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(total):
            w = torch.tensor([256] + ids[k * step:(k + 1) * step])
            logp = model(w[None]).logits[0].log_softmax(-1)
            nll -= float(sum(logp[i, w[i + 1]] for i in range(len(w) - 1)))
            count += len(w) - 1
    got = perplexity(model, tok, TEXT, ctx=ctx, windows=total)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    # Without BOS: windows of ctx text tokens, ctx - 1 predictions each, a different number.
    no_bos = perplexity(model, tok, TEXT, ctx=ctx, windows=total, bos=False)
    assert no_bos != pytest.approx(got, rel=1e-6)
    assert perplexity(model, byte_tokenizer(bos=False), TEXT, ctx=ctx, windows=total) == pytest.approx(no_bos)


def test_window_selection_is_deterministic_and_evenly_spread() -> None:
    starts = window_starts(720_000, 511, 12)
    assert starts == window_starts(720_000, 511, 12)
    assert len(starts) == 12 and starts[0] == 0 and starts[-1] == (720_000 // 511 - 1) * 511
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 511 and max(gaps) - min(gaps) <= 511  # non-overlapping, evenly spaced
    assert window_starts(100, 10, 50) == [10 * k for k in range(10)]  # more asked than fit: every window once
    assert window_starts(100, 10, 1) == [0]
    with pytest.raises(ModelFoldError, match="fewer than one window"):
        window_starts(5, 10, 3)
    tok = byte_tokenizer()
    a, b = eval_windows(tok, TEXT, ctx=16, windows=4), eval_windows(tok, TEXT, ctx=16, windows=4)
    assert torch.equal(a, b) and a.shape == (4, 16) and bool((a[:, 0] == tok.bos_token_id).all())
    assert tok.decode(a[0, 1:]) == TEXT[:15] and tok.decode(a[-1, 1:]) == TEXT[8 * 15:9 * 15]


def test_wiki_articles() -> None:
    arts = wiki_articles()
    assert len(arts) > 100 and wiki_text() == "\n\n".join(arts) and all(len(a) > 200 for a in arts)
    assert not any("\'\'\'" in a for a in arts)


def test_wiki_split_is_disjoint_from_the_evaluation_windows(monkeypatch) -> None:
    # The logic on the first 8 articles (the whole corpus is one token per byte here: 3M tokens, slow).
    sub = tuple(wiki_articles()[:8])
    monkeypatch.setattr(text_mod, "_articles", lambda: sub)
    tok = byte_tokenizer()
    calib, ev = wiki_split("calib", tok, windows=4), wiki_split("eval", tok, windows=4)
    assert len(calib) + len(ev) == len(sub) and not set(calib) & set(ev) and 2 <= len(ev) <= 8
    assert [a for a in sub if a in set(calib)] == calib  # corpus order
    calib_text, eval_text = "\n\n".join(calib), "\n\n".join(ev)
    assert wiki_text("calib", tok, windows=4) == calib_text
    for w in eval_windows(tok, ctx=512, windows=4):
        chunk = tok.decode(w[1:])
        assert chunk in eval_text and chunk[100:300] not in calib_text
    with pytest.raises(ModelFoldError, match="'eval' or 'calib'"):
        wiki_split("train", tok)


def test_perplexity_errors() -> None:
    tok = byte_tokenizer()
    with pytest.raises(UnsupportedModelError, match="causal language model"):
        perplexity(tiny_bert(), tok, TEXT, ctx=16)
    with pytest.raises(ModelFoldError, match="context length 64"):
        perplexity(tiny_llama(), tok, TEXT, ctx=128)
    with pytest.raises(ModelFoldError, match="longer text or a smaller"):
        perplexity(tiny_llama(), tok, "short", ctx=16)
    with pytest.raises(ModelFoldError, match="no BOS"):
        perplexity(tiny_llama(), byte_tokenizer(bos=False), TEXT, ctx=16, bos=True)


def test_perplexity_leaves_the_model_as_it_was() -> None:
    model = tiny_llama().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perplexity(model, byte_tokenizer(), TEXT, ctx=16, windows=2)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_embedding_cosine() -> None:
    tok, a = byte_tokenizer(), tiny_bert(0)
    sents = ["a short one", "a considerably longer sentence, padded less", "mid length text"]
    assert embedding_cosine(a, a, tok, sents) == pytest.approx(1.0, abs=1e-6)
    # Padding does not leak into the mean pool: alone == inside a padded batch.
    alone = sentence_embeddings(a, tok, sents[:1])
    assert torch.allclose(alone[0], sentence_embeddings(a, tok, sents)[0], atol=1e-5)
    b = tiny_bert(1)
    cos = embedding_cosines(a, b, tok, sents)
    ea, eb = sentence_embeddings(a, tok, sents), sentence_embeddings(b, tok, sents)
    assert torch.allclose(cos, (ea * eb).sum(-1)) and float(cos.max()) < 0.999
    assert embedding_cosine(a, b, tok, sents) == pytest.approx(float(cos.mean()))
