"""Hook-and-stop: a module's call is read and the rest of the network does not run."""

from __future__ import annotations

import torch
import torch.nn as nn

from modelfold.calib.capture import module_call, run_through


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.ran: list[str] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        for name in "abc":
            self.ran.append(name)
            x = getattr(self, name)(x) * scale
        return x


def test_module_call_returns_the_inputs_and_stops_there() -> None:
    m = _Counting()
    x = torch.randn(2, 4)
    args, kwargs = module_call(m.b, lambda: m(x))
    assert torch.equal(args[0], m.a(x)) and kwargs == {}
    assert m.ran == ["a", "b"]  # c never ran
    assert not m.b._forward_pre_hooks  # the hook is gone


def test_module_call_of_a_module_that_never_runs_is_none() -> None:
    m, other = _Counting(), nn.Linear(4, 4)
    assert module_call(other, lambda: m(torch.randn(2, 4))) is None
    assert m.ran == ["a", "b", "c"]


def test_run_through_finishes_the_module_then_stops() -> None:
    m = _Counting()
    run_through(m.a, lambda: m(torch.randn(2, 4)))
    assert m.ran == ["a"] and not m.a._forward_hooks
