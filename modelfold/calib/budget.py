"""Automatic budgets: spread a parameter-removal target over layers/groups by measured sensitivity.

Each unit (an MLP, an attention block, a channel group) offers candidate ratios with the
parameters they remove and the output error they cost (measured on calibration data, or the
k-means error without any). :func:`allocate` picks one ratio per unit minimising the total error
subject to removing at least ``target`` parameters: a Lagrangian relaxation, bisected on the price
of a parameter, so fragile units (large error per parameter) keep more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import InvalidRatioError

Curve = Sequence[tuple[float, float, float]]  # (ratio, parameters removed, error)


def _pick(curve: Curve, price: float) -> tuple[float, float, float]:
    # Lowest error - price * removed; ties go to the smaller ratio (deterministic).
    return min(curve, key=lambda c: (c[2] - price * c[1], c[0]))


def allocate(curves: Mapping[str, Curve], target: float) -> dict[str, float]:
    """Ratio per unit with total removal >= ``target`` (same unit as the curves' removal column).

    Every curve must contain its ratio-0 point ``(0.0, 0.0, 0.0)``. Raises InvalidRatioError if
    even the largest ratios of every unit cannot reach ``target``.
    """
    if target <= 0:
        return {u: 0.0 for u in curves}
    reach = sum(max(c[1] for c in curve) for curve in curves.values())
    if reach < target:
        raise InvalidRatioError(f"cannot remove {target:.0f} parameters: the candidate ratios reach at most "
                                f"{reach:.0f}; lower the sparsity or allow larger ratios")
    lo, hi = 0.0, 1.0

    def removed(price: float) -> float:
        return sum(_pick(curve, price)[1] for curve in curves.values())

    while removed(hi) < target:
        hi *= 4.0
        if hi > 1e300:
            break
    for _ in range(200):
        mid = (lo + hi) / 2
        if removed(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return {u: _pick(curve, hi)[0] for u, curve in curves.items()}
