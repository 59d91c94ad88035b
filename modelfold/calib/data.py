"""Alias of the error's old import path (``modelfold.calib.data.CalibrationError``); kept for one release.

Calibration data for language models moved to :mod:`modelfold.hf.calib.data`.
"""

from ..errors import CalibrationError

__all__ = ["CalibrationError"]
