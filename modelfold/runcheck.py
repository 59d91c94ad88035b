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


def run_or_raise(root: nn.Module, fn: Callable[[], Any], *, what: str, way_out: str | Callable[[str], str],
                 prefix: str = "") -> Any:
    """``fn()`` (a forward of ``root``); any exception becomes a ResultError naming the failing module.

    ``way_out``: the advice, or a function of the failing module's name returning it. ``prefix``: the
    name of ``root`` inside the model the user knows (e.g. "model.layers.3").
    """
    names = {m: n for n, m in root.named_modules()}
    stack: list[str] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(mod, "?"))

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            return fn()
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the result is unusable
        inner = stack[-1] if stack else ""
        name = ".".join(filter(None, (prefix, inner))) or type(root).__name__
        mod = root.get_submodule(inner) if inner else root
        advice = way_out(name) if callable(way_out) else way_out
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

    def advice(name: str) -> str:
        return (f"Keep that module intact with ignore=['{name}'] (or keep_outputs=), or pass strict=True to "
                "refuse groups that cannot be folded safely; please report the model if the groups looked "
                "foldable.")

    run_or_raise(model, lambda: forward(model, x), what=what, way_out=advice)


__all__ = ["check_cnn_runs", "first_item", "run_or_raise"]
