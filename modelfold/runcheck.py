"""Does a result run? One forward on a tiny input, in the model's own runtime, before it is handed out.

``run_or_raise`` runs a callable while forward hooks note which module is executing; if it raises,
the innermost module that started and did not finish is named in a :class:`~modelfold.errors.ResultError`
together with the way out. CNN results (``modelfold.fold/prune/compress`` with example inputs) are
checked here on the example input's first item; transformers results in ``modelfold.hf.runcheck``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .errors import ResultError


def _shapes(module: nn.Module) -> str:
    parts = [f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False)]
    return f" (parameters: {', '.join(parts[:4])})" if parts else ""


def run_or_raise(root: nn.Module, fn: Callable[[], Any], *, what: str,
                 way_out: str | Callable[[str, str | None], str], prefix: str = "") -> Any:
    """``fn()`` (a forward of ``root``); any exception becomes a ResultError naming the failing module.

    ``way_out``: the advice, or a function of (the failing module's name, the name of the last module
    with its own parameters that finished before it, or None) returning it. ``prefix``: the name of
    ``root`` inside the model the user knows (e.g. "model.layers.3").
    """
    names = {m: n for n, m in root.named_modules()}
    stack: list[str] = []
    last: list[str] = []  # the last module with its own weights that finished (a conv/linear feeding the failure)

    def pre(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(mod, "?"))

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            done = stack.pop()
            if next(mod.parameters(recurse=False), None) is not None:
                last[:] = [done]

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            return fn()
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the result is unusable
        inner = stack[-1] if stack else ""
        name = ".".join(filter(None, (prefix, inner))) or type(root).__name__
        mod = root.get_submodule(inner) if inner else root
        prev = ".".join(filter(None, (prefix, last[0]))) if last else None
        advice = way_out(name, prev) if callable(way_out) else way_out
        raise ResultError(
            f"{what} cannot run: its module '{name}' ({type(mod).__name__}{_shapes(mod)}) raised "
            f"{type(e).__name__}: {e}. {advice} Nothing was returned or written and the input model is "
            "unchanged; verify=False skips this check (the result would fail the same way when used).") from e
    finally:
        for h in handles:
            h.remove()


def first_item(x: Any) -> Any:
    """The first item of a batch (tensors sliced to ``[:1]``; tuples, lists and dicts item by item)."""
    if isinstance(x, torch.Tensor):
        return x[:1] if x.dim() > 0 and x.shape[0] > 1 else x
    if isinstance(x, tuple | list):
        return type(x)(first_item(v) for v in x)
    if isinstance(x, dict):
        return {k: first_item(v) for k, v in x.items()}
    return x


def check_cnn_runs(model: nn.Module, example_inputs: Any, what: str = "the compressed model") -> None:
    """One forward of ``model`` on the first item of ``example_inputs``; a failure is a ResultError."""
    from .checks import forward

    x = first_item(example_inputs)

    def advice(name: str, prev: str | None) -> str:
        try:
            own = next(model.get_submodule(name).parameters(recurse=False), None) is not None
        except AttributeError:  # the top-level forward itself
            own = False
        keep = f"ignore=['{name}']" if own else \
            (f"keep_outputs=['{prev}'] (the layer that ran last before it)" if prev else "keep_outputs=[...]")
        return (f"It assumes channel counts the fold changed: keep its channels with {keep}, or fold less "
                "(a smaller ratio); please report the model if the module looked foldable.")

    run_or_raise(model, lambda: forward(model, x), what=what, way_out=advice)


__all__ = ["check_cnn_runs", "first_item", "run_or_raise"]
