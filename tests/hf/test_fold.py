"""Folding transformers: identity, exact oracles, shapes, plans, errors, the input model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import FAMILIES, inputs, make_model, out

import modelfold
import modelfold.hf as mh
from modelfold.errors import InvalidRatioError, UnsupportedModelError
from modelfold.hf.adapters import find_adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_identity(family):
    m = make_model(family)
    x = inputs()
    f, rep = modelfold.fold(m, ratio=0.0, targets="all", return_report=True)
    assert torch.equal(out(f, x), out(m, x))
    assert rep.params_after == rep.params_before


def _duplicate_mlp_neurons(model, family):
    """Make neuron j+n/2 an exact copy of neuron j (rows and halved consumer columns) in every MLP."""
    a = find_adapter(model)
    with torch.no_grad():
        for i in range(len(a.layers(model))):
            spec = a.mlp(model, i)
            h = spec.width // 2
            for parent, name in spec.producers:
                lin = getattr(parent, name)
                lin.weight[h:] = lin.weight[:h]
                if lin.bias is not None:
                    lin.bias[h:] = lin.bias[:h]
            cons = getattr(*spec.consumer)
            cons.weight[:, :h] *= 0.5  # split each column over the two copies: function unchanged
            cons.weight[:, h:] = cons.weight[:, :h]


@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_neurons_fold_exactly(family):
    m = make_model(family)
    _duplicate_mlp_neurons(m, family)
    x = inputs()
    f = modelfold.fold(m, ratio=0.5, targets="mlp")
    a = find_adapter(f)
    assert all(a.mlp(f, i).width == 24 for i in range(3))
    assert torch.allclose(out(f, x), out(m, x), atol=1e-5, rtol=0)
    assert f.config.intermediate_size == 24


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_shapes_and_original_untouched(family):
    m = make_model(family)
    before = copy.deepcopy(m.state_dict())
    x = inputs()
    y0 = out(m, x)
    f, rep = modelfold.fold(m, ratio=0.5, targets="all", return_report=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(out(m, x), y0)
    a = find_adapter(f)
    for i in range(3):
        mlp, att = a.mlp(f, i), a.attention(f, i)
        for ref in mlp.producers:
            assert getattr(*ref).out_features == 24
        assert getattr(*mlp.consumer).in_features == 24
        assert getattr(*att.q).out_features == att.num_heads * att.head_dim
        assert getattr(*att.o).in_features == att.num_heads * att.head_dim
        assert att.num_heads == 2  # 4 -> 2 (decoders: 1 query head per KV group; bert: 2 heads)
    assert rep.params_after < rep.params_before
    y = out(f, x)
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, y0, atol=1e-4)  # random weights: folding is lossy here


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prune_keeps_largest_norm(family):
    m = make_model(family)
    a = find_adapter(m)
    spec = a.mlp(m, 0)
    feats = torch.cat([getattr(*r).weight for r in spec.producers]
                      + ([getattr(*spec.producers[0]).bias[:, None]] if family == "bert" else [])
                      + [getattr(*spec.consumer).weight.T], 1)
    keep = torch.sort(torch.topk(feats.norm(dim=1), 36).indices).values
    p = modelfold.prune(m, ratio=0.25, targets="mlp", norm=2)
    got = getattr(*find_adapter(p).mlp(p, 0).consumer).weight
    assert torch.equal(got, getattr(*spec.consumer).weight[:, keep])


def test_plan_and_skip():
    m = make_model("llama", layers=4)
    a = find_adapter(m)
    f = modelfold.fold(m, ratio=0.5, skip_first=1, skip_last=2)
    assert [a.mlp(f, i).width for i in range(4)] == [48, 24, 48, 48]
    f = modelfold.fold(m, ratio={0: 0.25, 3: {"attention": 0.5, "mlp": 0.5}})
    assert [a.mlp(f, i).width for i in range(4)] == [36, 48, 48, 24]
    assert [a.attention(f, i).num_heads for i in range(4)] == [4, 4, 4, 2]


def test_deterministic():
    m = make_model("qwen2")
    x = inputs()
    assert torch.equal(out(modelfold.fold(m, ratio=0.4, targets="all", seed=3), x),
                       out(modelfold.fold(m, ratio=0.4, targets="all", seed=3), x))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.3"])
def test_bad_ratio(bad):
    with pytest.raises(InvalidRatioError):
        modelfold.fold(make_model("llama"), ratio=bad)


def test_bad_targets_and_plans():
    m = make_model("llama")
    with pytest.raises(mh.InvalidPlanError, match="unknown target"):
        modelfold.fold(m, ratio=0.3, targets="conv")
    with pytest.raises(mh.InvalidPlanError, match="does not exist"):
        modelfold.fold(m, ratio={3: 0.3})
    with pytest.raises(mh.InvalidPlanError, match="does not exist"):
        modelfold.fold(m, ratio={-1: 0.3})
    with pytest.raises(InvalidRatioError):
        modelfold.fold(m, ratio={1: 1.5})
    with pytest.raises(mh.InvalidPlanError, match="leaves none"):
        modelfold.fold(m, ratio=0.3, skip_first=2, skip_last=1)
    with pytest.raises(ValueError, match="repair"):
        modelfold.fold(m, ratio=0.3, repair="dir")
    with pytest.raises(InvalidRatioError, match="ratio= or sparsity= is required"):
        modelfold.fold(m)
    with pytest.raises(InvalidRatioError, match="not both"):
        modelfold.fold(m, ratio=0.3, sparsity=0.3)


def test_unsupported_model():
    transformers = pytest.importorskip("transformers")
    m = transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=1, hidden_size=16, n_head=2,
                                                               vocab_size=11)).eval()
    assert not mh.is_supported(m)
    with pytest.raises(UnsupportedModelError, match="model_type='bloom'"):
        mh.fold_model(m, ratio=0.3)


def test_cnn_only_options_are_refused_for_transformers() -> None:
    model = make_model("llama")
    with pytest.raises(TypeError, match="keep_outputs is not supported for transformers"):
        modelfold.fold(model, ratio=0.3, keep_outputs=["model.layers.0.mlp.up_proj"])
    with pytest.raises(TypeError, match="ignore is not supported for transformers"):
        modelfold.prune(model, ratio=0.3, ignore=["model.layers.0"])


@pytest.mark.parametrize("method", ["fold", "prune"])
def test_round_to_mlp_widths_are_multiples_and_reload(method, tmp_path):
    m = make_model("llama", inter=100)
    a, x = find_adapter(m), inputs()
    fn = modelfold.fold if method == "fold" else modelfold.prune
    f, report = fn(m, ratio=0.3, round_to=16, return_report=True)
    assert [a.mlp(f, i).width for i in range(3)] == [64] * 3  # 70 -> 64
    assert f.config.intermediate_size == 64 and report.info == {"round_to": 16}
    assert fn(m, ratio=0.3, round_to=8).config.intermediate_size == 72
    plain = fn(m, ratio=0.3)
    assert plain.config.intermediate_size == 70
    assert torch.equal(out(fn(m, ratio=0.3, round_to=1), x), out(plain, x))  # round_to=1 is the default
    assert torch.equal(out(fn(m, ratio=0.0, round_to=16), x), out(m, x))  # ratio 0 stays the identity
    mh.save(f, tmp_path / "f")
    assert torch.allclose(out(mh.load_pretrained(tmp_path / "f"), x), out(f, x), atol=1e-5, rtol=0)


def test_round_to_every_expert_and_the_shared_expert():
    m = make_model("qwen2_moe", inter=40)
    a = find_adapter(m)
    f = modelfold.fold(m, ratio=0.5, round_to=8)  # 20 -> 24 (nearest multiple; halves round up)
    assert {s.width for i in range(3) for s in a.mlps(f, i)} == {24}
    assert out(f, inputs()).shape == out(m, inputs()).shape


@pytest.mark.parametrize("bad", [0, -16, 2.5, True])
def test_bad_round_to(bad):
    m = make_model("llama")
    for fn in (modelfold.fold, modelfold.prune):
        with pytest.raises(InvalidRatioError, match="round_to"):
            fn(m, ratio=0.3, round_to=bad)


@pytest.mark.parametrize("kw", [{"ratio": 0.3}, {"sparsity": 0.2, "targets": "all"}])
def test_round_to_with_calibrated_compression(kw):
    """Calibrated widths (uniform and automatic budget) are multiples of round_to, and the model runs."""
    from modelfold.hf.adapters import find_adapter

    m = make_model("llama", inter=100)
    ids = torch.randint(3, 61, (6, 20), generator=torch.Generator().manual_seed(0))
    small = modelfold.compress(m, calibration=ids, round_to=16, **kw)
    a = find_adapter(small)
    widths = [a.mlp(small, i).width for i in range(len(a.layers(small)))]
    assert all(w % 16 == 0 or w == 100 for w in widths) and min(widths) < 100, widths
    assert small(ids[:1]).logits.isfinite().all()
    with pytest.raises(InvalidRatioError, match="round_to"):
        modelfold.compress(m, ratio=0.3, calibration=ids, round_to=0)
