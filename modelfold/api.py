"""Public entry points: fold, prune, channel_groups."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from . import checks
from .device import DeviceError, resolve_device
from .engine import USER_REASONS, Planner, mark_user_kept
from .engine import compress as compress_groups
from .errors import InvalidRatioError, UnsupportedModelError
from .groups import ChannelGroup, build_graph, iter_groups
from .policies import (
    activation_kmeans_planner,
    activation_planner,
    kmeans_planner,
    magnitude_planner,
    neuron_merging_planner,
)
from .report import FoldReport, count_macs, count_params

REPAIRS = ("none", "ar", "dir", "data")
DEFAULT_GROUPING = "activation"  # calibrated folding; see docs/calibration-cnn.md for the measurement
CALIBRATION_OPTIONS = {"lam", "bn_reset", "compensate", "samples", "self_batch", "self_iters", "grouping",
                       "selection", "budget", "score_samples", "self_shape", "prior"}


def channel_groups(model: nn.Module, example_inputs: Any, ignore: Iterable[nn.Module | str] = (),
                   verify: bool = True, keep_outputs: Iterable[nn.Module | str] = ()) -> list[ChannelGroup]:
    """Every conv/linear output channel space of ``model`` and how it is coupled.

    Groups that cannot be folded safely carry ``foldable=False`` and a reason.
    """
    work = checks.prepare(model, example_inputs)
    names = checks.ignore_names(work, model, ignore)
    kept = checks.ignore_names(work, model, keep_outputs, "keep_outputs")
    from .engine import _outputs, verify_coupling

    dg = build_graph(work, example_inputs)
    ignored = [m for n, m in work.named_modules() if n in names]
    out = []
    ref = _outputs(work, example_inputs)
    for i, (_, cg) in enumerate(iter_groups(dg, ignored)):
        mark_user_kept(cg, names, kept)
        if cg.foldable and verify and not verify_coupling(work, cg, example_inputs, i, ref):
            cg.foldable, cg.reason = False, "coupling not verified: an op mixes channels in a way the tracer missed"
        out.append(cg)
    return out


def _reject_cnn_only(**options: Iterable) -> None:
    """Transformers adapters plan per layer (``targets=``); module-level options would be ignored."""
    given = sorted(k for k, v in options.items() if list(v))
    if given:
        raise TypeError(f"{', '.join(given)} is not supported for transformers models; choose what folds "
                        "with targets= (e.g. 'mlp', 'attention' or {layer: ratio}) instead")


def _measured_sparsity(work: nn.Module, example_inputs: Any, ignore: set[str], keep_outputs: set[str],
                       round_to: int | None = None, groups: dict | None = None, calib: Any = None):
    """count(plan): the parameter fraction a first-k compression of ``work`` with ``plan`` (one ratio
    or {group root: ratio}) removes, widths rounded as the real compression rounds them (and the
    biases a calibrated refit adds counted; ``calib.cnn_budget.counter``)."""
    from .calib.cnn_budget import counter

    return counter(work, example_inputs, ignore, keep_outputs, round_to, groups, calib)


MAX_RATIO = 0.95  # the largest per-group ratio sparsity= may choose


def _plan_for_sparsity(work: nn.Module, example_inputs: Any, sparsity: float, ignore: set[str],
                       keep_outputs: set[str], round_to: int | None = None, *, verify: bool = True, seed: int = 0,
                       calib: Any = None) -> tuple[float, dict[str, float], float]:
    """(ratio, plan, planned sparsity): one channel ratio for every group the engine will reduce whose
    compressed model removes ``sparsity`` of the parameters within ``calib.budget.SPARSITY_TOL``.

    The ratio is bisected against the measured count; groups whose width the ratio leaves between two
    integers keep the floor or the ceiling (a uniform ratio, rounded per group) so that coarse widths
    still land on the target. Raises InvalidRatioError naming the nearest reachable sparsity."""
    from .calib.budget import SPARSITY_TOL, exhaustive, refine, settle, unreachable
    from .calib.cnn_budget import foldable_groups, levels, snap

    groups = foldable_groups(work, example_inputs, ignore, keep_outputs, verify, seed)
    count = _measured_sparsity(work, example_inputs, ignore, keep_outputs, round_to, groups, calib)
    sizes = {r: cg.size for r, cg in groups.items()}

    def at(r: float) -> dict[str, float]:
        return snap({g: r for g in groups}, sizes, round_to)

    top = count(at(MAX_RATIO))
    if sparsity > top + SPARSITY_TOL:
        raise InvalidRatioError(
            f"sparsity={sparsity:.3f} is not reachable: removing {MAX_RATIO:.0%} of every foldable group's "
            f"channels removes only {top:.1%} of the parameters; the nearest reachable sparsity is {top:.3f}. "
            "Ask for at most that, or check the report for groups kept intact.")
    ratio, got = settle(lambda r: count(at(r)), 0.0, MAX_RATIO, sparsity, steps=16)
    plan = at(ratio)
    if abs(got - sparsity) > SPARSITY_TOL / 4:  # coarse widths: correct single groups
        lv = {g: levels(n, round_to, MAX_RATIO) for g, n in sizes.items()}
        plan, got = refine(plan, got, count, lv, sparsity, SPARSITY_TOL / 4)
        if abs(got - sparsity) > SPARSITY_TOL / 4 and count.cheap:  # few groups: try every width combination
            found = exhaustive(count, lv, sparsity, lambda p: sum((r - ratio) ** 2 for r in p.values()))
            if found is not None and abs(found[1] - sparsity) < abs(got - sparsity):
                plan, got = found
    got = count.measure(plan)  # the plan's real count
    if abs(got - sparsity) > SPARSITY_TOL:
        raise unreachable(sparsity, got, "one ratio for every group (rounded per group) moves in channel steps "
                          "too coarse for this network")
    return ratio, plan, got


def _ratio_for_sparsity(work: nn.Module, example_inputs: Any, sparsity: float,
                        ignore: set[str], keep_outputs: set[str], round_to: int | None = None) -> float:
    """The channel ratio whose pruned/folded model removes about ``sparsity`` of the params (the
    per-group plan that meets it exactly: :func:`_plan_for_sparsity`)."""
    return _plan_for_sparsity(work, example_inputs, sparsity, ignore, keep_outputs, round_to)[0]


def _calibration_options(calibration: Any, options: dict | None, repair: str) -> dict:
    from .calib.cnn_sources import CalibrationError

    options = dict(options or {})
    unknown = sorted(set(options) - CALIBRATION_OPTIONS)
    if unknown:
        raise CalibrationError(f"unknown calibration_kwargs {unknown}; known: {sorted(CALIBRATION_OPTIONS)}")
    if options and calibration is None:
        raise CalibrationError("calibration_kwargs= needs calibration= ('self', a tensor or a DataLoader)")
    if calibration is not None and repair != "none":
        raise CalibrationError(f"calibration= replaces repair={repair!r}: calibrated compression refits the "
                               "layers itself (and can re-estimate BatchNorm statistics with "
                               "calibration_kwargs={'bn_reset': True}); drop one of the two")
    return options


def _calibrator(model: nn.Module, example_inputs: Any, calibration: Any, opts: dict, seed: int,
                progress: bool) -> tuple[Any, dict]:
    """(CNNCalibrator, info) for ``calibration``, or (None, {}) without one."""
    if calibration is None:
        return None, {}
    from .calib.cnn import CNNCalibrator
    from .calib.cnn_sources import calibration_batches

    batches, info = calibration_batches(calibration, model, example_inputs, seed,
                                        max_samples=opts.get("samples", 1024), progress=progress,
                                        self_batch=opts.get("self_batch"), self_iters=opts.get("self_iters"),
                                        self_shape=opts.get("self_shape"))
    calib = CNNCalibrator(batches, lam=opts.get("lam", 1e-3), seed=seed, bn_reset=opts.get("bn_reset", False),
                          prior=opts.get("prior", True),
                          compensate=opts.get("compensate", True), score_samples=opts.get("score_samples", 128))
    return calib, info


def _run(model: nn.Module, example_inputs: Any, ratio: float | None, sparsity: float | None,
         planner: Planner, method: str, *, ignore: Iterable[nn.Module | str], strict: bool,
         verify: bool, seed: int, progress: bool, repair: str = "none",
         repair_kwargs: dict | None = None,
         keep_outputs: Iterable[nn.Module | str] = (), calibration: Any = None,
         calib_opts: dict | None = None, round_to: int | None = None) -> tuple[nn.Module, FoldReport]:
    t0 = time.perf_counter()
    ratio = checks.ratio_or_sparsity(ratio, sparsity)
    round_to = checks.check_round_to(round_to)
    calib_opts = calib_opts or {}
    work = checks.prepare(model, example_inputs)
    names = checks.ignore_names(work, model, ignore)
    kept = checks.ignore_names(work, model, keep_outputs, "keep_outputs")
    calib, calib_info = _calibrator(model, example_inputs, calibration, calib_opts, seed, progress)
    plan: float | dict[str, float] = ratio
    run_info: dict[str, Any] = {"round_to": round_to} if round_to else {}
    if sparsity is not None and calib is not None and calib_opts.get("budget", "auto") == "auto":
        from .calib.cnn_budget import auto_budget, foldable_groups

        groups = foldable_groups(work, example_inputs, names, kept, verify, seed)
        count = _measured_sparsity(work, example_inputs, names, kept, round_to, groups, calib)
        plan, budget_info = auto_budget(work, example_inputs, calib, sparsity, names, kept, count, groups, round_to)
        calib_info.update(budget_info)
        ratio = sum(plan.values()) / max(1, len(plan))
        run_info.update(sparsity=sparsity, sparsity_planned=budget_info["sparsity_planned"])
    elif sparsity is not None:
        ratio, plan, planned = _plan_for_sparsity(work, example_inputs, sparsity, names, kept, round_to,
                                                  verify=verify, seed=seed, calib=calib)
        run_info.update(sparsity=sparsity, sparsity_planned=round(planned, 6))
    # run_info["sparsity"]: asked; report.param_sparsity: what was removed (the planned count, measured)
    params0, macs0 = count_params(work), count_macs(work, example_inputs)

    from .repair import make_repair

    fixer = make_repair(repair, model=model, example_inputs=example_inputs, seed=seed,
                        progress=progress, **(repair_kwargs or {}))
    work = fixer.before(work)

    def on_kept(cg: ChannelGroup) -> None:
        if strict and cg.reason not in USER_REASONS:
            raise UnsupportedModelError(
                f"group rooted at '{cg.root}' cannot be folded safely: {cg.reason}. "
                f"Pass ignore=[...] with the modules named there to keep them intact, or strict=False "
                "to leave such groups unfolded and listed in the report.")

    groups = compress_groups(work, example_inputs, plan, fixer.wrap(planner), ignore=names, keep_outputs=kept, verify=verify,
                             seed=seed, progress=progress, on_kept=on_kept, calib=calib, round_to=round_to)
    work = fixer.after(work)
    work.eval()
    if sparsity is not None:  # the plan's count is exact; a repair that adds parameters is caught here
        from .calib.budget import SPARSITY_TOL

        got = 1.0 - count_params(work) / params0
        if abs(got - sparsity) > SPARSITY_TOL:
            raise InvalidRatioError(
                f"sparsity={sparsity:.3f}: the compressed model has {got:.3f} of the parameters removed, not the "
                f"planned {run_info['sparsity_planned']:.3f} (repair={repair!r} changed the parameter count); "
                f"ask for sparsity={min(0.99, sparsity + run_info['sparsity_planned'] - got):.3f} to land on "
                f"{sparsity:.3f}, or use another repair")
    if verify:  # the result runs once (example's first item) before it is handed out; ``model`` is untouched
        from .runcheck import check_cnn_runs

        check_cnn_runs(work, example_inputs)
    info = dict(fixer.summary)
    if calib is not None:
        info.update(calib_info, refit=calib.info["refit"], refit_skipped=calib.info["refit_skipped"])
    report = FoldReport(method, ratio, params0, count_params(work), macs0,
                        count_macs(work, example_inputs), time.perf_counter() - t0, groups, repair, info,
                        run_info)
    return work, report


def fold(model: nn.Module, example_inputs: Any = None, ratio: float | None = None, *,
         sparsity: float | None = None, repair: str = "none", data: Any = None,
         ignore: Iterable[nn.Module | str] = (), keep_outputs: Iterable[nn.Module | str] = (),
         strict: bool = False, seed: int = 0, n_init: int = 3, verify: bool = True, progress: bool = False,
         return_report: bool = False, dir_batch: int | None = None, dir_iters: int | None = None,
         dir_lr: float | None = None, repair_kwargs: dict | None = None, device: str | Any = None,
         calibration: Any = None, calibration_kwargs: dict | None = None, round_to: int | None = None,
         **kwargs: Any) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold ``model``: cluster similar channels with k-means and merge each cluster.

    ratio: fraction of channels removed in every foldable group (k = max(1, round(n(1-ratio)))).
    sparsity: alternatively, the fraction of parameters to remove (the ratio is solved for; also for
        transformers models, see docs/transformers.md).
    repair: "none" (Fold-Naive), "ar" (Fold-AR), "dir" (Fold-DIR) or "data" (Fold-R, needs data=).
    ignore: modules kept intact (input and output channels); keep_outputs: modules whose output
    channels (and every group coupled to them, e.g. a residual stream) are kept, inputs may fold.
    dir_batch/dir_iters/dir_lr: DeepInversion budget of Fold-DIR; repair_kwargs: further repair
    options (see docs/repair.md).
    calibration: "self" (inputs the model makes itself, no user data), a tensor of inputs or a
    DataLoader: calibrated folding (CNNs: activation-aware grouping, least-squares refit of the
    consumers, automatic per-group budgets for ``sparsity=``, see docs/calibration-cnn.md;
    transformers: docs/calibration.md). calibration_kwargs (CNNs): grouping="activation"|"weight",
    lam, bn_reset, budget="auto"|"uniform", self_batch/self_iters/self_shape, samples.
    device: where k-means and DeepInversion run ("cpu", "cuda", "cuda:N" or "auto"); the model and
        the result stay on the model's device.
    round_to: hardware-friendly widths, e.g. 8, 16 or 64: every reduced group (transformers: MLP width,
        heads x head_dim) keeps the multiple of it nearest to k, at least one multiple and never more than
        its width; groups narrower than round_to, or left whole by the ratio, stay whole. sparsity= takes
        the rounding into account. None or 1: no rounding. Runtime width constraints are honoured on top
        of it (transformers MoE experts: multiples of 8; ``report.info["align"]``, docs/families.md).
    verify: check before trusting (default True). CNNs: every group's channel coupling is verified by
        perturbation before it folds (a group that fails stays whole, listed in the report). All models:
        the result runs one forward before it is returned (CNNs: the example input's first item;
        transformers: a (2, 8) batch of token ids, in the model's own class); if it cannot, a
        ``ResultError`` names the failing module and the way out, and nothing is returned. False skips both.
    Returns a new, physically smaller module; ``model`` is not modified.
    """
    dev = None if device is None else resolve_device(device)
    round_to = checks.check_round_to(round_to)
    if example_inputs is None:
        from . import hf

        if hf.is_supported(model):
            _reject_cnn_only(ignore=ignore, keep_outputs=keep_outputs)
            _reject_cnn_only(calibration_kwargs=calibration_kwargs or {})
            if calibration is not None:  # calibrated folding: activation k-means + LS refit
                if repair != "none":
                    raise TypeError("repair= does not apply to calibrated transformers folding (calibration=)")
                return hf.compress_model(model, ratio=ratio, sparsity=sparsity, method="fold", seed=seed,
                                         n_init=n_init, progress=progress, return_report=return_report,
                                         calibration=calibration, round_to=round_to, device=dev, verify=verify, **kwargs)
            return hf.fold_model(model, ratio=ratio, sparsity=sparsity, repair=repair, seed=seed, n_init=n_init, progress=progress,
                                 return_report=return_report, device=dev, round_to=round_to, verify=verify, **kwargs)
        raise hf.unsupported(model) if hf.is_transformers(model) else checks.missing_inputs(model)
    if kwargs:
        raise TypeError(f"fold() got unexpected arguments {sorted(kwargs)}")
    if repair not in REPAIRS:
        from .repair import RepairError

        raise RepairError(f"repair must be one of {REPAIRS}, got {repair!r}")
    opts = _calibration_options(calibration, calibration_kwargs, repair)
    if calibration is not None and dev is not None and dev.type != "cpu":
        raise DeviceError("calibrated CNN folding (calibration= with example inputs) runs on the CPU for now; "
                          "drop device= (transformers models take device= here)")
    planner, method = kmeans_planner(seed, n_init, device=dev), "fold"
    if calibration is not None and opts.get("grouping", DEFAULT_GROUPING) == "activation":
        planner, method = activation_kmeans_planner(seed, n_init), "fold-act"
    extra = {"device": dev} if repair == "dir" and dev is not None else {}
    out, report = _run(model, example_inputs, ratio, sparsity, planner, method,
                       ignore=ignore, keep_outputs=keep_outputs, strict=strict, verify=verify, seed=seed,
                       progress=progress, repair=repair, repair_kwargs={"data": data, "dir_batch": dir_batch, "dir_iters": dir_iters,
                                                     "dir_lr": dir_lr, **extra, **(repair_kwargs or {})},
                       calibration=calibration, calib_opts=opts, round_to=round_to)
    return (out, report) if return_report else out


