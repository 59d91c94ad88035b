"""fold_model / prune_model: run a per-layer plan through a family adapter (``run_layers``), in memory."""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..checks import check_round_to, check_weights
from ..device import resolve_device
from ..errors import InvalidRatioError
from ..report import FoldReport, GroupReport, count_params
from .adapters import Adapter, find_adapter
from .attention import fold_attention, prune_attention
from .io import drop_gguf_quantizer
from .mlp import fold_mlp, prune_mlp
from .plan import make_plan
from .runcheck import check_model_runs
from .sizing import ratio_for_sparsity

HF_REPAIRS = ("none", "ar")


def adapter_of(model: Any) -> Adapter:
    a = find_adapter(model)
    if a is None:
        from .validate import unsupported_type

        raise unsupported_type(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)
    return a


def record_sizes(model: nn.Module, adapter: Adapter) -> None:
    """Write the per-layer sizes into ``model.config`` (uniform -> family fields, else modelfold_layers)."""
    config = model.config
    sizes = [adapter.sizes(model, i) for i in range(len(adapter.layers(model)))]
    orig = getattr(config, "modelfold_original", None) or adapter.config_sizes(config)
    merged: dict[str, int] = {}
    uniform = all(merged.setdefault(k, v) == v for s in sizes for k, v in s.items())
    heads_changed = any(s["num_attention_heads"] != orig["num_attention_heads"] for s in sizes)
    if uniform and (adapter.vanilla_heads or not heads_changed):
        adapter.set_uniform_config(config, merged)
        if hasattr(config, "modelfold_layers"):
            del config.modelfold_layers
    else:
        # Keep the family fields at the original sizes (vanilla from_pretrained then fails loudly with
        # a size mismatch instead of loading garbage) and record the real ones for load_pretrained.
        config.modelfold_original = orig
        config.modelfold_layers = sizes


def resolve_ratio(model: nn.Module, adapter: Adapter, ratio: float | Mapping | None, sparsity: float | None, *,
                  targets: str | Iterable[str], skip_first: int, skip_last: int, attention_mode: str,
                  round_to: int | None = None) -> float | Mapping | None:
    """``ratio`` as given, or the uniform ratio that removes ``sparsity`` of the parameters."""
    adapter.check_heads(ratio, targets)  # e.g. MPNet: no head count can change
    if sparsity is None:
        return ratio
    if ratio is not None:
        raise InvalidRatioError("give either ratio= or sparsity=, not both")
    return ratio_for_sparsity(model, adapter, sparsity, targets=targets, skip_first=skip_first,
                              skip_last=skip_last, attention_mode=attention_mode, round_to=round_to)


def run_layers(model: nn.Module, ratio: float | Mapping | None, method: str, *, targets: str | Iterable[str],
         skip_first: int, skip_last: int, progress: bool, repair: str, layer_fn,
         sparsity: float | None = None, attention_mode: str = "auto",
         round_to: int | None = None, verify: bool = True) -> tuple[nn.Module, FoldReport]:
    t0 = time.perf_counter()
    adapter = adapter_of(model)
    check_weights(model)
    n_layers = len(adapter.layers(model))
    ratio = resolve_ratio(model, adapter, ratio, sparsity, targets=targets, skip_first=skip_first,
                          skip_last=skip_last, attention_mode=attention_mode, round_to=round_to)
    plan = make_plan(ratio, n_layers, targets, skip_first, skip_last)
    work = copy.deepcopy(model)
    drop_gguf_quantizer(work)  # GGUF weights are already dequantized; let the result be saved
    params0 = count_params(work)
    groups: list[GroupReport] = []
    with torch.no_grad():
        for i in range(n_layers):
            t1 = time.perf_counter()
            groups.extend(layer_fn(work, adapter, i, plan.get(i, {})))
            if progress:
                print(f"modelfold: layer {i + 1}/{n_layers} {time.perf_counter() - t1:.2f}s", file=sys.stderr)
    record_sizes(work, adapter)
    work.eval()
    if verify:  # a result that cannot run is never handed out (``work`` is a copy: ``model`` is untouched)
        check_model_runs(work, adapter, original=model)
    rmax = max((r for p in plan.values() for r in p.values()), default=0.0)
    per_layer = {"ratios": "per layer"} if len({r for p in plan.values() for r in p.values()}) > 1 else {}
    report = FoldReport(method, rmax, params0, count_params(work), None, None, time.perf_counter() - t0,
                        groups, repair, info={**width_info(work, adapter, round_to), **per_layer})
    return work, report


