"""Alias of :mod:`modelfold.traced.baselines` (the baselines moved there), kept for one release."""

from .traced.baselines import ifm, ifm_labels, ifm_planner

__all__ = ["ifm", "ifm_labels", "ifm_planner"]
