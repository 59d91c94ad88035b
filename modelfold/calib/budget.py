"""Automatic budgets: spread a parameter-removal target over layers/groups by measured sensitivity.

Each unit (an MLP, an attention block, a channel group) offers candidate ratios with the
parameters they remove and the output error they cost (measured on calibration data, or the
k-means error without any). :func:`allocate` picks one ratio per unit minimising the total error
subject to removing at least ``target`` parameters: a Lagrangian relaxation, bisected on the price
of a parameter, so fragile units (large error per parameter) keep more.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

from ..errors import InvalidRatioError

Curve = Sequence[tuple[float, float, float]]  # (ratio, parameters removed, error)


def ratio_grid(step: float, top: float) -> tuple[float, ...]:
    """Candidate ratios 0, step, 2 step, ..., top (rounded to 6 decimals: ``ratio_grid(0.1, 0.3)[3]`` is 0.3)."""
    return tuple(round(step * i, 6) for i in range(round(top / step) + 1))


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


# -- exact sparsity ---------------------------------------------------------------------------------
# ``allocate`` picks one candidate ratio per unit, so the removal it reaches jumps by whole candidate
# steps (a 0.5 -> 0.7 step of a wide group is several percent of a network) and, bisected until the
# target is met, overshoots it. The functions below turn the same curves into plans that reach the
# asked sparsity: a continuous allocation (``fill``), bisection against the *measured* removal of
# the compressed model (``settle``), and a last correction of single units (``refine``).

SPARSITY_TOL = 0.01  # |achieved - asked| sparsity every sparsity= path guarantees (else InvalidRatioError)


def _hull(curve: Curve) -> list[tuple[float, float, float]]:
    """Lower convex hull of a curve's (removed, error) points, from its ratio-0 point, removal increasing."""
    best: dict[float, tuple[float, float, float]] = {}
    for r, p, e in curve:
        if p not in best or (e, r) < (best[p][2], best[p][0]):
            best[p] = (r, p, e)
    hull: list[tuple[float, float, float]] = []
    for c in sorted(best.values(), key=lambda c: c[1]):
        while len(hull) >= 2:
            (_, x0, y0), (_, x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (c[2] - y0) - (y1 - y0) * (c[1] - x0) > 0:
                break
            hull.pop()  # the middle point lies on or above the chord: not on the lower hull
        hull.append(c)
    return hull


def fill(curves: Mapping[str, Curve], target: float) -> dict[str, float]:
    """Continuous ratio per unit removing ``target`` (curve units) with the least interpolated error.

    The LP relaxation of :func:`allocate`: the edges of every curve's lower convex hull are taken in
    order of error per parameter (ties by unit name, so the result is deterministic), the last one
    partly, its ratio interpolated. Every unit's ratio grows monotonically with ``target``, so the
    removal of the compressed model does too, one channel at a time: a monotone path that
    :func:`settle` can bisect against the measured count.
    """
    plan = {u: 0.0 for u in curves}
    edges = []
    for u, curve in curves.items():
        h = _hull(curve)
        plan[u] = h[0][0] if h and h[0][1] <= 0 else 0.0
        for j in range(1, len(h)):
            (r0, p0, e0), (r1, p1, e1) = h[j - 1], h[j]
            edges.append(((e1 - e0) / (p1 - p0), u, j, r0, p0, r1, p1))
    left = float(target)
    for _, u, _, r0, p0, r1, p1 in sorted(edges, key=lambda e: e[:3]):
        if left <= 0:
            break
        if left >= p1 - p0:
            plan[u], left = r1, left - (p1 - p0)
        else:
            plan[u], left = r0 + (r1 - r0) * left / (p1 - p0), 0.0
    return plan


def settle(count: Callable[[float], float], lo: float, hi: float, sparsity: float, steps: int = 30,
           tight: float = 5e-4) -> tuple[float, float]:
    """(t, count(t)) nearest to ``sparsity`` on a monotone path ``count`` over [lo, hi] (bisection; stops
    early once within ``tight``). ``count(lo) <= sparsity`` is assumed."""
    c_lo, c_hi = count(lo), count(hi)
    if c_hi <= sparsity:
        return hi, c_hi
    for _ in range(steps):
        if c_hi - c_lo <= tight or abs(c_lo - sparsity) <= tight or abs(c_hi - sparsity) <= tight:
            break
        mid = (lo + hi) / 2
        c = count(mid)
        if c >= sparsity:
            hi, c_hi = mid, c
        else:
            lo, c_lo = mid, c
    return (lo, c_lo) if sparsity - c_lo <= c_hi - sparsity else (hi, c_hi)


Levels = Mapping[str, Sequence[float]]  # per unit, its admissible ratios (one per distinct width), ascending


def refine(plan: dict[str, float], got: float, count: Callable[[dict[str, float]], float], levels: Levels,
           sparsity: float, tol: float = SPARSITY_TOL, rounds: int = 8, pairs: int = 16) -> tuple[dict[str, float], float]:
    """Correct ``plan`` (measured sparsity ``got``) towards ``sparsity`` by local moves: one unit one
    level up or down, and, with at most ``pairs`` units, one unit up while another goes down (an
    exchange finds the sums that single steps jump over). Each round takes the move that brings the
    measured sparsity nearest; it stops within ``tol`` or when no move helps. Only needed where the
    widths are coarse (small networks, ``round_to``). Returns the best (plan, sparsity) found."""
    units = sorted(u for u in levels if len(levels[u]) > 1)

    def step(p: dict[str, float], u: str, d: int) -> dict[str, float] | None:
        lv = list(levels[u])
        r = p.get(u, 0.0)
        i = min(range(len(lv)), key=lambda j: abs(lv[j] - r))  # plans hold level ratios
        j = i + d
        return dict(p, **{u: lv[j]}) if 0 <= j < len(lv) else None

    for _ in range(rounds):
        if abs(got - sparsity) <= tol:
            break
        toward = 1 if got < sparsity else -1
        moves = [m for u in units if (m := step(plan, u, toward)) is not None]
        if len(units) <= pairs:
            for u in units:
                for v in units:
                    if u != v and (m := step(plan, u, toward)) is not None and (m := step(m, v, -toward)) is not None:
                        moves.append(m)
        best = None
        for cand in moves:
            c = count(cand)
            if best is None or abs(c - sparsity) < abs(best[1] - sparsity):
                best = (cand, c)
        if best is None or abs(best[1] - sparsity) >= abs(got - sparsity):
            break
        plan, got = best
    return plan, got


def exhaustive(count: Callable[[dict[str, float]], float], levels: Levels, sparsity: float,
               cost: Callable[[dict[str, float]], float] | None = None, tol: float = SPARSITY_TOL,
               limit: int = 20000) -> tuple[dict[str, float], float] | None:
    """Every combination of the units' levels when there are at most ``limit`` (for a cheap ``count``):
    among the plans within ``tol`` of ``sparsity`` the one of least ``cost`` (default: nearest), else
    the nearest plan. None when there are too many combinations."""
    units = sorted(levels)
    if math.prod(len(levels[u]) for u in units) > limit:
        return None
    best, best_key = None, None
    for combo in itertools.product(*(levels[u] for u in units)):
        plan = dict(zip(units, combo, strict=True))
        c = count(plan)
        off = abs(c - sparsity)
        key = (0, cost(plan) if cost else off, off) if off <= tol else (1, off, 0.0)
        if best_key is None or key < best_key:
            best, best_key = (plan, c), key
    return best


def unreachable(sparsity: float, nearest: float, why: str) -> InvalidRatioError:
    """The error for a sparsity no plan reaches within SPARSITY_TOL, naming the nearest reachable value."""
    return InvalidRatioError(
        f"sparsity={sparsity:.3f} cannot be reached within {SPARSITY_TOL}: {why}; the nearest reachable "
        f"sparsity is {nearest:.3f}. Ask for sparsity={nearest:.3f}, or for finer widths (a smaller or no "
        "round_to, more targets, a wider model)")
