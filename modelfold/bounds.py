"""Time and memory bounds around third-party code that can run away (the dependency tracer).

Torch-Pruning's tracer, faced with reshapes it cannot follow (Swin-V2's window attention, MaxViT),
can grow its index maps until the OOM killer ends the process, or loop for hours. ``bounded``
watches the process from a helper thread and, past the limits, raises ``BoundExceeded`` in the
watched thread (``PyThreadState_SetAsyncExc``: delivered at its next Python bytecode, which the
tracer, pure Python, reaches constantly). Limits: ``MODELFOLD_TRACE_TIMEOUT`` (seconds, default
300) and ``MODELFOLD_TRACE_MEMORY_GB`` (growth of resident memory, default: 60% of the memory
available when the bound starts, at most 16 GB); 0 disables a limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator


class BoundExceeded(Exception):
    """Raised inside the watched code when it ran past its time or memory bound."""


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _env_float(name: str, default: float | None) -> float | None:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    return None if v <= 0 else v


def default_limits() -> tuple[float | None, int | None]:
    """(seconds, bytes of RSS growth) from the environment or the defaults."""
    seconds = _env_float("MODELFOLD_TRACE_TIMEOUT", 300.0)
    avail = available_memory()
    default_gb = min(16.0, 0.6 * avail / 1e9) if avail else 16.0
    gb = _env_float("MODELFOLD_TRACE_MEMORY_GB", default_gb)
    return seconds, None if gb is None else int(gb * 1e9)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


@contextlib.contextmanager
def bounded(what: str, seconds: float | None = None, max_growth: int | None = None,
            poll: float = 0.2) -> Iterator[None]:
    """Run the body; raise ``BoundExceeded`` in it if it takes > ``seconds`` or grows RSS by > ``max_growth``.

    ``None`` for both limits means the environment / defaults (``default_limits``).
    """
    if seconds is None and max_growth is None:
        seconds, max_growth = default_limits()
    target = threading.get_ident()
    start_t, start_rss = time.monotonic(), _rss()
    lock = threading.Lock()
    state = {"done": False, "fired": None}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            reason = None
            elapsed = time.monotonic() - start_t
            grown = _rss() - start_rss
            if seconds is not None and elapsed > seconds:
                reason = f"it ran for more than {seconds:.0f} s"
            elif max_growth is not None and grown > max_growth:
                reason = f"its memory grew by {grown / 1e9:.1f} GB, more than the {max_growth / 1e9:.1f} GB bound"
            if reason is not None:
                with lock:
                    if not state["done"]:
                        state["fired"] = reason
                        _raise_in(target, BoundExceeded)
                return

    thread = threading.Thread(target=watch, name=f"modelfold-bound:{what}", daemon=True)
    thread.start()
    try:
        yield
    except BoundExceeded:
        raise BoundExceeded(f"{what} stopped: {state['fired'] or 'bound exceeded'}") from None
    finally:
        with lock:
            state["done"] = True
            pending = state["fired"] is not None
        stop.set()
        if pending:  # fired while the body was finishing: cancel an exception not yet delivered
            _raise_in(target, None)
