"""The traced-CNN pipeline: model -> channel groups -> plan -> merge / select -> repair or refit -> result.

``run_traced`` is what ``modelfold.fold`` / ``prune`` / ``compress`` (and the IFM baseline) run on a
CNN or MLP once the planner is chosen: it resolves ``sparsity=`` to a per-group plan, builds the
calibrator, runs the engine on a copy, repairs, checks the count and that the result runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .. import checks
from ..errors import InvalidRatioError, UnsupportedModelError
from ..report import FoldReport, count_macs, count_params
from .engine import USER_REASONS, Planner
from .engine import compress as compress_groups
from .groups import ChannelGroup


def calibrator(model: nn.Module, example_inputs: Any, calibration: Any, opts: dict, seed: int,
                progress: bool) -> tuple[Any, dict]:
    """(CNNCalibrator, info) for ``calibration``, or (None, {}) without one."""
    if calibration is None:
        return None, {}
    from .calibrator import CNNCalibrator
    from .sources import calibration_batches

    batches, info = calibration_batches(calibration, model, example_inputs, seed,
                                        max_samples=opts.get("samples", 1024), progress=progress,
                                        self_batch=opts.get("self_batch"), self_iters=opts.get("self_iters"),
                                        self_shape=opts.get("self_shape"))
    calib = CNNCalibrator(batches, lam=opts.get("lam", 1e-3), seed=seed, bn_reset=opts.get("bn_reset", False),
                          prior=opts.get("prior", True),
                          compensate=opts.get("compensate", True), score_samples=opts.get("score_samples", 128),
                          progress=progress)
    return calib, info


@dataclass(frozen=True)
class TracedRun:
    """Every option of one traced-CNN run (fold, prune, compress, IFM), passed whole to :func:`run_traced`."""

    ratio: float | None = None
    sparsity: float | None = None
    ignore: Iterable[nn.Module | str] = ()
    keep_outputs: Iterable[nn.Module | str] = ()
    strict: bool = False
    verify: bool = True
    seed: int = 0
    progress: bool = False
    repair: str = "none"
    repair_kwargs: dict | None = None
    calibration: Any = None
    calib_opts: dict | None = None
    round_to: int | None = None


def run_traced(model: nn.Module, example_inputs: Any, planner: Planner, method: str,
               run: TracedRun) -> tuple[nn.Module, FoldReport]:
    """Compress ``model`` (a copy) with ``planner`` on every channel group: the traced-CNN pipeline behind
    fold / prune / compress (ratio or sparsity, repair, calibration, round_to, the result checked)."""
    sparsity, strict, verify, seed, progress, repair = (run.sparsity, run.strict, run.verify, run.seed,
                                                        run.progress, run.repair)
    t0 = time.perf_counter()
    ratio = checks.ratio_or_sparsity(run.ratio, sparsity)
    round_to = checks.check_round_to(run.round_to)
    calib_opts = run.calib_opts or {}
    work = checks.prepare(model, example_inputs)
    names = checks.ignore_names(work, model, run.ignore)
    kept = checks.ignore_names(work, model, run.keep_outputs, "keep_outputs")
    calib, calib_info = calibrator(model, example_inputs, run.calibration, calib_opts, seed, progress)
    plan: float | dict[str, float] = ratio
    run_info: dict[str, Any] = {"round_to": round_to} if round_to else {}
    if sparsity is not None and calib is not None and calib_opts.get("budget", "auto") == "auto":
        from .budget import auto_budget, counter, foldable_groups

        t1 = time.perf_counter()
        groups = foldable_groups(work, example_inputs, names, kept, verify, seed)
        count = counter(work, example_inputs, names, kept, round_to, groups, calib)
        plan, budget_info = auto_budget(work, example_inputs, calib, sparsity, names, kept, count, groups, round_to,
                                        progress=progress, refit=calib_opts.get("budget_refit", False))
        calib_info.update(budget_info, budget_seconds=round(time.perf_counter() - t1, 2))
        ratio = sum(plan.values()) / max(1, len(plan))
        run_info.update(sparsity=sparsity, sparsity_planned=budget_info["sparsity_planned"])
    elif sparsity is not None:
        from .budget import plan_for_sparsity

        ratio, plan, planned = plan_for_sparsity(work, example_inputs, sparsity, names, kept, round_to,
                                                  verify=verify, seed=seed, calib=calib)
        run_info.update(sparsity=sparsity, sparsity_planned=round(planned, 6))
    # run_info["sparsity"]: asked; report.param_sparsity: what was removed (the planned count, measured)
    params0, macs0 = count_params(work), count_macs(work, example_inputs)

    from .repair import make_repair

    fixer = make_repair(repair, model=model, example_inputs=example_inputs, seed=seed,
                        progress=progress, **(run.repair_kwargs or {}))
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
        from ..calib.budget import SPARSITY_TOL

        got = 1.0 - count_params(work) / params0
        if abs(got - sparsity) > SPARSITY_TOL:
            raise InvalidRatioError(
                f"sparsity={sparsity:.3f}: the compressed model has {got:.3f} of the parameters removed, not the "
                f"planned {run_info['sparsity_planned']:.3f} (repair={repair!r} changed the parameter count); "
                f"ask for sparsity={min(0.99, sparsity + run_info['sparsity_planned'] - got):.3f} to land on "
                f"{sparsity:.3f}, or use another repair")
    if verify:  # the result runs once (example's first item) before it is handed out; ``model`` is untouched
        from ..runcheck import check_cnn_runs

        check_cnn_runs(work, example_inputs)
    info = dict(fixer.summary)
    if calib is not None:
        info.update(calib_info, refit=calib.info["refit"], refit_skipped=calib.info["refit_skipped"])
    report = FoldReport(method, ratio, params0, count_params(work), macs0,
                        count_macs(work, example_inputs), time.perf_counter() - t0, groups, repair, info,
                        run_info)
    return work, report
