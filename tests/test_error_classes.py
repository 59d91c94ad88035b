"""One name per error: every exception class modelfold defines lives in modelfold.errors and
subclasses ModelFoldError, so ``except ModelFoldError`` (or any one class) catches every raise site."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import modelfold
import modelfold.errors as errors

#: exceptions that are control flow inside one module, caught there and never seen by a caller
INTERNAL = {
    # raised asynchronously into the tracer thread by bounds.bounded; groups.py turns it into an
    # UnsupportedModelError, so it never reaches the user. It must not subclass ModelFoldError: code
    # inside the bounded block that catches ModelFoldError would swallow the stop signal.
    "modelfold.bounds.BoundExceeded",
    # raised by a forward hook to end a calibration forward early (calib/capture.py) and caught right there
    # by run_stopped; it never reaches the user, and must not be caught as a ModelFoldError on the way.
    "modelfold.calib.capture.StopForward",
}


def _modules() -> list[str]:
    names = ["modelfold"]
    for info in pkgutil.walk_packages(modelfold.__path__, "modelfold."):
        names.append(info.name)
    return sorted(names)


def _exception_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in _modules():
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # an optional extra (ray, onnx) that is not installed here
            if e.name is not None and not e.name.startswith("modelfold"):
                continue
            raise
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("modelfold"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_walk_finds_the_modules_that_define_errors():
    mods = _modules()
    assert len(mods) > 40 and "modelfold.calib.data" in mods and "modelfold.hf.plan" in mods


def test_every_public_exception_is_defined_in_errors():
    found = _exception_classes()
    public = {k: v for k, v in found.items() if not v.__name__.startswith("_") and k not in INTERNAL}
    elsewhere = sorted(k for k, v in public.items() if v.__module__ != "modelfold.errors")
    assert elsewhere == [], f"define these in modelfold/errors.py and import them where they are raised: {elsewhere}"
    assert INTERNAL <= set(found), "INTERNAL lists a class that no longer exists; drop it"
    assert {v.__name__ for v in public.values()} == set(errors.__all__)


def test_errors_module_classes_all_subclass_modelfolderror():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == "modelfold.errors"]
    assert len(classes) >= 12
    for c in classes:
        assert issubclass(c, errors.ModelFoldError), c
        assert c.__doc__, f"{c.__name__} needs a docstring saying when it is raised"
    assert sorted(c.__name__ for c in classes) == sorted(errors.__all__)


@pytest.mark.parametrize(("module", "name"), [
    ("modelfold.calib.data", "CalibrationError"), ("modelfold.traced.sources", "CalibrationError"),
    ("modelfold.calib.cnn_sources", "CalibrationError"),
    ("modelfold.traced.repair", "RepairError"), ("modelfold.repair", "RepairError"),
    ("modelfold.hf.plan", "InvalidPlanError"),
    ("modelfold.hf", "InvalidPlanError"), ("modelfold.device", "DeviceError"),
])
def test_old_import_names_are_the_same_class(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_one_calibration_error_catches_both_sources():
    import torch

    from modelfold.hf.calib import data
    from modelfold.traced import sources

    with pytest.raises(data.CalibrationError):
        sources.calibration_batches("nonsense", torch.nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(sources.CalibrationError):
        data.resolve(torch.nn.Linear(2, 2), ["some text"], None, n_seq=1, seq_len=4)