def width_info(model: nn.Module, adapter: Adapter, round_to: int | None) -> dict[str, Any]:
    """The report's width rules: the user's ``round_to`` and the runtime alignment honoured per kind
    (e.g. ``{"align": {"experts": 8}}``: every expert keeps a multiple of 8 neurons)."""
    align = adapter.align(model)
    return {**({"round_to": round_to} if round_to else {}), **({"align": align} if align else {})}


LayerFn = Callable[[nn.Module, Adapter, int, dict], list[GroupReport]]


def fold_layer_fn(*, repair: str = "none", seed: int = 0, n_init: int = 3,
                  attention_mode: str = "auto", device: str | torch.device | None = None,
                  round_to: int | None = None) -> LayerFn:
    """The per-layer step of ``fold_model``: fold layer ``i`` of ``work`` in place by its plan entry.

    A pure function of that layer's tensors and the plan, shared by the in-memory path and the
    layer-by-layer checkpoint path (``modelfold.hf.checkpoint``), so both give bit-identical weights.
    ``round_to``: kept MLP widths and head widths rounded to multiples of it (``checks.kept_width``).
    """
    round_to = check_round_to(round_to)
    if repair not in HF_REPAIRS:
        raise ValueError(f"repair={repair!r} is not available for transformers models; use one of {HF_REPAIRS}")
    device = None if device is None else resolve_device(device)  # clustering runs there
    warned = []

    def layer(work: nn.Module, adapter: Adapter, i: int, p: dict[str, float]) -> list[GroupReport]:
        out = []
        if "attention" in p:
            spec = adapter.attention(work, i)
            before, after, err = fold_attention(spec, p["attention"], adapter, mode=attention_mode, seed=seed,
                                                n_init=n_init, device=device, round_to=round_to)
            done = after < before
            out.append(GroupReport(spec.name, spec.names, before, after, "folded" if done else "kept",
                                   "" if done else "ratio too small to remove a head", err if done else None))
        for spec in adapter.mlps(work, i) if "mlp" in p else ():  # one per expert in MoE layers
            if repair == "ar" and len(spec.producers) > 1 and not warned:
                warned.append(True)
                warnings.warn("repair='ar' on a gated (SwiGLU) MLP: in our SmolLM2 benchmark it raised perplexity "
                              "by orders of magnitude; prefer repair='none' (see docs/transformers.md)", stacklevel=4)
            n = spec.width
            k = spec.kept(p["mlp"], round_to)  # round_to and the runtime's alignment (experts: 8)
            err = fold_mlp(spec, k, seed=seed, n_init=n_init, repair=repair, device=device) if k < n else None
            out.append(GroupReport(spec.name, spec.member_names(), n, k if k < n else n,
                                   "folded" if k < n else "kept", "" if k < n else "ratio 0", err))
        return out

    return layer


