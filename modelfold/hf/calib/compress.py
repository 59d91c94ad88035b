"""compress_model: calibrated compression of a transformers model in memory, and its options object.

``CompressConfig`` holds every option of calibrated compression once; ``compress_model`` (in memory),
``compress_checkpoint`` (layer by layer) and the CLI build it once and pass it whole.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...checks import check_round_to, check_sparsity, check_weights
from ...device import model_device, resolve_device
from ...errors import InvalidRatioError
from ...report import FoldReport, count_params
from ..model import adapter_of, run_layers
from ..runcheck import check_model_runs
from . import data as cdata
from .layer import CalibOptions
from .sensitivity import sensitivity_plan
from .step import Calibrated


@dataclass(frozen=True)
class CompressConfig:
    """Every option of calibrated compression (see :func:`compress_model` for their meaning)."""

    ratio: float | Mapping | None = None
    sparsity: float | None = None
    calibration: Any = "self"
    tokenizer: Any = None
    method: str = "select"
    score: str = "act"
    compensate: str = "ls"
    budget: str = "auto"
    targets: str | Iterable[str] = "mlp"
    skip_first: int = 0
    skip_last: int = 0
    n_calib: int | None = None
    calib_len: int | None = None
    lam: float | str = "auto"
    feedback: bool = False
    weighting: str = "token"
    seed: int = 0
    n_init: int = 3
    attention_mode: str = "auto"
    max_ratio: float = 0.8
    round_to: int | None = None

    def options(self) -> CalibOptions:
        """The per-layer step's options (checks ``budget``, ``round_to`` and the step's own choices)."""
        if self.budget not in ("auto", "uniform"):
            raise InvalidRatioError(f"budget must be 'auto' or 'uniform', got {self.budget!r}")
        return CalibOptions(method=self.method, score=self.score, compensate=self.compensate, lam=self.lam,
                            feedback=self.feedback, weighting=self.weighting, attention_mode=self.attention_mode,
                            seed=self.seed, n_init=self.n_init, round_to=check_round_to(self.round_to))

    @property
    def name(self) -> str:
        """The report's method name, e.g. ``select-act+ls``."""
        return {"select": f"select-{self.score}", "fold": "fold-act"}[self.method] + \
            ("+ls" if self.compensate == "ls" else "")

    @property
    def auto(self) -> bool:
        """True when the per-layer ratios come from the measured sensitivity."""
        return self.budget == "auto" and self.sparsity is not None

    @property
    def self_made(self) -> bool:
        """True when the calibration data are made by the model (``"self"``)."""
        return isinstance(self.calibration, str)

    def ids(self, model: nn.Module, progress: bool = False, info: dict[str, Any] | None = None) -> torch.Tensor:
        """The calibration token ids for ``model`` (sampled, tokenized or as given)."""
        return cdata.resolve(model, self.calibration, self.tokenizer, n_seq=self.n_calib, seq_len=self.calib_len,
                             seed=self.seed, progress=progress, info=info)


