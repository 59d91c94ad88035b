"""Automatic per-group budgets for ``sparsity=`` with calibration (traced CNN engine).

Sensitivity of a group at a ratio r = the relative output error of the whole network when the
group's lowest-scoring channels (activation scores, ``planners.activation_scores``) are silenced,
i.e. their consumer columns zeroed, on the calibration inputs: a pruning of that one group without
compensation, measured end to end without re-tracing the model. The curves' continuous allocation
(``calib.budget.fill``: fragile groups keep more) is bisected on its parameter target against the
*measured* sparsity of the compressed model (``counter``: the real compression's widths, its
coupled tensors, BatchNorms and the biases a refit adds), so ``sparsity`` is met within
``budget.SPARSITY_TOL`` or refused with the nearest reachable value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calib.budget import SPARSITY_TOL, exhaustive, fill, ratio_grid, refine, settle, unreachable
from ..checks import forward, kept_width
from ..errors import InvalidRatioError
from .engine import CONSUMER, group_features, group_slices, mark_user_kept, resolve
from .groups import ChannelGroup, build_graph, iter_groups
from .planners import activation_scores

CANDIDATES = ratio_grid(0.1, 0.5)[1:] + (0.7,)  # coarse: 0.1 .. 0.5, then 0.7 (each curve adds its 0)


def _channel_params(model: nn.Module, cg: ChannelGroup) -> int:
    """Parameters one channel of the group owns (rows, columns, per-channel vectors)."""
    total = 0
    for _, _, table, tensors in group_slices(model, cg):
        m = table.shape[1]
        total += sum(t.numel() // t.shape[dim] * m for _, dim, t in tensors if isinstance(t, nn.Parameter))
    return total


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = forward(model, x)
    out = out if isinstance(out, torch.Tensor) else getattr(out, "logits", out[0])
    return out.detach().double()


def sensitivity_curves(model: nn.Module, example_inputs: Any, calib: Any, ignore: set[str],
                       keep_outputs: set[str], candidates: tuple[float, ...] = CANDIDATES, samples: int = 64,
                       progress: bool = False, refit: bool = False
                       ) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, int]]:
    """Per foldable group root: [(ratio, parameters removed, relative output error)], incl. (0, 0, 0);
    and the group sizes. ``progress``: a tqdm bar over the groups. ``refit``: the error after the
    silenced channels' consumers are refitted (``sensitivity``, cross-validated on two halves)."""
    from .calibrator import bn_after
    from .sensitivity import compensated_error, consumer_grams

    x = torch.cat(calib.batches)[:samples]
    ref = _output(model, x)
    denom = float(ref.pow(2).mean().clamp_min(1e-30))
    refit = refit and len(x) >= 2
    halves = list(x.split((len(x) + 1) // 2))
    refs = [_output(model, h) for h in halves] if refit else []
    bns = bn_after(model, x[:1]) if refit else {}
    dg = build_graph(model, example_inputs)
    ignored = [m for n, m in model.named_modules() if n in ignore]
    curves: dict[str, list[tuple[float, float, float]]] = {}
    sizes: dict[str, int] = {}
    bar = tqdm(desc="automatic budget: group sensitivity", unit="group", disable=not progress, leave=False)
    for _, cg in iter_groups(dg, ignored):
        bar.update()
        mark_user_kept(cg, ignore, keep_outputs)
        if not cg.foldable:
            continue
        feats = group_features(model, cg)
        feats.update(calib.activation_features(model, cg))
        score = activation_scores(feats)
        if score is None:
            continue
        order = torch.argsort(score)  # weakest first
        per = _channel_params(model, cg)
        n = cg.size
        curve = [(0.0, 0.0, 0.0)]
        grams = consumer_grams(model, cg, halves) if refit else {}
        for r in candidates:
            k = max(1, round(n * (1 - r)))
            drop = order[: n - k]
            if refit:
                err = compensated_error(model, cg, drop, halves, refs, grams, bns, _output, calib.lam) / denom
            else:
                err = _silenced_error(model, cg, drop, x, ref) / denom
            curve.append((r, float(per * (n - k)), err))
        curves[cg.root] = curve
        sizes[cg.root] = n
    bar.close()
    return curves, sizes


def _silenced_error(model: nn.Module, cg: ChannelGroup, drop: torch.Tensor, x: torch.Tensor,
                    ref: torch.Tensor) -> float:
    saved = []
    with torch.no_grad():
        for _, _, table, tensors in group_slices(model, cg, lambda sl, _: sl.kind == CONSUMER):
            pos = table[drop].reshape(-1)
            for _, dim, t in tensors:
                saved.append((t, dim, pos, t.data.index_select(dim, pos).clone()))
                t.data.index_fill_(dim, pos, 0.0)
        try:
            return float((_output(model, x) - ref).pow(2).mean())
        finally:
            for t, dim, pos, vals in saved:
                t.data.index_copy_(dim, pos, vals)


def levels(n: int, round_to: int | None, max_ratio: float) -> list[float]:
    """Admissible ratios of a group of ``n`` channels up to ``max_ratio``: one per distinct kept width
    (``1 - k/n``, which ``kept_width`` maps back to exactly k), ascending."""
    ks = {kept_width(n, 1.0 - k / n, round_to) for k in range(1, n + 1) if 1.0 - k / n <= max_ratio + 1e-9}
    return sorted(1.0 - k / n for k in ks | {n})


def snap(plan: dict[str, float], sizes: dict[str, int], round_to: int | None) -> dict[str, float]:
    """Each ratio replaced by the level of the width it keeps (same compression, canonical key)."""
    return {u: 1.0 - kept_width(sizes[u], r, round_to) / sizes[u] for u, r in plan.items()}


def foldable_groups(model: nn.Module, example_inputs: Any, ignore: set[str], keep_outputs: set[str],
                    verify: bool = True, seed: int = 0) -> dict[str, ChannelGroup]:
    """Root -> group for every group ``engine.compress`` will reduce, decided exactly as it decides
    (user marks, then the coupling check with the same seeds): a plan over these is what it removes."""
    from .engine import model_outputs, verify_coupling

    dg = build_graph(model, example_inputs)
    ignored = [m for n, m in model.named_modules() if n in ignore]
    described = [cg for _, cg in iter_groups(dg, ignored)]
    ref = model_outputs(model, example_inputs) if verify else None
    out = {}
    for i, cg in enumerate(described):
        mark_user_kept(cg, ignore, keep_outputs)
        if cg.foldable and verify and not verify_coupling(model, cg, example_inputs, seed + i, ref):
            cg.foldable = False
        if cg.foldable:
            out[cg.root] = cg
    return out


def auto_budget(model: nn.Module, example_inputs: Any, calib: Any, sparsity: float, ignore: set[str],
                keep_outputs: set[str], count: Callable[[dict[str, float]], float],
                groups: dict[str, ChannelGroup] | None = None, round_to: int | None = None,
                progress: bool = False, refit: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Ratio per group root whose compressed model removes ``sparsity`` of the parameters (within
    ``SPARSITY_TOL``, measured by ``count(plan)``), spread by :func:`sensitivity_curves`.

    The curves' continuous allocation (``budget.fill``) is bisected on its parameter target against
    the measured count, so the plan moves one channel at a time; a last correction of single groups
    (``budget.refine``) covers coarse widths. ``groups``: the groups the engine will reduce (others
    are left out of the plan). Raises InvalidRatioError naming the nearest reachable sparsity.
    """
    curves, sizes = sensitivity_curves(model, example_inputs, calib, ignore, keep_outputs, progress=progress,
                                       refit=refit and getattr(calib, "compensate", False))
    if groups is not None:
        curves = {r: c for r, c in curves.items() if r in groups}
    if not curves:
        raise InvalidRatioError("no group could be measured for an automatic budget; pass ratio= instead")
    reach = sum(max(c[1] for c in curve) for curve in curves.values())
    most = max(CANDIDATES)

    def at(target: float) -> dict[str, float]:
        return snap(fill(curves, target), sizes, round_to)

    top = count(at(reach))
    if top < sparsity - SPARSITY_TOL:
        raise unreachable(sparsity, top, f"the automatic budget removes at most {most:.0%} of any group's "
                          f"channels, {top:.1%} of the parameters (budget='uniform' goes further)")
    target, got = settle(lambda t: count(at(t)), 0.0, reach, sparsity)
    plan = at(target)
    if abs(got - sparsity) > SPARSITY_TOL / 4:  # coarse widths: correct single groups
        lv = {u: levels(sizes[u], round_to, most) for u in curves}
        plan, got = refine(plan, got, count, lv, sparsity, SPARSITY_TOL / 4)
        if abs(got - sparsity) > SPARSITY_TOL / 4 and getattr(count, "cheap", False):
            found = exhaustive(count, lv, sparsity, lambda p: sum(_error_at(curves[u], r) for u, r in p.items()))
            if found is not None and abs(found[1] - sparsity) < abs(got - sparsity):
                plan, got = found
    got = count.measure(plan) if hasattr(count, "measure") else got  # the plan's real count
    if abs(got - sparsity) > SPARSITY_TOL:
        raise unreachable(sparsity, got, "the groups' channels are too coarse")
    info = {"budget": "auto", "plan": dict(plan), "sparsity_planned": round(got, 6)}
    return plan, info


def _error_at(curve: list[tuple[float, float, float]], r: float) -> float:
    """A group's measured error at ratio ``r``, linearly interpolated between its candidate ratios."""
    pts = sorted((c[0], c[2]) for c in curve)
    for (r0, e0), (r1, e1) in zip(pts, pts[1:], strict=False):
        if r <= r1:
            return e0 + (e1 - e0) * (r - r0) / (r1 - r0) if r1 > r0 else e1
    return pts[-1][1]


def counter(work: nn.Module, example_inputs: Any, ignore: set[str], keep_outputs: set[str],
            round_to: int | None = None, groups: dict[str, ChannelGroup] | None = None, calib: Any = None
            ) -> Callable[[dict[str, float] | float], float]:
    """Measured parameter sparsity of ``work`` compressed with a plan (one ratio or {group root: ratio};
    first-k, widths rounded to ``round_to`` as the real compression rounds them). With ``calib`` (a
    CNNCalibrator that refits), the biases its refit adds are counted too.

    With ``groups`` the count is computed from the groups' slices (every tensor dimension a group
    indexes shrinks by its removed channels times their positions), which costs microseconds instead
    of a compression; that formula is checked against measured compressions of two plans first and
    replaced by the measurement wherever they disagree. ``count.measure(plan)`` always measures."""
    from ..report import count_params
    from .calibrator import added_params
    from .engine import compress
    from .planners import first_k_planner

    total = count_params(work)
    memo: dict[tuple, float] = {}
    refits = calib is not None and getattr(calib, "compensate", False)

    def widths(plan: dict[str, float] | float) -> tuple:
        get = plan.get if isinstance(plan, dict) else (lambda _r, _d: plan)
        return tuple(kept_width(cg.size, get(r, 0.0), round_to) for r, cg in sorted(groups.items()))

    def measure(plan: dict[str, float] | float) -> float:
        k = widths(plan) if groups is not None else (
            tuple(sorted(plan.items())) if isinstance(plan, dict) else (plan,))
        if k not in memo:
            m = copy.deepcopy(work)
            reports = compress(m, example_inputs, plan, first_k_planner, ignore=ignore, keep_outputs=keep_outputs,
                               verify=False, round_to=round_to)
            after = count_params(m)
            if refits:
                reduced = {g.root for g in reports if g.channels_after < g.channels_before}
                cons = {sl.module for r in reduced if groups and r in groups
                        for sl in groups[r].slices if sl.kind == CONSUMER}
                after += added_params(m, cons, example_inputs)
            memo[k] = 1.0 - after / total
        return memo[k]

    formula = _formula(work, example_inputs, groups, round_to, refits) if groups else None
    if formula is not None:
        roots = sorted(groups)
        probes = [{r: 0.7 for r in roots}, {r: 0.7 * (i % 2) + 0.3 * ((i + 1) % 2) for i, r in enumerate(roots)}]
        if any(abs(formula(p) - measure(p)) > 1e-12 for p in probes):
            formula = None  # a coupling the formula does not model: measure every plan

    def count(plan: dict[str, float] | float) -> float:
        return formula(plan) if formula is not None else measure(plan)

    count.measure = measure  # type: ignore[attr-defined]
    count.cheap = formula is not None  # type: ignore[attr-defined]
    return count


def _formula(work: nn.Module, example_inputs: Any, groups: dict[str, ChannelGroup], round_to: int | None,
             refits: bool) -> Callable[[dict[str, float] | float], float] | None:
    """Sparsity of a plan from the groups' slices alone (see :func:`counter`), or None if a slice
    names a tensor it cannot find."""
    from ..report import count_params

    params = dict(work.named_parameters())
    total = count_params(work)
    cover: dict[tuple[str, int], dict[str, set]] = {}  # (parameter, dim) -> group -> positions per channel
    for root, cg in groups.items():
        for sl in cg.slices:
            table = sl.table(cg.size)
            for attr, dim in sl.tensors:
                name = sl.module if attr == "" else f"{sl.module}.{attr}"
                if name not in params:
                    if not attr or isinstance(getattr(resolve(work, sl.module), attr, None), nn.Parameter):
                        return None  # a parameter under another name (shared): let the measurement count it
                    continue  # buffers (running statistics) are no parameters
                cover.setdefault((name, dim), {}).setdefault(root, set()).update(table.reshape(-1).tolist())
    for by_group in cover.values():  # positions per channel of each group on that dimension
        for root, pos in by_group.items():
            by_group[root] = len(pos) // groups[root].size
    covered = {k[0] for k in cover}
    shaped = {name: list(p.shape) for name, p in params.items() if name in covered}
    extra: dict[str, tuple[str, list[str]]] = {}  # consumer weight -> groups whose reduction makes it refit
    if refits:
        from .calibrator import bias_gaining

        for name in bias_gaining(work, example_inputs):
            readers = [r for r, cg in groups.items() if any(sl.kind == CONSUMER and sl.module == name
                                                              for sl in cg.slices)]
            if readers:
                extra[f"{name}.weight"] = (name, readers)
                shaped.setdefault(f"{name}.weight", list(params[f"{name}.weight"].shape))

    def count(plan: dict[str, float] | float) -> float:
        get = plan.get if isinstance(plan, dict) else (lambda _r, _d: plan)
        drop = {r: cg.size - kept_width(cg.size, get(r, 0.0), round_to) for r, cg in groups.items()}
        after = total
        new: dict[str, list[int]] = {}
        for name, shape in shaped.items():
            sh = list(shape)
            for d in range(len(sh)):
                sh[d] -= sum(drop[r] * m for r, m in cover.get((name, d), {}).items())
            new[name] = sh
            if name in covered:
                after += math.prod(sh) - math.prod(shape)
        for wname, (_, readers) in extra.items():
            if any(drop[r] for r in readers):
                after += new[wname][0]  # the new bias: one per output row left
        return 1.0 - after / total

    return count


MAX_RATIO = 0.95  # the largest per-group ratio sparsity= may choose


def plan_for_sparsity(work: nn.Module, example_inputs: Any, sparsity: float, ignore: set[str],
                       keep_outputs: set[str], round_to: int | None = None, *, verify: bool = True, seed: int = 0,
                       calib: Any = None) -> tuple[float, dict[str, float], float]:
    """(ratio, plan, planned sparsity): one channel ratio for every group the engine will reduce whose
    compressed model removes ``sparsity`` of the parameters within ``calib.budget.SPARSITY_TOL``.

    The ratio is bisected against the measured count; groups whose width the ratio leaves between two
    integers keep the floor or the ceiling (a uniform ratio, rounded per group) so that coarse widths
    still land on the target. Raises InvalidRatioError naming the nearest reachable sparsity."""
    groups = foldable_groups(work, example_inputs, ignore, keep_outputs, verify, seed)
    count = counter(work, example_inputs, ignore, keep_outputs, round_to, groups, calib)
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
