"""Repairs of the activation statistics after merging (paper §5).

A repair transforms the model around the fold: ``before`` (on the working copy, before
features are read), ``wrap`` (around the planner, e.g. to set per-cluster scales) and
``after`` (on the folded model). See ``docs/repair.md``.

- ``"none"``: Fold-Naive.
- ``"ar"``: Fold-AR, data-free approximate REPAIR (:class:`~modelfold.traced.repair.ar.FoldAR`).
- ``"dir"``: Fold-DIR, DeepInversion REPAIR (:class:`~modelfold.traced.repair.dir.FoldDIR`).
- ``"data"``: Fold-R, REPAIR on user data (:class:`~modelfold.traced.repair.data.FoldR`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...errors import RepairError
from ..engine import Planner


class Repair:
    """No repair (Fold-Naive). Subclasses transform the model around the fold."""

    name = "none"
    summary: dict[str, Any] = {}  # what the repair did; subclasses set their own after after()

    def before(self, model: nn.Module) -> nn.Module:
        return model

    def wrap(self, planner: Planner) -> Planner:
        return planner

    def after(self, model: nn.Module) -> nn.Module:
        return model


REPAIR_NAMES = ("none", "ar", "dir", "data")


def make_repair(name: str, **kwargs: Any) -> Repair:
    """Build the repair named ``name`` ("none", "ar", "dir", "data").

    kwargs: ``model`` (the original model), ``example_inputs``, ``seed``, ``progress``,
    ``data`` (for "data") and the repair's own options (e.g. ``dir_batch``/``dir_iters``
    for "dir", ``ar_rho`` for "ar"). Options a repair does not use are rejected.
    """
    if name == "none":
        extra = {k for k, v in kwargs.items()
                 if k not in ("model", "example_inputs", "seed", "progress", "data") and v is not None}
        if extra:
            raise RepairError(f"repair='none' takes no options, got {sorted(extra)}")
        return Repair()
    if name == "ar":
        from .ar import FoldAR

        return FoldAR.from_kwargs(**kwargs)
    if name == "dir":
        from .dir import FoldDIR

        return FoldDIR.from_kwargs(**kwargs)
    if name == "data":
        from .data import FoldR

        return FoldR.from_kwargs(**kwargs)
    raise RepairError(f"unknown repair {name!r}; choose one of {REPAIR_NAMES}: 'none' (Fold-Naive), "
                         "'ar' (data-free approximate REPAIR), 'dir' (DeepInversion REPAIR, data-free) or "
                         "'data' (Fold-R, needs data=)")


__all__ = ["REPAIR_NAMES", "Repair", "RepairError", "make_repair"]
