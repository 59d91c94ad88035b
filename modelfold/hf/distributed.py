"""Alias of :mod:`modelfold.hf.checkpoint.on_ray`; kept for one release."""

from .checkpoint.on_ray import KILL_HOOK, RETRIES, fold_on_ray, fold_task

__all__ = ["KILL_HOOK", "RETRIES", "fold_on_ray", "fold_task"]
