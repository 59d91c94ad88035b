"""References to projections that are not a plain ``nn.Linear`` attribute.

The folding code sees every projection as an ``nn.Linear`` (weight ``(out, in)``, optional bias):
``get(ref)`` returns one, ``put(ref, linear)`` stores a (resized) one back. A plain projection is
a ``(parent, attribute)`` tuple. The classes here present other storage the same way:

* ``Conv1DRef``: GPT-2's ``Conv1D`` (weight stored transposed, ``(in, out)``).
* ``Fused`` / ``PartRef``: one part of a fused projection (Phi-3 ``qkv_proj``/``gate_up_proj``,
  GPT-2 ``c_attn``, GPT-NeoX's per-head interleaved ``query_key_value``).
* ``Stacked`` / ``ExpertRef``: one expert's matrix in a 3D expert tensor (Mixtral, Qwen-MoE).

``get`` returns views that share storage with the model (cheap for sizing; in-place edits reach
the model). Stores that would leave a fused or stacked tensor inconsistent (q resized before k and
v, or one expert before the others) are held until the other parts follow, then written at once.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _linear_view(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters share storage with ``weight``/``bias`` (no copy)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class View:
    """Base class of the non-tuple references (see ``base.get``/``base.put``)."""

    name: str = ""

    def get(self) -> nn.Linear:
        raise NotImplementedError

    def put(self, lin: nn.Linear) -> None:
        raise NotImplementedError


class Conv1DRef(View):
    """``parent.attr`` is a transformers ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape (in, out))."""

    def __init__(self, parent: nn.Module, attr: str) -> None:
        self.parent, self.attr, self.name = parent, attr, attr

    def get(self) -> nn.Linear:
        c = getattr(self.parent, self.attr)
        return _linear_view(c.weight.detach().T, None if c.bias is None else c.bias.detach())

    def put(self, lin: nn.Linear) -> None:
        from transformers.pytorch_utils import Conv1D

        old = getattr(self.parent, self.attr)
        with torch.device("meta"):
            c = Conv1D(lin.out_features, lin.in_features)
        c.weight = nn.Parameter(lin.weight.detach().T.contiguous(), requires_grad=old.weight.requires_grad)
        c.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None else
                              torch.zeros(lin.out_features, dtype=c.weight.dtype, device=c.weight.device),
                              requires_grad=old.weight.requires_grad)
        setattr(self.parent, self.attr, c)


class Fused:
    """A projection whose output rows hold several parts.

    ``interleave=False``: consecutive blocks of ``sizes`` rows (``[q; k; v]``, ``[gate; up]``).
    ``interleave=True``: ``sizes`` rows per unit (head), units one after another
    (``[q_0 k_0 v_0 q_1 k_1 v_1 ...]``); a part then has ``units * size`` rows.
    """

    def __init__(self, base, names: list[str], sizes: list[int], interleave: bool = False) -> None:
        self.base, self.names, self.interleave = base, list(names), interleave
        self.sizes = dict(zip(names, sizes, strict=True))
        self.pending: dict[str, nn.Linear] = {}

    def part(self, name: str, label: str | None = None) -> PartRef:
        return PartRef(self, name, label)

    def _units(self, rows: int) -> int:
        return rows // sum(self.sizes.values())

    def _view(self, name: str) -> nn.Linear:

        lin = get(self.base)
        w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        i = self.names.index(name)
        if not self.interleave:
            start = sum(self.sizes[n] for n in self.names[:i])
            n = self.sizes[name]
            return _linear_view(w[start:start + n], None if b is None else b[start:start + n])
        per, u = sum(self.sizes.values()), self._units(w.shape[0])
        off, n = sum(self.sizes[k] for k in self.names[:i]), self.sizes[name]
        wv = w.view(u, per, w.shape[1])[:, off:off + n].reshape(u * n, w.shape[1])
        bv = None if b is None else b.view(u, per)[:, off:off + n].reshape(u * n)
        return _linear_view(wv, bv)

    def get(self, name: str) -> nn.Linear:
        return self.pending[name] if name in self.pending else self._view(name)

    def put(self, name: str, lin: nn.Linear) -> None:

        self.pending[name] = lin
        parts = [self.get(n) for n in self.names]
        if self.interleave:
            units = {p.out_features // self.sizes[n] for n, p in zip(self.names, parts, strict=True)}
            if len(units) != 1 or any(p.out_features % self.sizes[n] for n, p in zip(self.names, parts, strict=True)):
                return  # wait until every part has the same number of units
            u = units.pop()
            w = torch.cat([p.weight.detach().reshape(u, -1, p.in_features) for p in parts], 1).reshape(-1, parts[0].in_features)
            b = None if parts[0].bias is None else torch.cat([p.bias.detach().reshape(u, -1) for p in parts], 1).reshape(-1)
        else:
            w = torch.cat([p.weight.detach() for p in parts], 0)
            b = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts], 0)
            for n, p in zip(self.names, parts, strict=True):
                self.sizes[n] = p.out_features

        put(self.base, linear_like(w, b))
        self.pending.clear()


class PartRef(View):
    """One part of a ``Fused`` projection."""

    def __init__(self, fused: Fused, part: str, label: str | None = None) -> None:
        self.fused, self.part = fused, part
        base_name = getattr(fused.base, "name", None) or fused.base[1]
        self.name = label or f"{base_name}[{part}]"

    def get(self) -> nn.Linear:
        return self.fused.get(self.part)

    def put(self, lin: nn.Linear) -> None:
        self.fused.put(self.part, lin)


class Stacked:
    """A 3D parameter ``owner.attr`` of shape (experts, out, in): one matrix per expert, no bias."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr
        self.pending: dict[int, nn.Linear] = {}

    @property
    def n(self) -> int:
        return getattr(self.owner, self.attr).shape[0]

    def get(self, e: int) -> nn.Linear:
        if e in self.pending:
            return self.pending[e]
        return _linear_view(getattr(self.owner, self.attr).detach()[e], None)

    def put(self, e: int, lin: nn.Linear) -> None:
        if lin.bias is not None:
            raise ValueError("stacked expert weights carry no bias")
        self.pending[e] = lin
        mats = [self.get(i).weight.detach() for i in range(self.n)]
        if len({tuple(m.shape) for m in mats}) != 1:
            return  # wait until every expert has the same shape
        old = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, nn.Parameter(torch.stack(mats).contiguous(), requires_grad=old.requires_grad))
        self.pending.clear()


