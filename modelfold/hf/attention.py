"""Fold or prune attention heads of one block, respecting grouped-query (GQA) structure.

Two unit choices (see docs/transformers.md):

* ``"query"`` (default when several query heads share a KV head): inside each KV group, cluster
  the query heads on [q rows ‖ o columns]; average their q rows and sum their o columns. K and V are
  untouched, so a merged head's attention logits are exactly the mean of its members' logits
  (q·k is linear in q). Every group keeps the same number of query heads.
* ``"group"`` (the only choice for plain multi-head attention): cluster whole KV groups (for MHA:
  heads) on [k rows ‖ v rows ‖ their q rows ‖ their o columns]; average q, k and v rows, sum o
  columns. Averaging q and k separately does not preserve q·k for non-identical heads (cross terms).
"""

from __future__ import annotations

import math

import torch

from ..checks import kept_width
from ..cluster import kmeans
from ..merge import merge_tensor, representatives
from .adapters.base import AttnSpec
from .adapters.refs import get, linear_like, put

MODES = ("auto", "query", "group")


def resolve_mode(spec: AttnSpec, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"attention_mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "query" if spec.n_rep > 1 else "group"
    return mode


def _rows(ref, hd: int, n_units: int) -> torch.Tensor:
    """(n_units, per-unit rows * in) weight rows (+bias) of a projection, one row per unit."""
    lin = get(ref)
    w = lin.weight.detach().float().reshape(n_units, -1)
    if lin.bias is None:
        return w
    return torch.cat([w, lin.bias.detach().float().reshape(n_units, -1)], 1)


def _cols(ref, n_units: int) -> torch.Tensor:
    w = get(ref).weight.detach().float()  # (out, units * cols)
    return w.T.reshape(n_units, -1)


def attention_features(spec: AttnSpec, mode: str) -> torch.Tensor:
    """Per-unit vectors: query heads (mode "query") or KV groups (mode "group")."""
    if mode == "query":
        return torch.cat([_rows(spec.q, spec.head_dim, spec.num_heads), _cols(spec.o, spec.num_heads)], 1)
    g = spec.num_kv_heads
    return torch.cat([_rows(spec.k, spec.head_dim, g), _rows(spec.v, spec.head_dim, g),
                      _rows(spec.q, spec.head_dim, g), _cols(spec.o, g)], 1)


def units_k(spec: AttnSpec, mode: str, ratio: float, round_to: int | None = None) -> int:
    """Units kept per clustering problem: query heads per KV group, or KV groups.

    ``round_to``: the unit count is rounded (``checks.kept_width``) to a multiple of the fewest units
    whose projection width is a multiple of ``round_to`` (query mode: q/o width = kept heads per group x
    KV groups x head_dim; group mode: k/v width = kept groups x head_dim). With head_dim 64 or 128
    and round_to <= head_dim that is every unit count: nothing changes.
    """
    n = spec.n_rep if mode == "query" else spec.num_kv_heads
    if not round_to or round_to == 1:
        return kept_width(n, ratio)
    unit = spec.head_dim * (spec.num_kv_heads if mode == "query" else 1)  # channels per kept unit
    return kept_width(n, ratio, round_to // math.gcd(round_to, unit))


def apply_units(spec: AttnSpec, mode: str, labels: torch.Tensor | None, keep_units: torch.Tensor, kk: int,
           adapter) -> None:
    """Merge (if labels given) and keep units; update module attributes through ``adapter``.

    A family whose head count cannot change (``adapter.fixed_heads``, e.g. MPNet) is refused before
    anything is modified, for every caller (the public ``fold_attention``/``prune_attention`` included).
    """
    if getattr(adapter, "fixed_heads", None) and keep_units.numel() < (
            spec.num_heads if mode == "query" else spec.num_kv_heads):
        adapter.check_heads(1.0, "attention")
    hd = spec.head_dim

    def pos(units: torch.Tensor, width: int) -> torch.Tensor:
        return (units[:, None] * width + torch.arange(width, device=units.device)[None, :]).reshape(-1)

    def mean_rows(ref, table, width):
        lin = get(ref)
        w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        if labels is not None:
            w = merge_tensor(w, 0, table, labels, kk, "mean")
            b = None if b is None else merge_tensor(b, 0, table, labels, kk, "mean")
        p = pos(keep_units, width)
        put(ref, linear_like(w[p], None if b is None else b[p]))

    if mode == "query":
        nq = spec.num_heads
        qtab = torch.arange(nq * hd, device=keep_units.device).view(nq, hd)
        mean_rows(spec.q, qtab, hd)
        o = get(spec.o)
        w = o.weight.detach()
        if labels is not None:
            w = merge_tensor(w, 1, qtab, labels, kk, "sum")
        put(spec.o, linear_like(w[:, pos(keep_units, hd)], None if o.bias is None else o.bias.detach()))
        heads, kv = int(keep_units.numel()), spec.num_kv_heads
    else:
        g, r = spec.num_kv_heads, spec.n_rep
        kvtab = torch.arange(g * hd, device=keep_units.device).view(g, hd)
        qtab = torch.arange(g * r * hd, device=keep_units.device).view(g, r * hd)
        mean_rows(spec.k, kvtab, hd)
        mean_rows(spec.v, kvtab, hd)
        mean_rows(spec.q, qtab, r * hd)
        o = get(spec.o)
        w = o.weight.detach()
        if labels is not None:
            w = merge_tensor(w, 1, qtab, labels, kk, "sum")
        put(spec.o, linear_like(w[:, pos(keep_units, r * hd)], None if o.bias is None else o.bias.detach()))
        kv = int(keep_units.numel())
        heads = kv * r
    adapter.set_heads(spec, heads, kv)


def fold_attention_with_labels(spec: AttnSpec, mode: str, labels: torch.Tensor, adapter) -> None:
    """Merge units by global ``labels`` (query mode: group g's clusters are g*k .. g*k+k-1)."""
    kk = int(labels.max()) + 1
    if mode == "query":
        r, g = spec.n_rep, spec.num_kv_heads
        per = kk // g
        group_of_cluster = labels // max(per, 1)
        if kk % g or per < 1:
            raise ValueError(f"query-mode labels must give every KV group the same number of clusters; "
                             f"got {kk} clusters for {g} groups")
        if not torch.equal(group_of_cluster, torch.arange(spec.num_heads, device=group_of_cluster.device) // r):
            raise ValueError("query-mode labels must not merge query heads of different KV groups "
                             "(group g's clusters are g*k .. g*k+k-1)")
    keep = torch.sort(representatives(labels, kk)).values
    apply_units(spec, mode, labels, keep, kk, adapter)


def fold_attention(spec: AttnSpec, ratio: float, adapter, *, mode: str = "auto", seed: int = 0,
                   n_init: int = 3, device: torch.device | None = None,
                   round_to: int | None = None) -> tuple[int, int, float]:
    """Cluster (on ``device``) and merge heads; returns (units before, units after, relative k-means error)."""
    mode = resolve_mode(spec, mode)
    feats = attention_features(spec, mode)
    home = feats.device
    feats = feats if device is None else feats.to(device)
    k = units_k(spec, mode, ratio, round_to)
    if mode == "query":
        r = spec.n_rep
        labels, err, tot = [], 0.0, 0.0
        for g in range(spec.num_kv_heads):
            f = feats[g * r:(g + 1) * r]
            res = kmeans(f, k, seed=seed, n_init=n_init)
            labels.append(res.labels + g * k)
            err += res.inertia
            tot += float((f.double() ** 2).sum())
        lab = torch.cat(labels)
        rel = err / tot if tot > 0 else 0.0
        n_before = spec.num_heads
    else:
        res = kmeans(feats, k, seed=seed, n_init=n_init)
        lab, rel, n_before = res.labels, res.relative_error, spec.num_kv_heads
    fold_attention_with_labels(spec, mode, lab.to(home), adapter)
    return n_before, int(lab.max()) + 1, rel


def choose_heads(spec: AttnSpec, mode: str, k: int, scores: torch.Tensor) -> torch.Tensor:
    """Sorted kept unit indices: the best ``k`` per KV group (query mode) or overall (group mode)."""
    if mode == "query":
        r = spec.n_rep
        keep = torch.cat([torch.topk(scores[g * r:(g + 1) * r], k).indices + g * r
                          for g in range(spec.num_kv_heads)])
    else:
        keep = torch.topk(scores, k).indices
    return torch.sort(keep).values


def prune_attention(spec: AttnSpec, ratio: float, adapter, *, mode: str = "auto",
                    norm: int = 2, round_to: int | None = None) -> tuple[int, int]:
    """Keep the units with the largest Lp norm of the same slices folding clusters on."""
    mode = resolve_mode(spec, mode)
    score = attention_features(spec, mode).norm(p=norm, dim=1)
    k = units_k(spec, mode, ratio, round_to)
    keep = choose_heads(spec, mode, k, score)
    n_before = spec.num_heads if mode == "query" else spec.num_kv_heads
    apply_units(spec, mode, None, keep, k, adapter)
    return n_before, int(keep.numel())
