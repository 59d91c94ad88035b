"""Parameters a plan removes, from shapes alone, and the ratio that removes a requested fraction.

Works on a loaded model and on the meta-device skeleton of a checkpoint alike (no weights read),
so ``sparsity=`` costs no folding. The counts mirror exactly what ``fold_mlp``/``fold_attention``
and their pruning twins remove (tested against the folded models).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from ..calib.budget import SPARSITY_TOL, settle, unreachable
from ..checks import kept_width
from ..errors import InvalidRatioError
from ..report import count_params
from .adapters.base import Adapter, AttnSpec, MLPSpec, width_multiple
from .adapters.refs import get
from .attention import resolve_mode, units_k
from .plan import Plan, make_plan

MAX_RATIO = 0.95  # as for CNNs: the largest per-layer ratio sparsity= may choose


def _rows(ref) -> int:
    """Parameters in one output row of a Linear (its input width, plus the bias entry)."""
    lin = get(ref)
    return lin.in_features + (lin.bias is not None)


def _per_neuron(spec: MLPSpec) -> int:
    return sum(_rows(r) for r in spec.producers) + get(spec.consumer).out_features


def mlp_removed(spec: MLPSpec, ratio: float, round_to: int | None = None) -> int:
    return (spec.width - spec.kept(ratio, round_to)) * _per_neuron(spec)  # with the runtime's alignment


def attention_removed(spec: AttnSpec, ratio: float, mode: str = "auto", round_to: int | None = None) -> int:
    mode = resolve_mode(spec, mode)
    hd, o_out = spec.head_dim, get(spec.o).out_features
    per_q_head = hd * (_rows(spec.q) + o_out)
    k = units_k(spec, mode, ratio, round_to)
    if mode == "query":
        return (spec.n_rep - k) * spec.num_kv_heads * per_q_head
    per_group = hd * (_rows(spec.k) + _rows(spec.v)) + spec.n_rep * per_q_head
    return (spec.num_kv_heads - k) * per_group


class Geometry:
    """Per-layer shapes read once (MLP widths and per-neuron sizes, attention specs) for fast counting."""

    def __init__(self, model: nn.Module, adapter: Adapter, round_to: int | None = None) -> None:
        self.model, self.adapter, self.round_to = model, adapter, round_to
        self._mlp: dict[int, list[tuple[int, int]]] = {}
        self._mult: dict[int, list[int | None]] = {}  # round_to combined with each MLP's runtime alignment
        self._attn: dict[int, AttnSpec] = {}

    def mlps(self, i: int) -> list[tuple[int, int]]:
        if i not in self._mlp:
            specs = self.adapter.mlps(self.model, i)
            self._mlp[i] = [(m.width, _per_neuron(m)) for m in specs]
            self._mult[i] = [width_multiple(self.round_to, m.align) for m in specs]
        return self._mlp[i]

    def attention(self, i: int) -> AttnSpec:
        if i not in self._attn:
            self._attn[i] = self.adapter.attention(self.model, i)
        return self._attn[i]

    def removed(self, plan: Plan, attention_mode: str = "auto") -> int:
        total = 0
        for i, p in plan.items():
            if p.get("mlp", 0) > 0:
                total += sum((n - kept_width(n, p["mlp"], r)) * per
                             for (n, per), r in zip(self.mlps(i), self._mult[i], strict=True))
            if p.get("attention", 0) > 0:
                total += attention_removed(self.attention(i), p["attention"], attention_mode, self.round_to)
        return total


def plan_removed(model: nn.Module, adapter: Adapter, plan: Plan, attention_mode: str = "auto",
                 round_to: int | None = None) -> int:
    """Parameters ``plan`` removes from ``model`` (fold and magnitude pruning remove the same)."""
    return Geometry(model, adapter, round_to).removed(plan, attention_mode)


def ratio_for_sparsity(model: nn.Module, adapter: Adapter, sparsity: float, *,
                       targets: str | Iterable[str] = "mlp", skip_first: int = 0, skip_last: int = 0,
                       attention_mode: str = "auto", round_to: int | None = None) -> float:
    """The uniform ratio whose plan removes ``sparsity`` of the parameters as nearly as any uniform ratio
    does (widths rounded to ``round_to`` as the fold rounds them): within ``calib.budget.SPARSITY_TOL``,
    else InvalidRatioError naming the nearest reachable sparsity."""
    if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise InvalidRatioError(f"sparsity={sparsity!r} is outside [0, 1): it is the fraction of parameters "
                                "removed, e.g. 0.2 removes 20%")
    n_layers = len(adapter.layers(model))
    total = count_params(model)
    geo = Geometry(model, adapter, round_to)

    def removed(r: float) -> float:
        return geo.removed(make_plan(r, n_layers, targets, skip_first, skip_last), attention_mode) / total

    most = removed(MAX_RATIO)
    if sparsity > most + SPARSITY_TOL:
        raise InvalidRatioError(
            f"sparsity={sparsity:.3f} is not reachable with targets={targets!r}: removing {MAX_RATIO:.0%} of "
            f"every targeted layer's neurons/heads removes only {most:.1%} of the parameters (embeddings, "
            f"norms and the LM head never fold); the nearest reachable sparsity is {most:.3f}. Ask for at "
            "most that, or add targets (e.g. 'all').")
    ratio, got = settle(removed, 0.0, MAX_RATIO, sparsity, steps=48, tight=0.0)  # cheap: shapes only
    if abs(got - sparsity) > SPARSITY_TOL:
        raise unreachable(sparsity, got, "one ratio for every layer changes the widths of all layers at once"
                          + (f", in steps of round_to={round_to}" if round_to else ""))
    return ratio


def summary(model: nn.Module, adapter: Adapter) -> str:
    """Per-layer MLP width and heads, the parameter split, and the largest sparsity each target reaches."""
    total = count_params(model)
    n = len(adapter.layers(model))
    lines = [f"{type(model).__name__}: {n} layers, {total / 1e6:,.2f}M parameters"]
    mlp_p = attn_p = 0
    geo = Geometry(model, adapter)
    for i in range(n):
        ms, a = adapter.mlps(model, i), geo.attention(i)
        mlp_p += sum(n_ * per for n_, per in geo.mlps(i))
        attn_p += sum(count_params(get(r)) for r in (a.q, a.k, a.v, a.o))
        experts = [m for m in ms if m.size_key != "shared_expert_intermediate_size"]
        what = f"MLP {experts[0].width:>6} neurons" + (f" x {len(experts)} experts" if len(experts) > 1 else "")
        what += "".join(f" + shared expert {m.width}" for m in ms if m not in experts)
        lines.append(f"  {a.name.rsplit('.', 1)[0]:<24} {what}   "
                     f"heads {a.num_heads:>3} query / {a.num_kv_heads:>3} KV (head_dim {a.head_dim})")
    lines.append(f"  MLPs {mlp_p / total:.1%}, attention {attn_p / total:.1%}, other (embeddings, norms, head) "
                 f"{1 - (mlp_p + attn_p) / total:.1%} of the parameters")
    for targets in ("mlp", "attention", "all"):
        most = geo.removed(make_plan(MAX_RATIO, n, targets)) / total
        lines.append(f"  targets={targets!r:<12} sparsity= reaches at most {most:.1%} (ratio {MAX_RATIO})")
    return "\n".join(lines)
