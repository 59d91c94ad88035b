"""round_to for transformers MLP widths: in memory, sparsity= (exact), layer by layer, CLI."""

from __future__ import annotations

import pytest
import torch
from hf_models import make_model

import modelfold
from modelfold.cli import main
from modelfold.hf.adapters import find_adapter
from modelfold.hf.plan import make_plan
from modelfold.hf.sizing import plan_removed
from modelfold.report import count_params


@pytest.mark.parametrize("method", ["fold", "prune"])
def test_mlp_widths_are_multiples(method: str) -> None:
    model = make_model("llama", inter=100)
    fn = modelfold.fold if method == "fold" else modelfold.prune
    out = fn(model, ratio=0.3, round_to=16)
    assert out.config.intermediate_size == 64  # 70 -> 64
    assert fn(model, ratio=0.3).config.intermediate_size == 70
    assert fn(model, ratio=0.0, round_to=16).config.intermediate_size == 100  # identity at ratio 0


def test_sparsity_with_round_to_is_exact() -> None:
    model = make_model("mistral", inter=100)
    out, report = modelfold.fold(model, sparsity=0.3, round_to=8, return_report=True)
    assert out.config.intermediate_size % 8 == 0
    removed = count_params(model) - count_params(out)
    assert removed / count_params(model) >= 0.3
    a = find_adapter(model)
    plan = make_plan(report.ratio, len(a.layers(model)), "mlp", 0, 0)
    assert plan_removed(model, a, plan, round_to=8) == removed


def test_cli_round_to_layer_by_layer_equals_in_memory(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    model = make_model("qwen2", inter=100)
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert main(["fold", str(src), "--ratio", "0.3", "--round-to", "16", "--out", str(tmp_path / "st")]) == 0
    assert "layer by layer" in capsys.readouterr().out
    expected = modelfold.fold(model, ratio=0.3, round_to=16).state_dict()
    got = {}
    for f in (tmp_path / "st").glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert got["model.layers.0.mlp.up_proj.weight"].shape[0] == 64
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def test_round_to_with_calibration_is_refused() -> None:
    with pytest.raises(TypeError, match="round_to"):
        modelfold.fold(make_model("llama"), ratio=0.3, round_to=8, calibration="self")
