"""Alias of :mod:`modelfold.traced.sources` (CNN calibration inputs moved there), kept for one release.

``modelfold.calib.cnn_sources.CalibrationError`` is documented (docs/errors.md) as an old import path.
"""

from ..traced.sources import SELF_DEFAULTS, SOURCES, CalibrationError, calibration_batches, default_self_shape

__all__ = ["SELF_DEFAULTS", "SOURCES", "CalibrationError", "calibration_batches", "default_self_shape"]
