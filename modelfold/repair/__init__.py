"""Repairs of the activation statistics after merging (paper §5)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..engine import Planner


class Repair:
    """No repair (Fold-Naive). Subclasses transform the model around the fold."""

    name = "none"

    def before(self, model: nn.Module) -> nn.Module:
        return model

    def wrap(self, planner: Planner) -> Planner:
        return planner

    def after(self, model: nn.Module) -> nn.Module:
        return model


def make_repair(name: str, **kwargs: Any) -> Repair:
    """Build the repair named ``name`` ("none", "ar", "dir", "data")."""
    if name == "none":
        return Repair()
    raise NotImplementedError(f"repair={name!r} is not available yet")
