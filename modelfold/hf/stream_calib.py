"""Alias of :mod:`modelfold.hf.checkpoint.calibrated`; kept for one release."""

from .checkpoint.calibrated import compress_checkpoint

__all__ = ["compress_checkpoint"]
