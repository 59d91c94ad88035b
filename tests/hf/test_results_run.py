"""Every compressed transformers model runs, and saved and reloaded gives identical outputs (issue 17, part 1).

Grid: every supported family x fold / prune / compress x ratios 0.05..0.9 x in memory / layer by layer.
Widths come from ``MLPSpec.kept`` (MLP neurons; MoE experts aligned to 8) and ``units_k`` (heads), so the
ratios are chosen to give odd widths (intermediate 46: 44, 40, 32, 29, 23, 17, 11, 5 neurons). To keep
the cost down, a plan gives each layer its own ratio: fold in memory runs the full grid on every family
(an 8-layer model, one ratio per layer); the other five combinations run one plan each on a 2-layer
model, whose ratios rotate with the family (uniform for some, per layer for others), so every ratio
meets every combination on some family (checked by ``test_grid_covers_every_ratio``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hf_models import ALL_FAMILIES, ENCODERS, FIXED_HEADS, inputs, make_model, out

import modelfold
import modelfold.hf as H
from modelfold.errors import ModelFoldError, ResultError
from modelfold.hf.adapters import find_adapter
from modelfold.hf.runcheck import check_layer_runs, check_model_runs

RATIOS = (0.05, 0.13, 0.3, 0.37, 0.5, 0.62, 0.77, 0.9)
LAYERS = 2  # the rotating combinations; the full fold grid uses len(RATIOS) layers
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
COMBOS = ("prune-memory", "compress-memory", "fold-layers", "prune-layers", "compress-layers")
UNIFORM = ("prune-memory", "prune-layers")  # these run one ratio for every layer (vanilla config fields)
CALIB = torch.randint(2, 58, (2, 8), generator=torch.Generator().manual_seed(3))


def _inter(family: str) -> int:
    # MoE experts run grouped_mm kernels: the original width must be aligned as well (46 * 4 bytes is not)
    return 48 if family in MOE else 46


@functools.cache
def _model(family: str, layers: int = LAYERS) -> torch.nn.Module:
    return make_model(family, layers=layers, inter=_inter(family))


def _targets(family: str, method: str) -> str:
    if family in FIXED_HEADS:  # MPNet: attention targets are refused (docs/families.md)
        return "mlp"
    # calibrated compression of MoE MLPs is refused (no module shows an expert's input): attention only
    return "attention" if method == "compress" and family in MOE else "all"


def _plan(family: str, combo: str) -> float | dict[int, float]:
    """Deterministic rotating ratios: combination c on family f uses RATIOS[(f + 3c + l) % 8] for layer l."""
    f, c = ALL_FAMILIES.index(family), COMBOS.index(combo)
    if combo in UNIFORM:
        return RATIOS[(f + 3 * c) % len(RATIOS)]
    return {layer: RATIOS[(f + 3 * c + layer) % len(RATIOS)] for layer in range(LAYERS)}


def _ratios(plan: float | dict[int, float]) -> set[float]:
    return set(plan.values()) if isinstance(plan, dict) else {plan}


def test_grid_covers_every_ratio() -> None:
    for combo in COMBOS:
        covered = set().union(*(_ratios(_plan(f, combo)) for f in ALL_FAMILIES))
        assert covered == set(RATIOS), combo
    assert len(RATIOS) >= 8 and min(RATIOS) <= 0.05 and max(RATIOS) >= 0.9


def _compress_kwargs() -> dict:
    return {"calibration": CALIB, "budget": "uniform", "n_init": 1}


def _run_in_memory(family: str, method: str, plan, layers: int = LAYERS) -> torch.nn.Module:
    m, targets = _model(family, layers), _targets(family, method)
    if method == "fold":
        return H.fold_model(m, plan, targets=targets, n_init=1)
    if method == "prune":
        return H.prune_model(m, plan, targets=targets)
    return H.compress_model(m, plan, targets=targets, **_compress_kwargs())


def _saved_source(family: str, tmp_path_factory) -> str:
    return _sources(family, str(tmp_path_factory.getbasetemp()))


@functools.cache
def _sources(family: str, base: str) -> str:
    path = f"{base}/src-{family}"
    H.save(_model(family), path)
    return path


def _run_layers(family: str, method: str, plan, src: str, dst: str) -> torch.nn.Module:
    targets = _targets(family, method)
    if method == "fold":
        H.fold_checkpoint(src, dst, plan, targets=targets, n_init=1, progress=False)
    elif method == "prune":
        H.prune_checkpoint(src, dst, plan, targets=targets, progress=False)
    else:
        from modelfold.hf.checkpoint import compress_checkpoint  # was modelfold.hf.stream_calib

        compress_checkpoint(src, dst, plan, targets=targets, progress=False, **_compress_kwargs())
    return H.load_pretrained(dst, attn_implementation="eager").eval()


def _check(result: torch.nn.Module, family: str, tmp_path, name: str) -> None:
    """The result runs, its MoE experts are aligned, and saved + reloaded it gives identical outputs."""
    x = inputs()
    y = out(result, x)  # runs, in its own class
    assert torch.isfinite(y).all()
    a = find_adapter(result)
    for i in range(len(a.layers(result))):
        for spec in a.mlps(result, i):
            if spec.kind == "experts":
                assert spec.width % 8 == 0, (spec.name, spec.width)
    H.save(result, tmp_path / name)
    again = H.load_pretrained(tmp_path / name, attn_implementation="eager").eval()
    assert torch.equal(out(again, x), y)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fold_in_memory_full_grid(family: str, tmp_path) -> None:
    plan = dict(enumerate(RATIOS))  # layer l folds at RATIOS[l]
    _check(_run_in_memory(family, "fold", plan, layers=len(RATIOS)), family, tmp_path, "fold")


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rotating_grid(family: str, combo: str, tmp_path, tmp_path_factory) -> None:
    method, where = combo.split("-")
    plan = _plan(family, combo)
    if where == "memory":
        result = _run_in_memory(family, method, plan)
    else:
        result = _run_layers(family, method, plan, _saved_source(family, tmp_path_factory), str(tmp_path / "lbl"))
    _check(result, family, tmp_path, "saved")


def _mixtral(inter: int = 176) -> torch.nn.Module:
    """The model of the issue: hidden 64, 4 experts, intermediate 176."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=61, hidden_size=64, intermediate_size=inter, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64)
    return T.MixtralForCausalLM(cfg).eval()