def prune_layer_fn(*, norm: int = 2, attention_mode: str = "auto", round_to: int | None = None) -> LayerFn:
    """The per-layer step of ``prune_model`` (keep the largest-norm neurons/heads of layer ``i``)."""
    round_to = check_round_to(round_to)
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")

    def layer(work: nn.Module, adapter: Adapter, i: int, p: dict[str, float]) -> list[GroupReport]:
        out = []
        if "attention" in p and p["attention"] > 0:
            spec = adapter.attention(work, i)
            before, after = prune_attention(spec, p["attention"], adapter, mode=attention_mode, norm=norm,
                                            round_to=round_to)
            out.append(GroupReport(spec.name, spec.names, before, after,
                                   "pruned" if after < before else "kept"))
        for spec in adapter.mlps(work, i) if "mlp" in p else ():  # one per expert in MoE layers
            n = spec.width
            k = spec.kept(p["mlp"], round_to)
            if k < n:
                prune_mlp(spec, k, norm=norm)
            out.append(GroupReport(spec.name, spec.member_names(), n, k, "pruned" if k < n else "kept"))
        return out

    return layer


def fold_model(model: nn.Module, ratio: float | Mapping | None = None, *, sparsity: float | None = None,
               repair: str = "none", seed: int = 0,
               return_report: bool = False, targets: str | Iterable[str] = "mlp", skip_first: int = 0,
               skip_last: int = 0, n_init: int = 3, progress: bool = False, attention_mode: str = "auto",
               device: str | torch.device | None = None,
               round_to: int | None = None, verify: bool = True) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold the MLP neurons and/or attention heads of a transformers model; ``model`` is not modified.

    ratio: fraction removed per folded layer (float), or {layer index: ratio | {"mlp": r, "attention": r}}.
    sparsity: alternatively, the fraction of all parameters to remove (a uniform ratio is solved for).
    targets: "mlp", "attention" or "all". skip_first/skip_last: layers left intact (float ratio only).
    repair: "none" or "ar" (rescale merged gate/up/fc1 rows, see docs/transformers.md). "ar" helped the
        GELU MLPs of MiniLM but was catastrophic on SwiGLU (SmolLM2); a warning is issued for gated MLPs.
    attention_mode: "auto" | "query" (fold query heads inside each KV group) | "group" (whole KV groups).
    device: where k-means runs ("cpu", "cuda", "cuda:N", "auto"); the model stays where it is.
    round_to: kept MLP widths (and heads x head_dim) at multiples of it, e.g. 8, 16, 64 (see ``modelfold.fold``);
        runtime constraints are honoured on top of it (MoE experts: multiples of 8; ``report.info["align"]``).
    verify: before returning, the result runs one forward on a (2, 8) batch of token ids in its own class;
        if it cannot, a ``ResultError`` names the module and the way out (False skips the check).
    """
    layer = fold_layer_fn(repair=repair, seed=seed, n_init=n_init, attention_mode=attention_mode, device=device,
                          round_to=round_to)
    work, report = run_layers(model, ratio, "fold", targets=targets, skip_first=skip_first, skip_last=skip_last,
                        progress=progress, repair=repair, layer_fn=layer, sparsity=sparsity,
                        attention_mode=attention_mode, round_to=check_round_to(round_to), verify=verify)
    return (work, report) if return_report else work


def prune_model(model: nn.Module, ratio: float | Mapping | None = None, *, sparsity: float | None = None,
                norm: int = 2,
                return_report: bool = False, targets: str | Iterable[str] = "mlp", skip_first: int = 0,
                skip_last: int = 0, progress: bool = False, attention_mode: str = "auto", seed: int = 0,
                n_init: int = 3, round_to: int | None = None,
                verify: bool = True) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Structured magnitude pruning on exactly the slices ``fold_model`` clusters (keep largest Lp norm).

    ``round_to`` and ``verify`` as in :func:`fold_model`."""
    layer = prune_layer_fn(norm=norm, attention_mode=attention_mode, round_to=round_to)
    work, report = run_layers(model, ratio, f"sp-l{norm}", targets=targets, skip_first=skip_first,
                        skip_last=skip_last, progress=progress, repair="none", layer_fn=layer, sparsity=sparsity,
                        attention_mode=attention_mode, round_to=check_round_to(round_to), verify=verify)
    return (work, report) if return_report else work
