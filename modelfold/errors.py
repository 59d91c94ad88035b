"""Exceptions raised by modelfold. Every message names the problem and the way out."""

from __future__ import annotations


class ModelFoldError(Exception):
    """Base class of every error modelfold raises on purpose."""


class InvalidRatioError(ModelFoldError, ValueError):
    """A ratio/sparsity outside the admissible range (or an invalid ``round_to``)."""


class InputShapeError(ModelFoldError, ValueError):
    """The example inputs do not fit the model."""


class UnsupportedModelError(ModelFoldError):
    """The model (or one of its layers) cannot be folded safely."""


class InvalidWeightsError(ModelFoldError, ValueError):
    """NaN/Inf or otherwise unusable parameters."""


class ModelModeError(ModelFoldError):
    """The model is in a mode folding does not accept (e.g. training mode)."""


class CheckpointError(ModelFoldError):
    """A model file could not be read or written."""


class ExportError(ModelFoldError):
    """A model could not be exported (e.g. to ONNX), or the exporter is not installed."""


class CalibrationError(ModelFoldError, ValueError):
    """Calibration data that cannot be used: not "self", a tensor, a DataLoader, token ids or texts;
    empty, too short, binary, or texts without a tokenizer."""


class RepairError(ModelFoldError, ValueError):
    """A repair was asked for with missing or invalid settings (e.g. repair="data" without data)."""


class InvalidPlanError(ModelFoldError, ValueError):
    """Unknown targets, a layer index outside the model, or conflicting plan arguments."""


class DeviceError(ModelFoldError, ValueError):
    """A device that is not valid, or not present on this machine."""


__all__ = [
    "CalibrationError", "CheckpointError", "DeviceError", "ExportError", "InputShapeError",
    "InvalidPlanError", "InvalidRatioError", "InvalidWeightsError", "ModelFoldError", "ModelModeError",
    "RepairError", "UnsupportedModelError",
]


class ResultError(ModelFoldError):
    """A compressed model that cannot run: before fold/prune/compress return it or save/save_gguf
    write it, it runs one forward on a tiny input in its own runtime (``verify=True``, the default);
    a failure names the failing module and the way out (e.g. ``round_to=``); nothing is returned or
    written and the input model is unchanged."""


__all__.append("ResultError")
