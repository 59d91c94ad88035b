"""Time and memory bounds around runaway code raise a clear error inside it, and only then."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import modelfold
from modelfold.bounds import BoundExceeded, bounded, default_limits
from modelfold.errors import UnsupportedModelError


def test_time_bound_interrupts_a_python_loop():
    t = time.monotonic()
    with pytest.raises(BoundExceeded, match="spinning stopped: it ran for more than"):
        with bounded("spinning", seconds=0.3, max_growth=None, poll=0.05):
            while True:
                sum(range(1000))
    assert time.monotonic() - t < 5


def test_memory_bound_interrupts_growth():
    hog = []
    with pytest.raises(BoundExceeded, match="memory grew by"):
        with bounded("hoarding", seconds=None, max_growth=50_000_000, poll=0.02):
            for _ in range(400):  # up to ~400 MB, stopped after ~50 MB
                hog.append(bytearray(1_000_000))
                hog[-1][::4096] = b"x" * len(hog[-1][::4096])  # touch the pages: they count in RSS
                time.sleep(0.002)
    assert len(hog) < 400


def test_a_finished_body_is_never_interrupted_later():
    for _ in range(20):
        with bounded("quick", seconds=0.05, max_growth=None, poll=0.01):
            pass
    time.sleep(0.3)  # a stale watcher would raise here
    assert sum(range(10)) == 45


def test_limits_from_environment(monkeypatch):
    monkeypatch.setenv("MODELFOLD_TRACE_TIMEOUT", "12")
    monkeypatch.setenv("MODELFOLD_TRACE_MEMORY_GB", "0")
    assert default_limits() == (12.0, None)
    monkeypatch.setenv("MODELFOLD_TRACE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MODELFOLD_TRACE_TIMEOUT"):
        default_limits()


def test_a_runaway_tracer_becomes_an_unsupported_model_error(monkeypatch):
    import torch_pruning as tp

    def stuck(self, *a, **k):  # a generator, like the real one: the work happens in next()
        while True:
            sum(range(1000))
        yield

    monkeypatch.setenv("MODELFOLD_TRACE_TIMEOUT", "0.5")
    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", stuck)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(UnsupportedModelError, match="grouping the model's channels stopped.*MODELFOLD_TRACE_TIMEOUT"):
        modelfold.fold(model, torch.randn(1, 4), ratio=0.5)
