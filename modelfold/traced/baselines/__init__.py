"""Baselines of the paper (§7) that are not folding itself.

SP-L1 / SP-L2 structured magnitude pruning are :func:`modelfold.prune` (``norm=1|2``);
IFM (iterative feature merging) is :func:`ifm`.
"""

from __future__ import annotations

from .ifm import ifm, ifm_labels, ifm_planner

__all__ = ["ifm", "ifm_labels", "ifm_planner"]
