"""Hook-and-stop: read what a module receives without running the rest of the network.

Used by the CNN calibrator (a layer's input, per-channel activation statistics) and by the transformer
pipeline (the inputs of block 0). A hook raises :class:`StopForward` once it has what it needs; the
caller's run ends there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: the rest of the network is not needed."""


@contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, Callable]], *, after: bool = False,
          with_kwargs: bool = False) -> Iterator[None]:
    """Register forward pre-hooks (``after``: forward hooks) on each module for the duration of the block."""
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_hook(fn, with_kwargs=with_kwargs) if after
                           else mod.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


def run_stopped(run: Callable[[], Any]) -> bool:
    """Call ``run()``; True when a hook ended it early with :class:`StopForward`."""
    try:
        run()
    except StopForward:
        return True
    return False


def module_call(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple, dict] | None:
    """The (args, kwargs) of ``module``'s first call while ``run()`` runs (stopped right there), or None if
    ``run()`` never called it. Tensors are returned as they were passed (callers detach what they keep)."""
    got: list[tuple[tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, dict(kwargs)))
        raise StopForward

    with hooks([(module, hook)], with_kwargs=True):
        run_stopped(run)
    return got[0] if got else None


def run_through(module: nn.Module, run: Callable[[], Any]) -> None:
    """Call ``run()`` until ``module`` has finished its forward (e.g. its train-mode BN statistics updated)."""
    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        raise StopForward

    with hooks([(module, hook)], after=True):
        run_stopped(run)