def prune(model: nn.Module, example_inputs: Any = None, ratio: float | None = None, *,
          sparsity: float | None = None, norm: int = 2, ignore: Iterable[nn.Module | str] = (),
          keep_outputs: Iterable[nn.Module | str] = (), strict: bool = False, seed: int = 0, verify: bool = True, progress: bool = False,
          return_report: bool = False, merge: str | None = None, merge_threshold: float = 0.45,
          calibration: Any = None, calibration_kwargs: dict | None = None, round_to: int | None = None,
          **kwargs: Any) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Structured magnitude pruning (SP-L1/SP-L2) on the same channel groups as ``fold`` (``round_to`` and
    ``verify`` too: the result runs one forward before it is returned).

    merge="neuron" (CNNs): Neuron Merging (Kim et al. 2020, data-free): each pruned channel's consumer
    columns go to its most similar kept channel (cosine of the effective producer rows >=
    ``merge_threshold``). calibration: "self", a tensor or a DataLoader: calibrated selection
    (activation-aware scores, least-squares refit of the consumers, automatic budgets for
    ``sparsity=``; CNNs: docs/calibration-cnn.md, transformers: docs/calibration.md).
    """
    round_to = checks.check_round_to(round_to)
    if example_inputs is None:
        from . import hf

        if hf.is_supported(model):
            _reject_cnn_only(ignore=ignore, keep_outputs=keep_outputs)
            _reject_cnn_only(calibration_kwargs=calibration_kwargs or {}, merge=[merge] if merge else [])
            if calibration is not None:  # activation-aware selection + LS refit
                return hf.compress_model(model, ratio=ratio, sparsity=sparsity, method="select", seed=seed,
                                         progress=progress, return_report=return_report, calibration=calibration,
                                         round_to=round_to, verify=verify, **kwargs)
            return hf.prune_model(model, ratio=ratio, sparsity=sparsity, norm=norm, seed=seed, progress=progress,
                                  return_report=return_report, round_to=round_to, verify=verify, **kwargs)
        raise hf.unsupported(model) if hf.is_transformers(model) else checks.missing_inputs(model)
    if kwargs:
        raise TypeError(f"prune() got unexpected arguments {sorted(kwargs)}")
    opts = _calibration_options(calibration, calibration_kwargs, "none")
    planner, method = magnitude_planner(norm), f"sp-l{norm}"
    if merge not in (None, "neuron"):
        from .errors import ModelFoldError

        raise ModelFoldError(f"merge={merge!r}: the only merge is 'neuron' (Neuron Merging); or leave it None")
    if merge == "neuron":
        planner, method = neuron_merging_planner(merge_threshold), "neuron-merging"
    elif calibration is not None and opts.get("selection", "activation") == "activation":
        planner, method = activation_planner(), "sp-act"
    out, report = _run(model, example_inputs, ratio, sparsity, planner, method,
                       ignore=ignore, keep_outputs=keep_outputs, strict=strict, verify=verify, seed=seed,
                       progress=progress, calibration=calibration, calib_opts=opts, round_to=round_to)
    return (out, report) if return_report else out


def compress(model: nn.Module, example_inputs: Any = None, ratio: float | None = None, *,
             sparsity: float | None = None, calibration: Any = "self", return_report: bool = False,
             **kwargs: Any) -> nn.Module | tuple[nn.Module, FoldReport]:
    """The best measured compression without user data: calibrated, with least-squares compensation.

    ``calibration="self"`` lets the model make its own calibration set (text a causal LM samples,
    random vocabulary words for encoders with ``tokenizer=``); pass token ids or texts (with
    ``tokenizer=``) to calibrate on your own data. With ``sparsity=`` the per-layer ratios come from
    measured sensitivity (``budget="auto"``). Transformers models: activation-aware selection of
    MLP neurons / heads with a least-squares refit of their consumers (docs/calibration.md). CNNs
    (with ``example_inputs``): ``prune(..., calibration=...)``, see docs/calibration-cnn.md.
    """
    from . import hf

    if example_inputs is None and hf.is_supported(model):
        return hf.compress_model(model, ratio=ratio, sparsity=sparsity, calibration=calibration,
                                 return_report=return_report, **kwargs)
    if example_inputs is None:
        raise hf.unsupported(model) if hf.is_transformers(model) else checks.missing_inputs(model)
    # CNNs: calibrated selection (activation scores + least-squares refit; automatic budgets for sparsity=).
    return prune(model, example_inputs, ratio, sparsity=sparsity, calibration=calibration,
                 return_report=return_report, **kwargs)


__all__ = ["channel_groups", "compress", "fold", "prune", "REPAIRS"]
