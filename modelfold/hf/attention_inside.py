"""Compress attention inside the heads: one narrower ``head_dim`` for every layer (Llama/Mistral/Qwen2).

Selecting whole heads removes q rows, o columns (and k/v rows for whole KV groups). This module
keeps every head and narrows it instead, from ``head_dim`` d to d' (see docs/calibration.md,
"Inside the heads"):

* **query/key**: rotary *pairs* (dims i and i + d/2, one frequency each) are kept or dropped
  together, the same pairs in every head of every layer, because the family's rotary embedding is
  one model-level table derived from the config. The kept pairs keep their original frequencies
  through the config: ``rope_theta`` alone when they are {0, c, 2c, ...} (``pairs="theta"``; plain
  RoPE, also writable as GGUF), else ``rope_type="longrope"`` with equal short and long factors and
  ``attention_factor=1`` (``pairs="free"``, any set; transformers only). q is scaled by sqrt(d'/d),
  so the attention scale head_dim**-0.5 of the narrower model leaves every logit kept as it was.
* **value/output**: per KV group, v is projected on a d'-dimensional subspace of its head space
  (reduced-rank regression of the o_proj output on the heads' context vectors, or PCA), and o_proj
  is refit by least squares (``modelfold.calib.compensate``) from the narrowed block's context
  vectors to the original block's attention output, token weighted as in calibrated compression.

The config can express this only with q, k, v and o sharing one head_dim (Llama/Qwen2 attention
reshapes all four with ``self.head_dim``), the same in every layer. The result is a plain
transformers model (``config.head_dim``, ``config.rope_parameters``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..calib.compensate import ridge_refit
from ..errors import UnsupportedModelError
from .adapters import find_adapter
from .adapters.base import AttnSpec
from .adapters.refs import get, linear_like, put
from .calib.blocks import BlockInputs, capture, record, run_block, token_scale
from .calib.layer import gram, target_cross

FAMILIES = ("llama", "mistral", "qwen2")
PAIRS = ("free", "theta")
SUBSPACES = ("rrr", "pca")


@dataclass
class InsideReport:
    """What :func:`narrow_heads` did: the config it wrote and per-layer o_proj output errors."""

    head_dim: int
    new_head_dim: int
    pairs: list[int]
    rope_parameters: dict[str, Any]
    errors: list[float] = field(default_factory=list)  # relative, after the refit (token weighted)
    errors_plain: list[float] = field(default_factory=list)  # the projection alone, no refit


def check_family(model: nn.Module) -> tuple[Any, nn.Module]:
    """(adapter, rotary embedding module) of a model whose head_dim can be narrowed, else raise."""
    c = model.config
    adapter = find_adapter(model)
    if adapter is None or c.model_type not in FAMILIES:
        raise UnsupportedModelError(f"narrowing head_dim supports {', '.join(FAMILIES)}, not {c.model_type!r}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"narrowing head_dim needs plain RoPE over the whole head, got {rope}")
    rot = getattr(model.base_model, "rotary_emb", None)
    if rot is None:
        raise UnsupportedModelError("no model-level rotary embedding found (base_model.rotary_emb)")
    return adapter, rot


def new_head_dim(head_dim: int, ratio: float) -> int:
    """The even head_dim nearest to head_dim * (1 - ratio), at least 2."""
    return max(2, 2 * round(head_dim * (1 - ratio) / 2))


def rope_parameters(config: Any, inv_freq: torch.Tensor, pairs: list[int], dn: int) -> dict[str, Any]:
    """Config rope parameters under which head_dim ``dn`` rotates pair j at ``inv_freq[pairs[j]]``."""
    theta = float(config.rope_parameters["rope_theta"])
    d = 2 * inv_freq.numel()
    c = pairs[1] - pairs[0] if len(pairs) > 1 else 1
    if pairs[0] == 0 and pairs == list(range(0, c * len(pairs), c)):
        return {"rope_type": "default", "rope_theta": theta ** (c * dn / d)}
    j = torch.arange(0, dn, 2, dtype=torch.float64) / dn
    f = 1.0 / (inv_freq[pairs].double() * theta ** j)
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": f.tolist(), "long_factor": f.tolist(),
            "factor": 1.0, "attention_factor": 1.0,
            "original_max_position_embeddings": int(config.max_position_embeddings)}


def choose_pairs(scores: torch.Tensor, m: int, mode: str) -> list[int]:
    """``m`` rotary pairs of the ``scores`` (d/2,): the best ``m`` ("free") or the best {0, c, 2c, ...} ("theta")."""
    if mode not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {mode!r}")
    half = scores.numel()
    if mode == "free":
        return sorted(torch.topk(scores, m).indices.tolist())
    steps = [c for c in range(1, half + 1) if (m - 1) * c < half]
    best = max(steps, key=lambda c: float(scores[torch.arange(m) * c].sum()))
    return list(range(0, best * m, best))


def _heads(t: torch.Tensor, hd: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, hd)


def pair_energy(x: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """(heads, d/2) importance of each rotary pair in each query head: sqrt(E|q_pair|^2 E|k_pair|^2), per
    head normalised to sum 1 (``x``: the inputs of q/k_proj, (N, hidden))."""
    hd, half, r = spec.head_dim, spec.head_dim // 2, spec.n_rep
    e = []
    for ref in (spec.q, spec.k):
        lin = get(ref)
        y = _heads(torch.nn.functional.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float()),
                   hd).pow(2).mean(0)
        e.append(y[:, :half] + y[:, half:])
    s = (e[0] * e[1].repeat_interleave(r, 0)).sqrt()
    return s / s.sum(1, keepdim=True).clamp_min(1e-30)


def pair_scores(model: nn.Module, adapter: Any, ids: torch.Tensor) -> torch.Tensor:
    """(d/2,) rotary pair importance summed over every head of every layer of the (original) model."""
    inputs = capture(model, adapter, ids)
    total = None
    for i, block in enumerate(adapter.layers(model)):
        spec = adapter.attention(model, i)
        x = record(block, inputs, {"x": get(spec.q)})["x"]
        s = pair_energy(x, spec).sum(0)
        total = s if total is None else total + s
        inputs = run_block(block, inputs)
    return total


def vo_subspace(a: torch.Tensor, w_o: torch.Tensor, spec: AttnSpec, r: int, how: str = "rrr") -> list[torch.Tensor]:
    """Per KV group an orthonormal (d, r) basis of the value head space to keep.

    ``a``: o_proj inputs (N, heads*d), rows already token weighted. "pca": the top-r eigenvectors of
    the group's context covariance sum_h A_h^T A_h. "rrr" (reduced-rank regression): the top-r
    generalised eigenvectors of K p = l C p, K = sum_h C_h W_h^T W_h C_h, C = sum_h C_h, which keep the
    span that predicts the group's o_proj output best when o_proj is refit.
    """
    if how not in SUBSPACES:
        raise ValueError(f"subspace must be one of {SUBSPACES}, got {how!r}")
    hd, rep = spec.head_dim, spec.n_rep
    ah = _heads(a.double(), hd)
    out = []
    for g in range(spec.num_kv_heads):
        c_sum = torch.zeros(hd, hd, dtype=torch.float64)
        k_sum = torch.zeros(hd, hd, dtype=torch.float64)
        for h in range(g * rep, (g + 1) * rep):
            ch = ah[:, h].T @ ah[:, h]
            wh = w_o[:, h * hd:(h + 1) * hd].double()
            c_sum += ch
            k_sum += ch @ (wh.T @ wh) @ ch
        if how == "pca":
            vec = torch.linalg.eigh(c_sum).eigenvectors[:, -r:]
        else:
            reg = 1e-6 * float(torch.diagonal(c_sum).mean().clamp_min(1e-30))
            ell = torch.linalg.cholesky(c_sum + reg * torch.eye(hd, dtype=torch.float64))
            m = torch.linalg.solve_triangular(ell, torch.linalg.solve_triangular(ell, k_sum, upper=False).T,
                                              upper=False)
            u = torch.linalg.eigh((m + m.T) / 2).eigenvectors[:, -r:]
            vec = torch.linalg.solve_triangular(ell.T, u, upper=True)
        out.append(torch.linalg.qr(vec.flip(1)).Q)
    return out


def narrow_block(spec: AttnSpec, pairs: list[int], bases: list[torch.Tensor], dn: int) -> None:
    """Narrow one attention block to head_dim ``dn``: q/k rows of ``pairs`` (q scaled by sqrt(dn/d)),
    v projected on ``bases[g]`` per KV group, o columns ``W_o^h P_g`` (the plain projection)."""
    hd, half, rep = spec.head_dim, spec.head_dim // 2, spec.n_rep
    keep = torch.tensor(pairs + [p + half for p in pairs])
    mult = math.sqrt(dn / hd)
    for ref, n, s in ((spec.q, spec.num_heads, mult), (spec.k, spec.num_kv_heads, 1.0)):
        lin = get(ref)
        rows = (torch.arange(n)[:, None] * hd + keep[None, :]).reshape(-1)
        put(ref, linear_like(lin.weight.detach()[rows] * s, None if lin.bias is None else lin.bias.detach()[rows] * s))
    v, o = get(spec.v), get(spec.o)
    wv, wo = v.weight.detach(), o.weight.detach()
    bv = None if v.bias is None else v.bias.detach()
    vs, bs, os_ = [], [], []
    for g, p in enumerate(bases):
        p = p.to(wv.dtype)
        vs.append(p.T @ wv[g * hd:(g + 1) * hd])
        if bv is not None:
            bs.append(p.T @ bv[g * hd:(g + 1) * hd])
        os_ += [wo[:, h * hd:(h + 1) * hd] @ p for h in range(g * rep, (g + 1) * rep)]
    put(spec.v, linear_like(torch.cat(vs), torch.cat(bs) if bs else None))
    put(spec.o, linear_like(torch.cat(os_, 1).contiguous(), None if o.bias is None else o.bias.detach()))
    m = spec.module
    m.head_dim, m.scaling = dn, dn ** -0.5


def slice_rope(inputs: BlockInputs, pairs: list[int], hd: int) -> BlockInputs:
    """The blocks' inputs with the rotary (cos, sin) tables cut to the kept pairs."""
    keep = torch.tensor(pairs + [p + hd // 2 for p in pairs])
    kws = []
    for kw in inputs.kwargs:
        kw = dict(kw)
        if "position_embeddings" in kw:
            kw["position_embeddings"] = tuple(t[..., keep] for t in kw["position_embeddings"])
        kws.append(kw)
    return BlockInputs(inputs.xs, kws)


def _rel(y: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None
         ) -> float:
    """||Y - (A W^T + b)||^2 / ||Y||^2 with rows weighted by ``scale`` (``a`` and ``y`` already are)."""
    z = a.double() @ w.double().T
    if b is not None:
        z = z + (b.double()[None, :] if scale is None else scale.double()[:, None] * b.double()[None, :])
    return float((y - z).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def refit_o(spec: AttnSpec, a_new: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, lam: float,
            compensate: str) -> tuple[float, float]:
    """Refit o_proj (``compensate="ls"``) from the narrowed context vectors ``a_new`` to the original
    attention output ``y`` (both rows weighted by ``scale``); returns (error after, error of the plain
    projection), relative to ||y||^2."""
    o = get(spec.o)
    w, b = o.weight.detach(), None if o.bias is None else o.bias.detach()
    plain = _rel(y, a_new, w, b, scale)
    if compensate != "ls":
        return plain, plain
    ones = b is not None
    g = gram(a_new, ones, scale)
    tc = target_cross(a_new, y, ones, scale=scale)
    new_w, new_b = ridge_refit(w, g, None, lam, b, ones, target_cross=tc)
    put(spec.o, linear_like(new_w.to(w.dtype).contiguous(), new_b))
    return _rel(y, a_new, new_w, new_b, scale), plain


def narrow_layer(work: nn.Module, adapter: Any, i: int, inputs: BlockInputs, pairs: list[int], dn: int, *,
                 lam: float = 1e-3, weighting: str = "token", subspace: str = "rrr", compensate: str = "ls"
                 ) -> tuple[BlockInputs, float, float]:
    """Narrow layer ``i`` (its inputs: ``inputs``, rotary tables at the original head_dim) and refit its
    o_proj; returns (the next layer's inputs, error after, error of the plain projection)."""
    block = adapter.layers(work)[i]
    spec = adapter.attention(work, i)
    hd = spec.head_dim
    scale = token_scale(block, inputs, adapter.mlp_sum(work, i)) if weighting == "token" else None
    a = record(block, inputs, {"o": get(spec.o)})["o"]
    a = a if scale is None else a * scale[:, None]
    o = get(spec.o)
    y = a.double() @ o.weight.detach().double().T
    if o.bias is not None:
        y = y + (o.bias.double()[None, :] if scale is None else scale.double()[:, None] * o.bias.double()[None, :])
    bases = vo_subspace(a, o.weight.detach(), spec, dn, subspace)
    narrow_block(spec, pairs, bases, dn)
    cut = slice_rope(inputs, pairs, hd)
    a_new = record(block, cut, {"o": get(spec.o)})["o"]
    a_new = a_new if scale is None else a_new * scale[:, None]
    err, plain = refit_o(spec, a_new, y, scale, lam, compensate)
    return BlockInputs(run_block(block, cut).xs, inputs.kwargs), err, plain


@torch.no_grad()
def narrow_heads(model: nn.Module, head_dim: int | None = None, *, ratio: float | None = None,
                 calibration: Any = "self", tokenizer: Any = None, pairs: str = "free", subspace: str = "rrr",
                 lam: float = 1e-3, weighting: str = "token", compensate: str = "ls", n_calib: int | None = None,
                 calib_len: int | None = None, seed: int = 0, progress: bool = False,
                 return_report: bool = False) -> nn.Module | tuple[nn.Module, InsideReport]:
    """A copy of ``model`` whose attention heads are all narrowed to ``head_dim`` (or to the even width
    nearest ``head_dim * (1 - ratio)``): removes 1 - head_dim'/head_dim of every attention projection.

    calibration: as in ``compress`` ("self", token ids, or strings with ``tokenizer=``). pairs: "free"
    (the best rotary pairs; the config then states ``rope_type="longrope"`` factors) or "theta" (pairs
    {0, c, 2c, ...}; plain RoPE with a new ``rope_theta``, writable as GGUF). subspace: "rrr" or "pca"
    (:func:`vo_subspace`). compensate: "ls" (refit o_proj) or "none". With nothing removed the model
    is returned unchanged (a copy).
    """
    from .calib import data as cdata

    adapter, rot = check_family(model)
    hd = adapter.attention(model, 0).head_dim
    dn = head_dim if head_dim is not None else new_head_dim(hd, ratio or 0.0)
    if dn % 2 or not 2 <= dn <= hd:
        raise ValueError(f"head_dim must be even and in [2, {hd}], got {dn}")
    work = copy.deepcopy(model)
    inv_freq = rot.inv_freq.detach().float().cpu()
    report = InsideReport(hd, dn, list(range(hd // 2)), dict(model.config.rope_parameters))
    if dn == hd:
        return (work, report) if return_report else work
    ids = cdata.resolve(model, calibration, tokenizer, n_seq=n_calib, seq_len=calib_len, seed=seed,
                        progress=progress)
    report.pairs = choose_pairs(pair_scores(work, adapter, ids), dn // 2, pairs)
    inputs = capture(work, adapter, ids)
    for i in range(len(adapter.layers(work))):
        inputs, err, plain = narrow_layer(work, adapter, i, inputs, report.pairs, dn, lam=lam, weighting=weighting,
                                          subspace=subspace, compensate=compensate)
        report.errors.append(err)
        report.errors_plain.append(plain)
        if progress:
            print(f"layer {i}: o_proj output error {plain:.4f} -> {err:.4f}", flush=True)
    report.rope_parameters = set_config(work, inv_freq, report.pairs, dn)
    return (work, report) if return_report else work


def set_config(work: nn.Module, inv_freq: torch.Tensor, pairs: list[int], dn: int) -> dict[str, Any]:
    """Write head_dim ``dn`` and the rope parameters into ``work``'s config and rebuild its rotary
    embedding; check that it rotates every kept pair at its original frequency."""
    c = work.config
    rope = rope_parameters(c, inv_freq, pairs, dn)
    c.head_dim = dn
    c.rope_parameters = rope
    rot = work.base_model.rotary_emb
    work.base_model.rotary_emb = new = type(rot)(c).to(inv_freq.device)
    got = new.inv_freq.detach().double().cpu()
    want = inv_freq[pairs].double()
    if not torch.allclose(got, want, rtol=1e-5, atol=0.0) or float(getattr(new, "attention_scaling", 1.0)) != 1.0:
        raise RuntimeError(f"the config's rotary frequencies differ from the kept pairs' ({rope})")
    return rope
