"""Sentence-embedding encoder families beyond BERT: MPNet (heads fixed, MLPs fold) and ModernBERT specifics.

MPNet's relative position bias (``encoder.relative_attention_bias``) has one column per head and is added to
every layer's attention scores, so no layer's head count can change: attention targets are refused with an
``UnsupportedModelError`` naming ``targets='mlp'``, before any calibration or file work. Its MLPs run the
steps of ``test_families.test_family_folds_exactly_saves_reloads_and_streams`` here (that test needs heads).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import VOCAB, inputs, make_model, out
from test_families import _tensors, _vanilla, duplicate

import modelfold
import modelfold.hf as mh
from modelfold.errors import ResultError, UnsupportedModelError
from modelfold.hf.adapters import find_adapter
from modelfold.hf.checkpoint.calibrated import compress_checkpoint
from modelfold.hf.plan import make_plan
from modelfold.hf.sizing import plan_removed
from modelfold.report import count_params

IDS = torch.randint(2, 58, (4, 12), generator=torch.Generator().manual_seed(0))


class _WordTokenizer:
    """Enough of a tokenizer for calibration='self' on an encoder (random whole words between CLS and SEP)."""

    cls_token_id, sep_token_id = 0, 2

    def get_vocab(self) -> dict[str, int]:
        return {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{chr(97 + i % 26)}{chr(97 + i // 26)}": i for i in range(3, VOCAB)}}


def _mpnet_model(layers: int = 2) -> torch.nn.Module:
    """MPNetModel with its pooler (the class sentence-transformers loads)."""
    import transformers as T

    m = make_model("mpnet", layers=layers)
    torch.manual_seed(0)
    base = T.MPNetModel(m.config)
    base.load_state_dict(m.mpnet.state_dict(), strict=False)
    return base.eval()


@pytest.mark.parametrize("cls", ["MPNetForMaskedLM", "MPNetModel"])
def test_mpnet_mlps_fold_exactly_save_reload_and_stream(cls, tmp_path):
    m = make_model("mpnet", layers=2) if cls == "MPNetForMaskedLM" else _mpnet_model()
    assert type(m).__name__ == cls and mh.is_supported(m)
    duplicate(m)
    x, a = inputs(), find_adapter(m)
    y = out(m, x)
    f = mh.fold_model(m, ratio=0.5)  # targets="mlp", the default
    assert torch.allclose(out(f, x), y, atol=2e-5, rtol=1e-4)
    assert [a.mlp(f, i).width for i in range(2)] == [24, 24] and a.attention(f, 1).num_heads == 4
    mh.save(f, tmp_path / "uniform")  # uniform MLP fold: vanilla from_pretrained (intermediate_size written)
    assert torch.equal(out(_vanilla(tmp_path / "uniform"), x), out(f, x))

    plan = {0: 0.25, 1: 0.5}
    p = mh.fold_model(m, ratio=plan, seed=1)
    mh.save(p, tmp_path / "plan")
    assert torch.equal(out(mh.load_pretrained(tmp_path / "plan"), x), out(p, x))
    with pytest.raises(Exception, match="mismatch|size"):
        _vanilla(tmp_path / "plan")
    src = tmp_path / "src"
    m.save_pretrained(src, max_shard_size="40KB")
    mh.fold_checkpoint(src, tmp_path / "st", ratio=plan, seed=1, progress=False)
    st, ref = _tensors(tmp_path / "st"), _tensors(tmp_path / "plan")
    assert set(st) == set(_tensors(src)) and all(torch.equal(st[k], ref[k]) for k in st)
    mh.prune_checkpoint(src, tmp_path / "pst", ratio=0.5, progress=False)
    assert torch.equal(out(mh.load_pretrained(tmp_path / "pst"), x), out(mh.prune_model(m, ratio=0.5), x))


def test_mpnet_sizing_and_calibrated_compression(tmp_path):
    m = make_model("mpnet", layers=2, inter=40)
    a, total = find_adapter(m), count_params(m)
    for ratio in (0.3, 0.75):
        assert plan_removed(m, a, make_plan(ratio, 2, "mlp")) == total - count_params(mh.prune_model(m, ratio)) > 0
    f, rep = modelfold.fold(m, sparsity=0.15, return_report=True, n_init=1)
    assert abs(rep.param_sparsity - 0.15) <= 0.01

    d = make_model("mpnet", layers=2)
    duplicate(d)
    x = inputs()
    c = mh.compress_model(d, ratio=0.5, calibration=IDS, method="fold", compensate="none", n_init=1)
    assert torch.allclose(out(c, x), out(d, x), atol=5e-5, rtol=1e-4)
    # calibration="self": an encoder calibrates on random vocabulary words (needs the tokenizer)
    g, rep = mh.compress_model(d, sparsity=0.1, calibration="self", tokenizer=_WordTokenizer(), n_calib=4,
                               calib_len=10, return_report=True)
    assert rep.repair_info["source"] == "random-words" and rep.repair_info["calibration"] == "self"
    mh.save(g, tmp_path / "g")
    assert torch.equal(out(mh.load_pretrained(tmp_path / "g"), x), out(g, x))
    d.save_pretrained(tmp_path / "src")
    compress_checkpoint(tmp_path / "src", tmp_path / "lbl", ratio={0: 0.3, 1: 0.5}, calibration="self",
                        tokenizer=_WordTokenizer(), n_calib=4, calib_len=10, progress=False)
    lbl = mh.load_pretrained(tmp_path / "lbl")
    assert [find_adapter(lbl).mlp(lbl, i).width for i in range(2)] == [34, 24] and torch.isfinite(out(lbl, x)).all()


REFUSED = [
    ("fold all", lambda m, p: mh.fold_model(m, ratio=0.5, targets="all")),
    ("prune attention", lambda m, p: mh.prune_model(m, ratio=0.5, targets="attention")),
    ("plan entry", lambda m, p: mh.prune_model(m, ratio={1: {"mlp": 0.5, "attention": 0.5}})),
    ("sparsity", lambda m, p: modelfold.fold(m, sparsity=0.2, targets="all")),
    # refused before the calibration data are made ("self" without a tokenizer would fail otherwise)
    ("compress", lambda m, p: mh.compress_model(m, sparsity=0.2, calibration="self", targets="all")),
    ("fold_checkpoint", lambda m, p: mh.fold_checkpoint(p, p.parent / "out", 0.5, targets="all", progress=False)),
    ("prune_checkpoint", lambda m, p: mh.prune_checkpoint(p, p.parent / "out", {0: {"attention": 0.3}},
                                                          progress=False)),
    ("compress_checkpoint", lambda m, p: compress_checkpoint(p, p.parent / "out", 0.5, calibration="self",
                                                             targets="all", progress=False)),
]


@pytest.mark.parametrize("name,call", REFUSED, ids=[r[0] for r in REFUSED])
def test_mpnet_head_changes_are_refused_naming_the_way_out(name, call, tmp_path):
    m = make_model("mpnet", layers=2)
    m.save_pretrained(tmp_path / "src")
    with pytest.raises(UnsupportedModelError, match=r"mpnet: attention heads cannot be .*relative_attention_bias"
                                                    r".*targets='mlp'"):
        call(m, tmp_path / "src")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written


def test_mpnet_refusal_is_needed(monkeypatch):
    """Without the refusal, one layer with fewer heads cannot add the shared (all-heads) position bias."""
    m = make_model("mpnet", layers=2)
    monkeypatch.setattr(find_adapter(m), "fixed_heads", None)
    with pytest.raises(ResultError, match="size of tensor"):
        mh.prune_model(m, ratio={1: {"attention": 0.5}})


def test_modernbert_glu_halves_local_global_layers_and_masked_lm(tmp_path):
    import transformers as T

    m = make_model("modernbert", layers=2)
    assert m.config.layer_types == ["full_attention", "sliding_attention"] and m.config.sliding_window < 9
    a = find_adapter(m)
    spec = a.mlp(m, 1)
    w = m.layers[1].mlp.Wi.weight.detach().clone()
    p = mh.prune_model(m, ratio={0: {"attention": 0.5}, 1: {"mlp": 0.5, "attention": 0.25}})
    kept = p.layers[1].mlp.Wi.weight
    assert spec.width == 48 and kept.shape == (48, 32)  # 24 neurons: [input; gate] halves stay paired
    rows = [int((w[:48] == r).all(1).nonzero()) for r in kept[:24]]
    assert torch.equal(kept[24:], w[48:][rows])
    assert [a.attention(p, i).num_heads for i in range(2)] == [2, 3]
    assert p.layers[1].attn.Wqkv.weight.shape == (3 * 3 * 8, 32) and p.layers[1].attn.Wo.in_features == 24
    mh.save(p, tmp_path / "p")
    x = inputs()
    for impl in ("eager", "sdpa"):
        assert torch.allclose(out(mh.load_pretrained(tmp_path / "p", attn_implementation=impl), x), out(p, x),
                              atol=1e-5)

    torch.manual_seed(0)
    lm = T.ModernBertForMaskedLM(m.config).eval()  # prefix "model.", tied decoder
    lm.save_pretrained(tmp_path / "lm")
    plan = {0: {"mlp": 0.3, "attention": 0.5}, 1: 0.5}
    f = mh.fold_model(lm, ratio=plan, targets="all", n_init=1)
    mh.fold_checkpoint(tmp_path / "lm", tmp_path / "lst", ratio=plan, targets="all", n_init=1, progress=False)
    assert torch.equal(out(mh.load_pretrained(tmp_path / "lst", attn_implementation="eager"), x), out(f, x))


@pytest.mark.parametrize("fn", ["fold_attention", "prune_attention"])
def test_low_level_head_functions_refuse_mpnet_before_changing_it(fn):
    m = make_model("mpnet", layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = find_adapter(m)
    with pytest.raises(UnsupportedModelError, match="targets='mlp'"):
        getattr(mh, fn)(a.attention(m, 0), 0.5, a)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m2 = make_model("llama", layers=2)  # a family whose heads can change still works
    a2 = find_adapter(m2)
    n_before, n_after = getattr(mh, fn)(a2.attention(m2, 0), 0.5, a2)[:2]
    assert n_after < n_before
