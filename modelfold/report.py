"""What a compression did: per-group widths and errors, parameters and MACs before/after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class GroupReport:
    """One channel group: its members, widths before/after and clustering error."""

    root: str
    members: list[str]
    channels_before: int
    channels_after: int
    status: str  # folded | pruned | kept
    reason: str = ""
    rel_error: float | None = None  # k-means inertia / squared norm of the features


@dataclass
class FoldReport:
    """Summary of one ``fold``/``prune`` call."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    seconds: float
    groups: list[GroupReport] = field(default_factory=list)
    repair: str = "none"
    repair_info: dict = field(default_factory=dict)  # e.g. {"bn_reset": 17, "dir_batch": "cache"}
    info: dict = field(default_factory=dict)  # how it ran, e.g. {"executor": "ray", "fold_seconds": 12.3}

    @property
    def param_sparsity(self) -> float:
        """Fraction of parameters removed (measured)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def kept_groups(self) -> list[GroupReport]:
        return [g for g in self.groups if g.status == "kept"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["param_sparsity"] = self.param_sparsity
        return d

    def __str__(self) -> str:
        def m(x: int | None) -> str:
            return "n/a" if x is None else f"{x / 1e6:,.2f}M"

        done = [g for g in self.groups if g.status != "kept"]
        lines = [
            f"modelfold {self.method} (repair={self.repair}) "
            + (f"ratios per layer up to {self.ratio:.3f}" if self.info.get("ratios") == "per layer"
               else f"ratio={self.ratio:.3f}") + f" in {self.seconds:.1f}s",
            f"  parameters: {m(self.params_before)} -> {m(self.params_after)} "
            f"(sparsity {self.param_sparsity:.1%})",
            f"  MACs:       {m(self.macs_before)} -> {m(self.macs_after)}",
            f"  groups: {len(done)} compressed, {len(self.kept_groups)} kept intact",
        ]
        if self.repair_info:
            label = "calibration" if "calibration" in self.repair_info else "repair"
            lines.insert(3, f"  {label}: " + ", ".join(f"{k}={v if not isinstance(v, list | dict) else len(v)}"
                                                       for k, v in self.repair_info.items()))
        for g in self.groups:
            err = "" if g.rel_error is None else f"  err={g.rel_error:.3f}"
            why = f"  ({g.reason})" if g.reason else ""
            lines.append(f"    {g.root:<40} {g.channels_before:>5} -> {g.channels_after:<5} {g.status}{err}{why}")
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_macs(model: nn.Module, example_inputs: object) -> int | None:
    """Multiply-accumulates of one forward pass, from torch's FLOP counter (FLOPs / 2)."""
    if example_inputs is None:
        return None
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*args)
    except Exception:  # noqa: BLE001 - counting is best effort
        return None
    return int(counter.get_total_flops()) // 2
