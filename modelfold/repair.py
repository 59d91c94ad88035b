"""Alias of :mod:`modelfold.traced.repair` (the repairs moved there), kept for one release."""

from .traced.repair import REPAIR_NAMES, Repair, RepairError, make_repair

__all__ = ["REPAIR_NAMES", "Repair", "RepairError", "make_repair"]
