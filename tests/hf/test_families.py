"""Every supported family end to end on a tiny random model: exact folds of duplicated neurons and heads,
prune, sparsity=, per-layer plans, save/reload (vanilla and modelfold loader), layer-by-layer streaming."""

from __future__ import annotations

import pytest
import torch
from hf_models import ALL_FAMILIES, ENCODERS, FIXED_HEADS, inputs, make_model, out
from safetensors.torch import load_file

import modelfold
import modelfold.hf as mh
from modelfold.hf.adapters import find_adapter, get, put
from modelfold.hf.checkpoint import fold_checkpoint, prune_checkpoint
from modelfold.hf.plan import make_plan
from modelfold.hf.sizing import plan_removed
from modelfold.report import count_params


def duplicate(model: torch.nn.Module) -> None:
    """Make half of every MLP's neurons and half of every attention block's heads exact copies of the other
    half (producer rows copied, consumer columns split in two): the function is unchanged, and folding
    at ratio 0.5 must find the copies and merge them back exactly."""
    a = find_adapter(model)
    with torch.no_grad():
        for i in range(len(a.layers(model))):
            for spec in a.mlps(model, i):
                h = spec.width // 2
                for ref in spec.producers:
                    lin = get(ref)
                    lin.weight[h:] = lin.weight[:h]
                    if lin.bias is not None:
                        lin.bias[h:] = lin.bias[:h]
                    put(ref, lin)  # (get may return a copy: interleaved or pending layouts)
                cons = get(spec.consumer)
                cons.weight[:, :h] *= 0.5
                cons.weight[:, h:] = cons.weight[:, :h]
                put(spec.consumer, cons)
            s = a.attention(model, i)
            hd = s.head_dim
            if s.n_rep > 1:  # query heads 2j+1 copy 2j inside each KV group (n_rep = 2 here)
                pairs = [(g * s.n_rep, g * s.n_rep + 1) for g in range(s.num_kv_heads)]
                refs = [s.q]
            else:  # whole heads: h + n/2 copies h
                n = s.num_heads
                pairs = [(j, j + n // 2) for j in range(n // 2)]
                refs = [s.q, s.k, s.v]
            lins = {id(r): get(r) for r in [*refs, s.o]}
            for src, dst in pairs:
                rs, rd = slice(src * hd, (src + 1) * hd), slice(dst * hd, (dst + 1) * hd)
                for ref in refs:
                    lin = lins[id(ref)]
                    lin.weight[rd] = lin.weight[rs]
                    if lin.bias is not None:
                        lin.bias[rd] = lin.bias[rs]
                o = lins[id(s.o)].weight
                o[:, rs] *= 0.5
                o[:, rd] = o[:, rs]
            for ref in [*refs, s.o]:
                put(ref, lins[id(ref)])


def _tensors(path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _vanilla(path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(path, attn_implementation="eager").eval()


# families with FIXED_HEADS (MPNet) run the same steps without heads in tests/hf/test_fixed_heads.py
HEADS = [f for f in ALL_FAMILIES if f not in FIXED_HEADS]


@pytest.mark.parametrize("family", HEADS)
def test_family_folds_exactly_saves_reloads_and_streams(family, tmp_path):
    m = make_model(family, layers=2)
    duplicate(m)
    x = inputs()
    y = out(m, x)
    a = find_adapter(m)
    assert a is not None and mh.is_supported(m)

    # duplicated neurons and heads fold back exactly; every MLP (each expert) and every head block halves
    f = mh.fold_model(m, ratio=0.5, targets="all")
    assert torch.allclose(out(f, x), y, atol=2e-5, rtol=1e-4), (out(f, x) - y).abs().max()
    for i in range(2):
        assert all(s.width * 2 == s0.width for s, s0 in zip(a.mlps(f, i), a.mlps(m, i), strict=True))
        assert a.attention(f, i).num_heads * 2 == a.attention(m, i).num_heads

    # uniform fold -> plain checkpoint for vanilla from_pretrained (heads too where the config can say so)
    targets = "all" if a.vanilla_heads else "mlp"
    u = mh.fold_model(m, ratio=0.5, targets=targets)
    mh.save(u, tmp_path / "uniform")
    assert torch.equal(out(_vanilla(tmp_path / "uniform"), x), out(u, x))

    # per-layer plan -> modelfold.load_pretrained; vanilla refuses instead of loading garbage
    plan = {0: {"mlp": 0.25}, 1: {"mlp": 0.5, "attention": 0.5}}
    p = mh.fold_model(m, ratio=plan, seed=1)
    mh.save(p, tmp_path / "plan")
    assert torch.equal(out(mh.load_pretrained(tmp_path / "plan", attn_implementation="eager"), x), out(p, x))
    with pytest.raises(Exception, match="mismatch|size"):
        _vanilla(tmp_path / "plan")

    # layer by layer == in memory, bit for bit (fold and prune)
    src = tmp_path / "src"
    m.save_pretrained(src, max_shard_size="40KB")
    fold_checkpoint(src, tmp_path / "st", ratio=plan, seed=1, progress=False)
    st = _tensors(tmp_path / "st")
    ref = _tensors(tmp_path / "plan")
    assert set(st) <= set(ref) and all(torch.equal(st[k], ref[k]) for k in st)
    assert set(st) == set(_tensors(src))
    assert torch.equal(out(mh.load_pretrained(tmp_path / "st", attn_implementation="eager"), x), out(p, x))
    prune_checkpoint(src, tmp_path / "pst", ratio=0.5, targets="all", progress=False)
    pm = mh.prune_model(m, ratio=0.5, targets="all")
    assert torch.equal(out(mh.load_pretrained(tmp_path / "pst", attn_implementation="eager"), x), out(pm, x))


@pytest.mark.parametrize("family", HEADS)
def test_family_sizing_is_exact_and_sparsity_is_reached(family):
    m = make_model(family, layers=2, inter=40)
    a = find_adapter(m)
    total = count_params(m)
    for targets, ratio, mode in (("mlp", 0.3, "auto"), ("all", 0.5, "auto"), ("attention", 0.75, "auto"),
                                 ("all", 0.5, "group")):
        predicted = plan_removed(m, a, make_plan(ratio, 2, targets), mode)
        pruned = mh.prune_model(m, ratio=ratio, targets=targets, attention_mode=mode)
        assert predicted == total - count_params(pruned) > 0
    predicted = plan_removed(m, a, make_plan(0.5, 2, "all"))
    assert predicted == total - count_params(mh.fold_model(m, ratio=0.5, targets="all", n_init=1))
    f, rep = modelfold.fold(m, sparsity=0.15, targets="mlp", return_report=True, n_init=1)
    assert abs(1 - count_params(f) / total - 0.15) <= 0.01 and rep.param_sparsity == 1 - count_params(f) / total


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in ENCODERS])
def test_decoder_families_generate_with_the_kv_cache_after_a_per_layer_fold(family):
    f = mh.fold_model(make_model(family, layers=2), ratio={0: 0.25, 1: {"mlp": 0.5, "attention": 0.5}}, n_init=1)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    cached = f.generate(inputs()[:1, :4], use_cache=True, **kw)
    assert cached.shape == (1, 8)
    assert torch.equal(cached, f.generate(inputs()[:1, :4], use_cache=False, **kw))


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.mark.parametrize("family", [f for f in HEADS if f not in MOE])
def test_family_calibrated_compression(family, tmp_path):
    """Calibrated folding finds the duplicated neurons (exact), and the result saves and reloads."""
    m = make_model(family, layers=2)
    duplicate(m)
    ids = torch.randint(2, 58, (4, 12), generator=torch.Generator().manual_seed(0))
    x = inputs()
    f = mh.compress_model(m, ratio=0.5, calibration=ids, method="fold", compensate="none", targets="mlp", n_init=1)
    assert torch.allclose(out(f, x), out(m, x), atol=5e-5, rtol=1e-4)
    g = mh.compress_model(m, ratio={0: {"attention": 0.5}, 1: {"mlp": 0.25}}, calibration=ids)
    mh.save(g, tmp_path / "g")
    assert torch.equal(out(mh.load_pretrained(tmp_path / "g", attn_implementation="eager"), x), out(g, x))


@pytest.mark.parametrize("family", MOE)
def test_moe_calibrated_compression_of_experts_is_refused(family):
    from modelfold.errors import UnsupportedModelError

    m = make_model(family, layers=2)
    ids = torch.randint(2, 58, (4, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*data-free fold"):
        mh.compress_model(m, ratio=0.5, calibration=ids, targets="mlp")
    g = mh.compress_model(m, ratio=0.5, calibration=ids, targets="attention")  # attention still calibrates
    assert find_adapter(g).attention(g, 1).num_heads == 2
