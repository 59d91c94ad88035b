"""sparsity= for transformers: predicted removals equal real ones; the solved ratio is the smallest."""

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
def test_sparsity_gives_the_smallest_ratio_reaching_it(family, sparsity):
    m = make_model(family)
    folded, report = modelfold.fold(m, sparsity=sparsity, targets="all" if family == "llama" else "mlp",
                                    return_report=True)
    got = 1 - count_params(folded) / count_params(m)
    assert got == pytest.approx(report.param_sparsity) and got >= sparsity
    adapter = find_adapter(m)
    targets = "all" if family == "llama" else "mlp"
    below = plan_removed(m, adapter, make_plan(report.ratio - 1e-6, 3, targets)) / count_params(m)
    assert below < sparsity  # any smaller ratio falls short
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

    from modelfold.hf.stream import fold_checkpoint

    src = tmp_path / "src"
    make_model("qwen2").save_pretrained(src)
    report = fold_checkpoint(src, tmp_path / "st", sparsity=0.25, targets="all", progress=False)
    ref, ref_report = mh.fold_model(mh.load_pretrained(src), sparsity=0.25, targets="all", return_report=True)
    assert report.ratio == ref_report.ratio and report.param_sparsity >= 0.25
    mh.save(ref, tmp_path / "ref")
    a, b = load_file(str(tmp_path / "st" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sparsity_with_round_to_is_predicted_exactly(family):
    m = make_model(family, inter=100)
    targets = "all" if family == "llama" else "mlp"
    folded, report = modelfold.fold(m, sparsity=0.3, round_to=8, targets=targets, return_report=True)
    adapter = find_adapter(m)
    assert all(s.width % 8 == 0 for i in range(3) for s in adapter.mlps(folded, i))
    removed = count_params(m) - count_params(folded)
    assert removed / count_params(m) >= 0.3
    assert plan_removed(m, adapter, make_plan(report.ratio, 3, targets), round_to=8) == removed
    assert count_params(modelfold.prune(m, sparsity=0.3, round_to=8, targets=targets)) == count_params(folded)
