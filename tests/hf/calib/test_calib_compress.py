"""Calibrated compression of transformers: exactness, LS optimality, determinism, reload, errors."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, make_model, out

import modelfold.hf as mh
from modelfold.hf.adapters import find_adapter
from modelfold.hf.adapters.refs import hook_module
from modelfold.hf.calib.blocks import capture, observe, record, run_block, sum_point
from modelfold.hf.calib.compress import compress_model
from modelfold.hf.calib.data import CalibrationError, sample, self_text
from modelfold.report import count_params


def ids(seed: int = 5, n: int = 6, length: int = 20) -> torch.Tensor:
    return torch.randint(3, 61, (n, length), generator=torch.Generator().manual_seed(seed))


def duplicated_llama(weak: float = 0.01) -> torch.nn.Module:
    """A 1-layer llama whose 48 MLP neurons are 24 neurons and a copy of each (same gate/up rows).

    The copies' down columns are small (``weak`` times a random column), so activation-aware
    selection keeps the originals; least squares must then move each copy's column onto its original.
    """
    m = make_model("llama", layers=1)
    mlp = m.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[24:] = mlp.gate_proj.weight[:24]
        mlp.up_proj.weight[24:] = mlp.up_proj.weight[:24]
        mlp.down_proj.weight[:, 24:] = weak * 0.02 * torch.randn(32, 24)
    return m


def mlp_out(model, x):
    a = find_adapter(model)
    inp = capture(model, a, x)
    block = a.layers(model)[0]
    return record(block, inp, {"mlp": block.mlp.down_proj})["mlp"], block


def test_least_squares_is_exact_on_duplicated_neurons():
    m = duplicated_llama()
    x = ids()
    small = compress_model(m, ratio=0.5, calibration=x, lam=0.0)
    mlp = small.model.layers[0].mlp
    assert mlp.down_proj.in_features == 24
    assert torch.equal(mlp.gate_proj.weight, m.model.layers[0].mlp.gate_proj.weight[:24])  # originals kept
    assert torch.allclose(out(small, x), out(m, x), atol=1e-4)
    plain = compress_model(m, ratio=0.5, calibration=x, compensate="none")
    assert not torch.allclose(out(plain, x), out(m, x), atol=1e-4)


def test_fold_of_duplicates_is_exact_and_never_worse_with_ls():
    m = duplicated_llama(weak=1.0)
    x = ids()
    for comp in ("ls", "none"):
        small = compress_model(m, ratio=0.5, calibration=x, method="fold", compensate=comp, lam=0.0)
        assert small.model.layers[0].mlp.down_proj.in_features == 24
        assert torch.allclose(out(small, x), out(m, x), atol=1e-4), comp


@pytest.mark.parametrize("method", ["select", "fold"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ls_never_increases_block_error_on_its_calibration_inputs(family, method):
    m = make_model(family, layers=1)
    x = ids()
    errs = {}
    for comp in ("ls", "none"):
        small = compress_model(m, ratio=0.4, calibration=x, method=method, compensate=comp, lam=0.0, targets="all")
        a = find_adapter(m)
        h0 = capture(m, a, x)
        hooks = {"mlp": a.mlp(m, 0).consumer, "o": a.attention(m, 0).o}
        ref = {k: torch.nn.functional.linear(v, getattr(*hooks[k]).weight, getattr(*hooks[k]).bias)
               for k, v in record(a.layers(m)[0], h0, {k: getattr(*r) for k, r in hooks.items()}).items()}
        hs = capture(small, a, x)
        s_hooks = {"mlp": a.mlp(small, 0).consumer, "o": a.attention(small, 0).o}
        new = {k: torch.nn.functional.linear(v, getattr(*s_hooks[k]).weight, getattr(*s_hooks[k]).bias)
               for k, v in record(a.layers(small)[0], hs, {k: getattr(*r) for k, r in s_hooks.items()}).items()}
        errs[comp] = float((ref["o"] - new["o"]).detach().pow(2).sum())
        # the MLP sees the compressed attention's output; its target is the original MLP on those inputs
        errs[comp + "-params"] = count_params(small)
    assert errs["ls"] <= errs["none"] * (1 + 1e-6) + 1e-9
    assert errs["ls-params"] == errs["none-params"] < count_params(m)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrated_model_reloads_to_identical_outputs(family, tmp_path):
    m = make_model(family)
    x = ids()
    small = compress_model(m, sparsity=0.2, calibration=x, targets="mlp")  # automatic per-layer budget
    mh.save(small, tmp_path / "out")
    again = mh.load_pretrained(tmp_path / "out")
    sa, sb = small.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical weights (BERT reloads add a pooler)
    assert torch.allclose(out(again, x), out(small, x), atol=1e-5, rtol=0)  # reload picks sdpa, not eager
    assert not any(p.data_ptr() == q.data_ptr() for p in m.parameters() for q in small.parameters())


def test_auto_budget_reaches_the_sparsity_and_protects_a_fragile_layer():
    m = make_model("llama")
    with torch.no_grad():  # make layer 1's MLP output dominate: removing its neurons costs the most
        m.model.layers[1].mlp.down_proj.weight.mul_(30.0)
    small, rep = compress_model(m, sparsity=0.15, calibration=ids(), return_report=True)
    assert abs(rep.param_sparsity - 0.15) <= 0.01
    widths = [layer.mlp.down_proj.in_features for layer in small.model.layers]
    assert widths[1] == max(widths) and widths[1] > min(widths)


def test_deterministic_and_input_model_untouched():
    m = make_model("qwen2")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = compress_model(m, ratio=0.3, calibration=ids(), method="fold", targets="all")
    b = compress_model(m, ratio=0.3, calibration=ids(), method="fold", targets="all")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_self_text_is_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    m = make_model("llama")
    info: dict = {}
    a = self_text(m, 2, 12, seed=3, info=info)
    assert info["source"] == "sampled" and a.shape == (2, 12) and bool((a[:, 0] == m.config.bos_token_id).all())
    b = self_text(m, 2, 12, seed=3, info=info)
    assert info["source"] == "cache" and torch.equal(a, b)
    assert torch.equal(self_text(m, 2, 12, seed=3, use_cache=False), a)
    assert not torch.equal(self_text(m, 2, 12, seed=4), a)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_sampler_draws_what_generate_draws(family):
    """The KV-cached sampler is generate(do_sample=True, min_new_tokens=...) without its bookkeeping:
    the same tokens from the same seed, end-of-sequence never drawn."""
    m = make_model(family)
    bos = m.config.bos_token_id if m.config.bos_token_id is not None else 0
    m.generation_config.eos_token_id = 7  # a token the tiny model draws often enough to matter
    start = torch.full((3, 1), bos)
    torch.manual_seed(11)
    want = m.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                      temperature=1.0, max_new_tokens=15, min_new_tokens=15, pad_token_id=bos)
    torch.manual_seed(11)
    got = sample(m, bos, 3, 16)
    assert torch.equal(got, want) and not bool((got[:, 1:] == 7).any())


def test_one_block_run_records_what_separate_runs_do():
    m = make_model("llama")
    a = find_adapter(m)
    inp = capture(m, a, ids())
    block = a.layers(m)[0]
    mods = {"c": hook_module(a.mlp(m, 0).consumer)}
    seen = observe(block, inp, mods, sums=True, at=a.mlp_sum(m, 0), outputs=True)
    assert torch.equal(seen.acts["c"], record(block, inp, mods)["c"])
    assert torch.equal(seen.sums, sum_point(block, inp, a.mlp_sum(m, 0))[0])
    assert all(torch.equal(x, y) for x, y in zip(seen.out.xs, run_block(block, inp).xs, strict=True))


def test_self_calibration_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    m = make_model("mistral")
    small, rep = compress_model(m, ratio=0.25, n_calib=3, calib_len=16, return_report=True)
    assert rep.repair_info["calibration"] == "self" and rep.repair_info["calibration_tokens"] == 48
    assert small.model.layers[0].mlp.down_proj.in_features == 36


def test_calibration_errors():
    m = make_model("llama")
    with pytest.raises(CalibrationError, match="integer tensor"):
        compress_model(m, ratio=0.3, calibration=torch.randn(2, 5))
    with pytest.raises(CalibrationError, match="vocabulary"):
        compress_model(m, ratio=0.3, calibration=torch.full((2, 5), 999))
    with pytest.raises(CalibrationError, match="tokenizer="):
        compress_model(m, ratio=0.3, calibration=["some text"])
    with pytest.raises(CalibrationError, match="tokenizer="):
        compress_model(make_model("bert"), ratio=0.3, calibration="self")
    with pytest.raises(CalibrationError, match="not understood"):
        compress_model(m, ratio=0.3, calibration=3)


def test_nested_errors_are_the_ridge_refits_errors():
    """One Cholesky for every width: e_k = J_k - J_n, J_k the ridge objective of a refit reading the first
    k features of the order, as a direct solve per width gives it."""
    from modelfold.hf.calib.sensitivity import nested_errors

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(200, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                               dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    g = h.T @ h
    order = torch.randperm(12, generator=gen)
    lam = 1e-3
    reg = lam * float(torch.diagonal(g).mean())

    def objective(k: int) -> float:
        hk = h[:, order[:k]]
        x = torch.linalg.solve(hk.T @ hk + reg * torch.eye(k, dtype=h.dtype), hk.T @ (h @ w.T))
        return float(((hk @ x - h @ w.T) ** 2).sum() + reg * (x ** 2).sum())

    got = nested_errors(w, g, order, lam, [3, 7, 12])
    for k in (3, 7):
        assert got[k] == pytest.approx(objective(k) - objective(12), rel=1e-9)
    assert got[12] == 0.0 and got[3] > got[7] > 0


def test_nested_errors_with_the_prior_and_without_a_refit():
    """prior=True: e_k is the ridge objective pulled towards the first k columns of W (so e_n = 0 and e_k
    at most the plain removal error); lam=inf: exactly that removal error, ||H_tail W_tail^T||^2."""
    from modelfold.hf.calib.sensitivity import nested_errors

    gen = torch.Generator().manual_seed(1)
    h = torch.randn(30, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                              dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    g = h.T @ h
    order = torch.randperm(12, generator=gen)
    lam = 1e-2
    reg = lam * float(torch.diagonal(g).mean())

    def objective(k: int) -> float:
        hk, p = h[:, order[:k]], w[:, order[:k]].T
        x = torch.linalg.solve(hk.T @ hk + reg * torch.eye(k, dtype=h.dtype), hk.T @ (h @ w.T) + reg * p)
        return float(((hk @ x - h @ w.T) ** 2).sum() + reg * ((x - p) ** 2).sum())

    def plain(k: int) -> float:
        tail = order[k:]
        return float(((h[:, tail] @ w[:, tail].T) ** 2).sum())

    got = nested_errors(w, g, order, lam, [3, 7, 12], prior=True)
    none = nested_errors(w, g, order, float("inf"), [3, 7, 12])
    for k in (3, 7):
        assert got[k] == pytest.approx(objective(k), rel=1e-8)
        assert none[k] == pytest.approx(plain(k), rel=1e-9)
        assert got[k] <= none[k]
    assert got[12] == 0.0 and none[12] == 0.0


def test_the_report_names_the_ridge_chosen_on_held_out_sequences():
    """lam="auto": each refit says which ridge the held-out half of the sequences chose; a fixed lam is
    used as given."""
    m = make_model("llama", layers=2)
    ids = torch.randint(3, 61, (6, 20), generator=torch.Generator().manual_seed(2))
    _, rep = compress_model(m, ratio=0.5, calibration=ids, return_report=True)
    notes = [g.reason for g in rep.groups if g.status == "pruned"]
    assert notes and all(n.startswith("ridge ") or n == "no refit (held-out rows)" for n in notes)
    _, fixed = compress_model(m, ratio=0.5, calibration=ids, lam=0.01, return_report=True)
    assert all(g.reason == "ridge 0.01" for g in fixed.groups if g.status == "pruned")
    with pytest.raises(CalibrationError, match="lam must be 'auto' or a ridge"):
        compress_model(m, ratio=0.5, calibration=ids, lam="big")
    assert "ratio=0.500" in str(rep)  # one ratio everywhere
    _, mixed = compress_model(m, ratio={0: {"mlp": 0.25}, 1: {"mlp": 0.5}}, calibration=ids, return_report=True)
    assert "ratios per layer up to 0.500" in str(mixed) and "ratio=" not in str(mixed)
