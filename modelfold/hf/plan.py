"""Per-layer plans: which decoder/encoder layers lose how much of their MLP and attention."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..errors import InvalidPlanError, InvalidRatioError

TARGETS = ("mlp", "attention")
Plan = dict[int, dict[str, float]]  # layer index -> {"mlp": ratio, "attention": ratio}


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """'mlp' | 'attention' | 'all' (or a list of those) -> tuple of targets."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for t in items:
        if t == "all":
            out.extend(TARGETS)
        elif t in TARGETS:
            out.append(t)
        else:
            raise InvalidPlanError(f"unknown target {t!r}: use 'mlp', 'attention' or 'all' "
                                   "(or a list such as ['mlp', 'attention'])")
    if not out:
        raise InvalidPlanError("targets is empty: use 'mlp', 'attention' or 'all'")
    return tuple(dict.fromkeys(out))


def _check_ratio(r: object, where: str) -> float:
    if not isinstance(r, int | float) or isinstance(r, bool) or math.isnan(r) or not 0.0 <= r < 1.0:
        raise InvalidRatioError(f"ratio {r!r} {where} is outside [0, 1): it is the fraction of neurons/heads "
                                "removed, e.g. 0.3 removes 30%; 1.0 would remove everything")
    return float(r)


def make_plan(ratio: float | Mapping, n_layers: int, targets: str | Iterable[str] = "mlp",
              skip_first: int = 0, skip_last: int = 0) -> Plan:
    """Normalise ``ratio`` (float for every layer, or {layer: ratio | {target: ratio}}) into a Plan."""
    tg = parse_targets(targets)
    for name, v in (("skip_first", skip_first), ("skip_last", skip_last)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidPlanError(f"{name}={v!r} must be a non-negative integer number of layers")
    if ratio is None:
        raise InvalidRatioError("ratio= or sparsity= is required for transformers models: ratio is a float in "
                                "[0, 1) or a {layer index: ratio} dict, sparsity the fraction of parameters removed")
    if isinstance(ratio, Mapping):
        if skip_first or skip_last:
            raise InvalidPlanError("skip_first/skip_last apply to a uniform float ratio; with a per-layer "
                                   "dict, list only the layers you want folded")
        plan: Plan = {}
        for key, val in ratio.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise InvalidPlanError(f"plan key {key!r} is not a layer index") from None
            if str(key).strip() != str(i) or not 0 <= i < n_layers:
                raise InvalidPlanError(f"plan layer {key!r} does not exist: the model has layers 0..{n_layers - 1}")
            if isinstance(val, Mapping):
                bad = set(val) - set(TARGETS)
                if bad:
                    raise InvalidPlanError(f"unknown target(s) {sorted(bad)} in plan for layer {i}; "
                                           f"use {list(TARGETS)}")
                plan[i] = {t: _check_ratio(r, f"for layer {i} {t}") for t, r in val.items()}
            else:
                r = _check_ratio(val, f"for layer {i}")
                plan[i] = {t: r for t in tg}
        return plan
    r = _check_ratio(ratio, "")
    if skip_first + skip_last >= n_layers and r > 0:
        raise InvalidPlanError(f"skip_first={skip_first} + skip_last={skip_last} leaves none of the "
                               f"{n_layers} layers to fold")
    return {i: {t: r for t in tg} for i in range(skip_first, n_layers - skip_last)}