def test_issue_mixtral_ratio_03_runs() -> None:
    """Without alignment each expert kept 123 neurons and the forward raised 'strides should be multiple of 16
    bytes' (transformers' grouped_mm); now every expert keeps a multiple of 8 and the report says so."""
    m = _mixtral()
    folded, report = modelfold.fold(m, ratio=0.3, targets="mlp", return_report=True)
    assert folded.model.layers[0].mlp.experts.down_proj.shape[-1] == 120  # 123 -> nearest multiple of 8
    assert report.info["align"] == {"experts": 8}
    x = inputs()
    assert out(folded, x).shape == (2, 9, 61)
    for dtype in (torch.bfloat16, torch.float16):  # 16-byte rows in the 2-byte types as well
        out(folded.to(dtype), x)


@pytest.mark.parametrize("round_to", [None, 3, 12, 16])
def test_alignment_combines_with_round_to(round_to: int | None) -> None:
    m = _mixtral()
    multiple = {None: 8, 3: 24, 12: 24, 16: 16}[round_to]  # lcm(round_to, 8)
    calls = [(H.prune_model, r, {}) for r in (0.05, 0.3, 0.62, 0.9)] + [(H.fold_model, 0.37, {"n_init": 1})]
    for method, ratio, kw in calls:  # fold and prune share MLPSpec.kept: fold (k-means) once
        res, report = method(m, ratio, targets="mlp", round_to=round_to, return_report=True, **kw)
        w = res.model.layers[0].mlp.experts.down_proj.shape[-1]
        assert w % multiple == 0 and 0 < w < 176, (ratio, w)
        assert report.info["align"] == {"experts": 8}
        assert report.info.get("round_to") == round_to
    dense, report = H.prune_model(make_model("llama"), 0.3, return_report=True)
    assert "align" not in report.info  # dense MLPs run at any width


def test_sparsity_counts_the_alignment() -> None:
    from modelfold.hf.model import adapter_of
    from modelfold.hf.plan import make_plan
    from modelfold.hf.sizing import plan_removed
    from modelfold.report import count_params

    m = _mixtral()
    a = adapter_of(m)
    for ratio in (0.13, 0.3, 0.77):
        predicted = plan_removed(m, a, make_plan(ratio, 2, "mlp"))
        pruned = H.prune_model(m, ratio)
        assert count_params(m) - count_params(pruned) == predicted


