"""sparsity= for transformers: predicted removals equal real ones; the solved ratio is the nearest."""

from __future__ import annotations

import pytest
from hf_models import FAMILIES, make_model

import modelfold
import modelfold.hf as mh
from modelfold.errors import InvalidRatioError
from modelfold.hf.adapters import find_adapter
from modelfold.hf.plan import make_plan
from modelfold.hf.sizing import plan_removed
from modelfold.report import count_params

CASES = [("mlp", "auto"), ("attention", "auto"), ("all", "auto"), ("all", "group")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("targets", "mode"), CASES)
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_predicted_removal_equals_folded_and_pruned_models(family, targets, mode, ratio):
    m = make_model(family, inter=40)
    adapter = find_adapter(m)
    plan = make_plan(ratio, 3, targets, skip_first=1)
    predicted = plan_removed(m, adapter, plan, mode)
    folded = mh.fold_model(m, ratio=ratio, targets=targets, skip_first=1, attention_mode=mode)
    pruned = mh.prune_model(m, ratio=ratio, targets=targets, skip_first=1, attention_mode=mode)
    assert predicted == count_params(m) - count_params(folded) == count_params(m) - count_params(pruned)
    if ratio >= 0.5:  # (at 0.2, 2 query heads per KV group round back to 2)
        assert predicted > 0


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.3])
def test_sparsity_gives_the_nearest_uniform_ratio(family, sparsity):
    m = make_model(family)
    targets = "all" if family == "llama" else "mlp"
    adapter = find_adapter(m)
    reachable = [plan_removed(m, adapter, make_plan(r / 1000, 3, targets)) / count_params(m) for r in range(951)]
    best = min(reachable, key=lambda v: abs(v - sparsity))
    if abs(best - sparsity) > 0.01:  # no uniform ratio comes within 0.01: refused, naming the nearest
        with pytest.raises(InvalidRatioError, match=f"nearest reachable sparsity is {best:.3f}"):
            modelfold.fold(m, sparsity=sparsity, targets=targets)
        return
    folded, report = modelfold.fold(m, sparsity=sparsity, targets=targets, return_report=True)
    got = 1 - count_params(folded) / count_params(m)
    assert got == pytest.approx(report.param_sparsity) and abs(got - sparsity) <= 0.01
    assert abs(got - sparsity) <= abs(best - sparsity) + 1e-12  # no uniform ratio comes nearer
    pruned = modelfold.prune(m, sparsity=sparsity, targets=targets)
    assert count_params(pruned) == count_params(folded)


def test_unreachable_sparsity_is_refused_with_the_reachable_amount():
    m = make_model("llama")
    with pytest.raises(InvalidRatioError, match=r"not reachable.*removes only \d+\.\d%"):
        modelfold.fold(m, sparsity=0.9, targets="mlp")
    with pytest.raises(InvalidRatioError, match="outside"):
        modelfold.fold(m, sparsity=1.2)


def test_stream_sparsity_matches_in_memory(tmp_path):
    from safetensors.torch import load_file

    from modelfold.hf.checkpoint import fold_checkpoint

    src = tmp_path / "src"
    make_model("qwen2").save_pretrained(src)
    report = fold_checkpoint(src, tmp_path / "st", sparsity=0.25, targets="all", progress=False)
    ref, ref_report = mh.fold_model(mh.load_pretrained(src), sparsity=0.25, targets="all", return_report=True)
    assert report.ratio == ref_report.ratio and abs(report.param_sparsity - 0.25) <= 0.01
    mh.save(ref, tmp_path / "ref")
    a, b = load_file(str(tmp_path / "st" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sparsity_with_round_to_is_predicted_exactly(family):
    m = make_model(family, inter=100)
    targets = "all" if family == "llama" else "mlp"
    want = {"llama": 0.28, "bert": 0.31}[family]  # reachable: uniform multiples of 8 give 0.277 / 0.318
    folded, report = modelfold.fold(m, sparsity=want, round_to=8, targets=targets, return_report=True)
    adapter = find_adapter(m)
    assert all(s.width % 8 == 0 for i in range(3) for s in adapter.mlps(folded, i))
    removed = count_params(m) - count_params(folded)
    assert abs(removed / count_params(m) - want) <= 0.01
    assert plan_removed(m, adapter, make_plan(report.ratio, 3, targets), round_to=8) == removed
    assert count_params(modelfold.prune(m, sparsity=want, round_to=8, targets=targets)) == count_params(folded)
