"""Blocks and what flows between them, for sequential calibration (in memory and layer by layer).

The calibration token ids are embedded once; the inputs of the first block (hidden states and the
keyword arguments the model passes to every block: masks, rotary embeddings) are caught there
(:func:`capture`). Then each block runs on them (:func:`run_block`), with hooks recording what its
consumers read (:func:`record`, :func:`observe`) and the per-token weights (:func:`token_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ...calib.capture import module_call
from ...device import model_device
from ...errors import UnsupportedModelError
from ..adapters import Adapter
from ..adapters.base import MLPSpec


def layer_mlp(adapter: Adapter, model: nn.Module, i: int) -> MLPSpec:
    """Layer ``i``'s one MLP; mixture-of-experts layers are refused (no module shows an expert's input)."""
    specs = adapter.mlps(model, i)
    if len(specs) > 1:
        raise UnsupportedModelError(
            f"calibrated compression of mixture-of-experts MLPs ({specs[0].name.rsplit('.', 2)[0]}: "
            f"{len(specs)} experts) is not supported; use the data-free fold/prune for targets='mlp', or "
            "calibrate only the attention (targets='attention')")
    return specs[0]


@dataclass
class BlockInputs:
    """What flows between blocks: hidden states per micro-batch and the blocks' keyword arguments."""

    xs: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def capture(model: nn.Module, adapter: Adapter, ids: torch.Tensor, micro_batch: int = 4) -> BlockInputs:
    """Inputs of block 0 for each micro-batch of ``ids`` (the model runs only up to block 0)."""
    first = adapter.layers(model)[0]
    ids = ids.to(model_device(model))  # token ids made on the CPU, model wherever it is
    xs, kws = [], []
    with torch.no_grad():
        for s in range(0, ids.shape[0], micro_batch):
            call = module_call(first, lambda s=s: model(input_ids=ids[s:s + micro_batch], use_cache=False))
            if call is None:
                continue
            args, kw = call
            x = args[0] if args else kw.pop("hidden_states")
            if len(args) > 1:  # positional extras (BERT's attention mask in some versions)
                kw["__args__"] = args[1:]
            xs.append(x.detach())
            kws.append(kw)
    return BlockInputs(xs, kws)


def _call(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    extra = kw.pop("__args__", ())
    out = block(x, *extra, **kw)
    return out[0] if isinstance(out, tuple | list) else out


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs: the next block's inputs."""
    with torch.no_grad():
        return BlockInputs([_call(block, x, kw) for x, kw in zip(inputs.xs, inputs.kwargs, strict=True)],
                           inputs.kwargs)


def record(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Inputs (N, features) that ``modules`` of ``block`` read when the block runs on ``inputs``."""
    return observe(block, inputs, modules).acts


@dataclass
class Seen:
    """What one run of a block on the calibration activations showed (:func:`observe`)."""

    acts: dict[str, torch.Tensor]  # (N, features) inputs of the watched modules
    sums: torch.Tensor | None = None  # (N, d) residual + MLP output (``sum_point``), when asked for
    out: BlockInputs | None = None  # the block's outputs (the next block's inputs), when asked for
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # Gram matrices of the weighted acts, if made


def _flat(t: Any) -> torch.Tensor:
    t = t[0] if isinstance(t, tuple | list) else t
    return t.detach().reshape(-1, t.shape[-1]).float()


def observe(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module], *, sums: bool = False,
            at: nn.Module | None = None, outputs: bool = False) -> Seen:
    """One run of ``block`` on ``inputs`` recording the inputs of ``modules``, and with ``sums`` the residual
    sums at ``at`` (as :func:`sum_point`), with ``outputs`` the block's outputs (as :func:`run_block`).
    The same values as separate runs give, bit for bit, for a third of the block forwards."""
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    got: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: acc[k].append(_flat(args[0])))
               for k, m in modules.items()]
    if sums and at is not None:
        handles.append(at.register_forward_pre_hook(lambda m, a: got.append(_flat(a))))
    try:
        with torch.no_grad():
            for x, kw in zip(inputs.xs, inputs.kwargs, strict=True):
                y = _call(block, x, kw)
                if sums and at is None:
                    got.append(_flat(y))
                if outputs:
                    outs.append(y)
    finally:
        for h in handles:
            h.remove()
    return Seen({k: torch.cat(v) for k, v in acc.items()}, torch.cat(got) if sums else None,
                BlockInputs(outs, inputs.kwargs) if outputs else None)


def _run_hooked(block: nn.Module, inputs: BlockInputs, handles: list) -> None:
    """Run ``block`` on every micro-batch of ``inputs``, then remove the hook ``handles``."""
    try:
        with torch.no_grad():
            for x, kw in zip(inputs.xs, inputs.kwargs, strict=True):
                _call(block, x, kw)
    finally:
        for h in handles:
            h.remove()


def sum_point(block: nn.Module, inputs: BlockInputs, at: nn.Module | None, consumer: nn.Module | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, d) residual + MLP output as the block computes it (the input of ``at``, else the block's
    output), and the consumer's own output (N, d) when ``consumer`` is given."""
    got: dict[str, list[torch.Tensor]] = {"s": [], "z": []}

    def keep(key: str, t: Any) -> None:
        t = t[0] if isinstance(t, tuple | list) else t
        got[key].append(t.detach().reshape(-1, t.shape[-1]).float())

    hs = [at.register_forward_pre_hook(lambda m, a: keep("s", a)) if at is not None
          else block.register_forward_hook(lambda m, a, o: keep("s", o))]
    if consumer is not None:
        hs.append(consumer.register_forward_hook(lambda m, a, o: keep("z", o)))
    _run_hooked(block, inputs, hs)
    return torch.cat(got["s"]), (torch.cat(got["z"]) if consumer is not None else None)


def token_scale(block: nn.Module, inputs: BlockInputs, at: nn.Module | None) -> torch.Tensor:
    """(N,) row weights (square roots) 1/||r_t||, normalised to mean square 1: r_t is token t's residual
    sum after the block (``sum_point``). Errors then count relative to each token's own residual norm,
    which the next norm layer divides by, so the few tokens with massive activations (the BOS
    attention sink: 98% of SmolLM2's residual energy from layer 12 on) cannot dominate the fit."""
    r, _ = sum_point(block, inputs, at)
    return scale_of(r)


def scale_of(r: torch.Tensor) -> torch.Tensor:
    """The token weights of :func:`token_scale` from the residual sums ``r`` (N, d)."""
    w = 1.0 / r.double().pow(2).sum(1).clamp_min(1e-12)
    return (w / w.mean()).sqrt().float()


def fit_rows(inputs: BlockInputs) -> int:
    """Activation rows (sequence-major) of the first half of the calibration sequences in ``inputs``: the
    rows a least-squares refit is fitted on when its ridge is chosen on the other half held out."""
    seqs = sum(x.shape[0] for x in inputs.xs)
    rows = sum(x.shape[0] * x.shape[1] for x in inputs.xs)
    return (seqs // 2) * (rows // seqs) if seqs >= 2 else rows // 2