def _unaligned(monkeypatch) -> None:
    """Switch the declared expert alignment off (as before the fix)."""
    from modelfold.hf.adapters import ADAPTERS

    for ad in ADAPTERS:
        if "mixtral" in ad.model_types:
            monkeypatch.setattr(ad, "fam", type(ad.fam)(**{**vars(ad.fam), "align": {}}))


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("how", ["fold", "prune"])
def test_result_that_cannot_run_is_refused(how: str, monkeypatch) -> None:
    _unaligned(monkeypatch)
    m = _mixtral()
    before, config = _state(m), m.config.to_dict()
    call = modelfold.fold if how == "fold" else modelfold.prune
    with pytest.raises(ResultError) as e:
        call(m, ratio=0.3, targets="mlp")
    msg = str(e.value)
    assert "model.layers.0.mlp.experts" in msg and "strides" in msg and "round_to=16" in msg
    assert isinstance(e.value, ModelFoldError)
    after = m.state_dict()  # the user's model is untouched
    assert all(torch.equal(before[k], after[k]) for k in before) and m.config.to_dict() == config
    assert m.model.layers[0].mlp.experts.down_proj.shape[-1] == 176
    out(m, inputs())
    # the way out the message names
    assert out(call(m, ratio=0.3, targets="mlp", round_to=16), inputs()).shape == (2, 9, 61)
    # verify=False hands the broken result out, and it fails when used
    broken = call(m, ratio=0.3, targets="mlp", verify=False)
    with pytest.raises(RuntimeError, match="strides"):
        out(broken, inputs())


def test_save_refuses_a_model_that_cannot_run(monkeypatch, tmp_path) -> None:
    _unaligned(monkeypatch)
    broken = H.prune_model(_mixtral(), 0.3, verify=False)
    with pytest.raises(ResultError, match="model.layers.0.mlp.experts"):
        H.save(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_save_gguf_refuses_a_model_that_cannot_run(tmp_path) -> None:
    pytest.importorskip("gguf")
    m = H.prune_model(make_model("llama"), 0.3)
    m.model.layers[1].mlp.down_proj = torch.nn.Linear(5, 32)  # a width the producers do not have
    with pytest.raises(ResultError, match=r"model\.layers\.1\.mlp\.down_proj"):
        H.save_gguf(m, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_check_layer_runs_on_a_meta_skeleton(monkeypatch, tmp_path) -> None:
    """The layer-by-layer check: layer i materialised (and folded), the rest of the model on meta."""
    from modelfold.hf.checkpoint.source import load_layer, open_source, release_layer

    m = _mixtral()
    H.save(m, tmp_path / "src")
    src = open_source(tmp_path / "src")
    for i in range(2):
        load_layer(src, i)
        check_layer_runs(src.model, src.adapter, i)  # unfolded: runs
        release_layer(src, i)
    _unaligned(monkeypatch)
    load_layer(src, 1)
    from modelfold.hf.model import prune_layer_fn

    prune_layer_fn()(src.model, src.adapter, 1, {"mlp": 0.3})  # 123 neurons per expert
    with pytest.raises(ResultError, match=r"layer 1 .*model\.layers\.1\.mlp\.experts"):
        check_layer_runs(src.model, src.adapter, 1)
    with pytest.raises(ValueError, match="materialised"):
        check_layer_runs(src.model, src.adapter, 0)  # still on meta


def test_check_layer_runs_in_memory_every_family() -> None:
    for family in ALL_FAMILIES:
        m = _model(family)
        a = find_adapter(m)
        for i in range(LAYERS):
            check_layer_runs(m, a, i)
        check_model_runs(m, a)


@pytest.mark.parametrize("family", ENCODERS[:1] + ("gemma3",))
def test_tiny_ids_avoid_special_tokens(family: str) -> None:
    from modelfold.hf.runcheck import tiny_ids

    m = _model(family)
    ids = tiny_ids(m)
    assert ids.shape == (2, 8) and int(ids.min()) >= 2 and int(ids.max()) < m.get_input_embeddings().num_embeddings
    if family == "gemma3":
        assert m.config.image_token_index not in ids.tolist()


def test_an_input_that_cannot_run_is_named() -> None:
    m = _mixtral(inter=14)  # 14 fp32 values = 56-byte rows: the original already fails grouped_mm
    with pytest.raises(ResultError, match="the input model fails the same check"):
        H.prune_model(m, 0.01)  # every expert stays whole (round(14 * 0.99) = 14)
