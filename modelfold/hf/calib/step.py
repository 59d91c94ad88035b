"""The per-layer step of calibrated compression: record what a block's consumers read, compress the
block (:mod:`.layer`), and carry the activations past it (through the *compressed* block, so every
block is calibrated on what the already-compressed blocks before it produce)."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn as nn

from ...checks import kept_width
from ...report import GroupReport
from ..adapters import Adapter
from ..adapters.refs import hook_module
from .blocks import (
    BlockInputs,
    Seen,
    capture,
    fit_rows,
    layer_mlp,
    observe,
    record,
    run_block,
    scale_of,
    sum_point,
)
from .layer import CalibOptions, compress_attention, compress_mlp


class Calibrated:
    """The per-layer step of calibrated compression (a LayerFn), carrying the activations along.

    With ``opts.feedback`` it also carries the *original* model's activations, and refits each MLP
    consumer so that the compressed stream's residual sum matches the original's: later layers
    then correct the drift of earlier ones instead of only matching their own outputs.
    """

    def __init__(self, ids: torch.Tensor, opts: CalibOptions, micro_batch: int = 4) -> None:
        self.ids, self.opts, self.micro_batch = ids, opts, micro_batch
        self.inputs: BlockInputs | None = None
        self.orig: BlockInputs | None = None
        self.carry = True  # False: the compressed block's outputs are not needed (a probe), so not computed

    def start(self, model: nn.Module, adapter: Adapter) -> None:
        self.inputs = capture(model, adapter, self.ids, self.micro_batch)

    def state(self) -> dict[str, torch.Tensor]:
        """The activations this step carries to the next layer (a resumed layer-by-layer run restores them)."""
        out = {f"x{k}": x.cpu() for k, x in enumerate(self.inputs.xs)} if self.inputs is not None else {}
        if self.orig is not None:
            out.update({f"o{k}": x.cpu() for k, x in enumerate(self.orig.xs)})
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Carry ``state`` (from ``state()``) instead; the keyword arguments stay those of this run."""
        kwargs = self.inputs.kwargs
        self.inputs = BlockInputs([state[f"x{k}"] for k in range(len(kwargs))], kwargs)
        self.orig = BlockInputs([state[f"o{k}"] for k in range(len(kwargs))], kwargs) if "o0" in state else None

    def fingerprint(self) -> dict:
        """What besides the plan decides this step's output (for resumed runs)."""
        ids = self.ids.contiguous().cpu()
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest() + str(tuple(ids.shape))
        return {"calibration": digest, "calib_options": dataclasses.asdict(self.opts)}

    def __call__(self, work: nn.Module, adapter: Adapter, i: int, p: dict[str, float],
                 seen: Seen | None = None) -> list[GroupReport]:
        """Compress layer ``i`` of ``work`` by the plan ``p`` and carry the activations past it. ``seen``: what
        a run of the *original* block on ``self.inputs`` already recorded (``sums`` and the consumers' inputs
        ``acts["c"]`` / ``acts["o"]``), so it is not run again for them."""
        if self.inputs is None:
            self.start(work, adapter)
        block = adapter.layers(work)[i]
        out = []
        feedback = self.opts.feedback and adapter.mlp_feedback
        goal = next_orig = None
        attn, mlp = p.get("attention", 0) > 0, p.get("mlp", 0) > 0
        spec = layer_mlp(adapter, work, i) if mlp else None
        n = spec.width if mlp else 0
        k = kept_width(n, p["mlp"], self.opts.round_to) if mlp else 0
        mlp = mlp and k < n
        weigh = self.opts.weighting == "token" and (p.get("mlp", 0) > 0 or attn)
        if seen is None:  # one run of the original block for the token weights and the consumers' inputs
            mods = {"o": hook_module(adapter.attention(work, i).o)} if attn else {}
            if mlp and not attn:  # else the MLP reads what the compressed attention makes: recorded below
                mods["c"] = hook_module(spec.consumer)
            seen = observe(block, self.inputs, mods, sums=weigh, at=adapter.mlp_sum(work, i)) \
                if mods or weigh else Seen({})
        scale = scale_of(seen.sums) if weigh else None
        if feedback:  # block i is still the original here
            self.orig = self.inputs if self.orig is None else self.orig
            if mlp:
                goal, _ = sum_point(block, self.orig, adapter.mlp_sum(work, i))
            next_orig = run_block(block, self.orig)
        if attn:
            aspec = adapter.attention(work, i)
            before, after, err, lam = compress_attention(aspec, p["attention"], seen.acts["o"], adapter, self.opts,
                                                         scale, fit_rows(self.inputs))
            out.append(GroupReport(aspec.name, aspec.names, before, after,
                                   "pruned" if after < before else "kept", ridge_note(lam), err))
        if mlp:
            given = not attn and "c" in seen.acts
            h = seen.acts["c"] if given else record(block, self.inputs, {"c": hook_module(spec.consumer)})["c"]
            gc = seen.grams.get("c") if given and goal is None else None
            del seen

            def rerun() -> torch.Tensor:
                return record(block, self.inputs, {"c": hook_module(spec.consumer)})["c"]

            target = None
            if goal is not None:
                s_c, z_c = sum_point(block, self.inputs, adapter.mlp_sum(work, i), hook_module(spec.consumer))
                target = goal - (s_c - z_c)  # what the consumer must add to land on the original's sum
                del s_c, z_c
            err, lam = compress_mlp(spec, k, h, self.opts, rerun, target, scale, gc, fit_rows(self.inputs))
            out.append(GroupReport(spec.name, spec.member_names(), n, k,
                                   "folded" if self.opts.method == "fold" else "pruned", ridge_note(lam), err))
        if self.carry:
            self.inputs = run_block(block, self.inputs)
        self.orig = next_orig
        return out


def ridge_note(lam: float) -> str:
    """The report's note on the least-squares refit: the ridge chosen (``inf``: none helped)."""
    if math.isnan(lam):
        return ""
    return "no refit (held-out rows)" if math.isinf(lam) else f"ridge {lam:g}"
