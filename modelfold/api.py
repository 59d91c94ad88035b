"""Public entry points: fold, prune, channel_groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from . import checks
from .device import DeviceError, resolve_device
from .report import FoldReport
from .traced.engine import mark_user_kept
from .traced.groups import ChannelGroup, build_graph, iter_groups
from .traced.pipeline import TracedRun, run_traced
from .traced.planners import (
    activation_kmeans_planner,
    activation_planner,
    kmeans_planner,
    magnitude_planner,
    neuron_merging_planner,
)

REPAIRS = ("none", "ar", "dir", "data")
DEFAULT_GROUPING = "activation"  # calibrated folding; see docs/calibration-cnn.md for the measurement
CALIBRATION_OPTIONS = {"lam", "bn_reset", "compensate", "samples", "self_batch", "self_iters", "grouping",
                       "selection", "budget", "score_samples", "self_shape", "prior", "budget_refit"}


def channel_groups(model: nn.Module, example_inputs: Any, ignore: Iterable[nn.Module | str] = (),
                   verify: bool = True, keep_outputs: Iterable[nn.Module | str] = ()) -> list[ChannelGroup]:
    """Every conv/linear output channel space of ``model`` and how it is coupled.

    Groups that cannot be folded safely carry ``foldable=False`` and a reason.
    """
    work = checks.prepare(model, example_inputs)
    names = checks.ignore_names(work, model, ignore)
    kept = checks.ignore_names(work, model, keep_outputs, "keep_outputs")
    from .traced.engine import model_outputs, verify_coupling

    dg = build_graph(work, example_inputs)
    ignored = [m for n, m in work.named_modules() if n in names]
    out = []
    ref = model_outputs(work, example_inputs)
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


def _calibration_options(calibration: Any, options: dict | None, repair: str) -> dict:
    from .traced.sources import CalibrationError

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
        from .traced.repair import RepairError

        raise RepairError(f"repair must be one of {REPAIRS}, got {repair!r}")
    opts = _calibration_options(calibration, calibration_kwargs, repair)
    if calibration is not None and dev is not None and dev.type != "cpu":
        raise DeviceError("calibrated CNN folding (calibration= with example inputs) runs on the CPU for now; "
                          "drop device= (transformers models take device= here)")
    planner, method = kmeans_planner(seed, n_init, device=dev), "fold"
    if calibration is not None and opts.get("grouping", DEFAULT_GROUPING) == "activation":
        planner, method = activation_kmeans_planner(seed, n_init), "fold-act"
    extra = {"device": dev} if repair == "dir" and dev is not None else {}
    run = TracedRun(ratio=ratio, sparsity=sparsity, ignore=ignore, keep_outputs=keep_outputs, strict=strict,
                    verify=verify, seed=seed, progress=progress, repair=repair,
                    repair_kwargs={"data": data, "dir_batch": dir_batch, "dir_iters": dir_iters, "dir_lr": dir_lr,
                                   **extra, **(repair_kwargs or {})},
                    calibration=calibration, calib_opts=opts, round_to=round_to)
    out, report = run_traced(model, example_inputs, planner, method, run)
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
    run = TracedRun(ratio=ratio, sparsity=sparsity, ignore=ignore, keep_outputs=keep_outputs, strict=strict,
                    verify=verify, seed=seed, progress=progress, calibration=calibration, calib_opts=opts,
                    round_to=round_to)
    out, report = run_traced(model, example_inputs, planner, method, run)
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