class ExpertRef(View):
    """Expert ``e`` of a ``Stacked`` parameter, seen as an ``nn.Linear`` without bias."""

    def __init__(self, stacked: Stacked, e: int) -> None:
        self.stacked, self.e = stacked, e
        self.name = f"{stacked.attr}[{e}]"

    def get(self) -> nn.Linear:
        return self.stacked.get(self.e)

    def put(self, lin: nn.Linear) -> None:
        self.stacked.put(self.e, lin)


# (parent module, attribute name) of an nn.Linear, or a View (Conv1D, part of a fused projection,
# one expert of a stacked expert tensor) that reads and writes like one.
Ref = tuple[nn.Module, str] | View


def get(ref: Ref) -> nn.Linear:
    """The projection ``ref`` names, as an ``nn.Linear`` (views share storage with the model)."""
    if isinstance(ref, View):
        return ref.get()
    return getattr(ref[0], ref[1])


def put(ref: Ref, module: nn.Linear) -> None:
    """Store ``module`` (possibly resized) where ``ref`` points."""
    if isinstance(ref, View):
        ref.put(module)
    else:
        setattr(ref[0], ref[1], module)


def hook_module(ref: Ref) -> nn.Module | None:
    """The model's own module whose input is what ``ref`` reads (for activation hooks), or None.

    A part of a fused projection reads the fused module's input; a Conv1D is its own module; one
    expert of a stacked expert tensor sees only its routed tokens, which no module boundary shows.
    """
    if isinstance(ref, PartRef):
        return hook_module(ref.fused.base)
    if isinstance(ref, Conv1DRef):
        return getattr(ref.parent, ref.attr)
    return None if isinstance(ref, View) else getattr(ref[0], ref[1])


def ref_name(ref: Ref) -> str:
    return ref.name if isinstance(ref, View) else ref[1]


def linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly ``weight`` (out, in) and ``bias``."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=bias.requires_grad)
    return lin


def resized(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    """An uninitialised nn.Linear like ``lin`` with new sizes (filled by a state-dict load)."""
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    w = torch.empty(out_f, in_f, dtype=lin.weight.dtype, device=lin.weight.device)
    b = None if lin.bias is None else torch.empty(out_f, dtype=lin.bias.dtype, device=lin.bias.device)
    return linear_like(w, b)