def compress_model(model: nn.Module, ratio: float | Mapping | None = None, *, sparsity: float | None = None,
                   calibration: Any = "self", tokenizer: Any = None, method: str = "select", score: str = "act",
                   compensate: str = "ls", budget: str = "auto", targets: str | Iterable[str] = "mlp",
                   skip_first: int = 0, skip_last: int = 0, n_calib: int | None = None,
                   calib_len: int | None = None, lam: float | str = "auto",
                   feedback: bool = False, weighting: str = "token", seed: int = 0, n_init: int = 3,
                   attention_mode: str = "auto", max_ratio: float = 0.8, progress: bool = False,
                   return_report: bool = False, round_to: int | None = None, verify: bool = True,
                   device: str | torch.device | None = None) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Calibrated compression: activation-aware selection (or folding) + least-squares refit, sequential.

    calibration: "self" (text the causal LM samples itself; random vocabulary words for encoders, which
        need tokenizer=), a LongTensor of token ids (n, L), or a list of strings with tokenizer=.
    method: "select" (keep the neurons/heads with the highest ``score``) or "fold" (k-means on
        activation features, merge). compensate: "ls", "bias" or "none".
    budget: "auto" (with sparsity=: per-layer ratios from measured sensitivity and a global probe) or
        "uniform". score: "act" (default), "obs", "wanda", "flap" or "magnitude" (modelfold.calib.score).
    weighting: "token" (each token's error relative to its residual norm; default) or "none".
    feedback: refit MLP consumers towards the original model's residual stream (off: it overfits the
        small calibration sets measured so far; docs/calibration.md).
    device: where everything runs ("cpu", "cuda", "cuda:N", "auto"): a copy of the model is moved
        there (sampling, forward passes, least squares) and the result comes back on the model's device.
    Other arguments as in :func:`~modelfold.hf.model.fold_model` (``round_to``: kept widths at multiples
    of it; ``verify``: the result runs one forward before it is returned). See docs/calibration.md.
    """
    cfg = CompressConfig(ratio=ratio, sparsity=sparsity, calibration=calibration, tokenizer=tokenizer,
                         method=method, score=score, compensate=compensate, budget=budget, targets=targets,
                         skip_first=skip_first, skip_last=skip_last, n_calib=n_calib, calib_len=calib_len, lam=lam,
                         feedback=feedback, weighting=weighting, seed=seed, n_init=n_init,
                         attention_mode=attention_mode, max_ratio=max_ratio, round_to=round_to)
    work, report = compress_with(model, cfg, progress=progress, verify=verify, device=device)
    return (work, report) if return_report else work


def compress_with(model: nn.Module, cfg: CompressConfig, *, progress: bool = False, verify: bool = True,
                  device: str | torch.device | None = None) -> tuple[nn.Module, FoldReport]:
    """:func:`compress_model` with its options as one :class:`CompressConfig`; returns (model, report)."""
    if device is not None:
        dev, home = resolve_device(device), model_device(model)
        if dev != home:
            check_weights(model)
            work, report = compress_with(copy.deepcopy(model).to(dev), cfg, progress=progress, verify=False)
            work = work.to(home)
            if verify:  # where it is returned
                check_model_runs(work, adapter_of(work))
            return work, report
    round_to = check_round_to(cfg.round_to)
    opts = cfg.options()
    adapter = adapter_of(model)
    check_weights(model)
    check_sparsity(cfg.sparsity, cfg.ratio)  # before the calibration data are made
    adapter.check_heads(cfg.ratio, cfg.targets)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    ids = cfg.ids(model, progress, info)
    info["calibration_seconds"] = round(time.perf_counter() - t0, 2)
    info["calibration_tokens"] = int(ids.numel())
    run = cfg
    if cfg.auto:
        t1 = time.perf_counter()
        total = count_params(model)
        with torch.no_grad():
            plan, _ = sensitivity_plan(model, adapter, ids, cfg.sparsity * total, opts, cfg.targets,
                                       max_ratio=cfg.max_ratio, progress=progress)
        info["budget_seconds"] = round(time.perf_counter() - t1, 2)
        run = dataclasses.replace(cfg, ratio=plan, sparsity=None, skip_first=0, skip_last=0)
    work, report = run_layers(model, run.ratio, cfg.name, targets=cfg.targets, skip_first=run.skip_first,
                              skip_last=run.skip_last, progress=progress, repair="none",
                              layer_fn=Calibrated(ids, opts), sparsity=run.sparsity,
                              attention_mode=cfg.attention_mode, round_to=round_to, verify=verify)
    report.seconds = time.perf_counter() - t0
    report.repair = "calibrated"
    info["calibration"] = "self" if cfg.self_made else "data"
    info["plan"] = {g.root: g.channels_after for g in report.groups}
    report.repair_info = info
    return work, report
