"""Input validation shared by the public API: clear errors before any work is done."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from .errors import InputShapeError, InvalidRatioError, InvalidWeightsError, ModelModeError


def ratio_or_sparsity(ratio: float | None, sparsity: float | None) -> float:
    """Validate that exactly one of ratio/sparsity is given and lies in [0, 1)."""
    if (ratio is None) == (sparsity is None):
        raise InvalidRatioError("give exactly one of ratio= (fraction of channels removed per group) "
                                "or sparsity= (fraction of parameters removed)")
    value, name = (ratio, "ratio") if ratio is not None else (sparsity, "sparsity")
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) \
            or not 0.0 <= value < 1.0:
        raise InvalidRatioError(f"{name}={value!r} is outside [0, 1): it is the fraction removed, "
                                "e.g. 0.5 removes half; 1.0 would remove everything")
    return float(ratio) if ratio is not None else 0.0


def check_sparsity(sparsity: Any, ratio: Any = None) -> None:
    """For calibrated compression: ``sparsity`` (if given) in (0, 1) and not given together with ``ratio``."""
    if sparsity is None:
        return
    if ratio is not None:
        raise InvalidRatioError("give either ratio= or sparsity=, not both")
    if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0.0 < sparsity < 1.0:
        raise InvalidRatioError(f"sparsity={sparsity!r} is outside (0, 1): it is the fraction of parameters "
                                "removed, e.g. sparsity=0.3")


def check_round_to(round_to: Any) -> int | None:
    """Validate ``round_to``: None (no rounding) or a positive integer channel multiple (8, 16, 64, ...)."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1:
        raise InvalidRatioError(f"round_to={round_to!r} must be a positive integer such as 8, 16 or 64 "
                                "(kept widths become multiples of it), or None for no rounding")
    return int(round_to)


def kept_width(n: int, ratio: float, round_to: int | None = None) -> int:
    """Channels kept of ``n`` at ``ratio``: k = max(1, round(n (1 - ratio))), then rounded to ``round_to``.

    With ``round_to`` = N > 1 (hardware-friendly widths, as Torch-Pruning's ``round_to``) k becomes the
    multiple of N nearest to it (halves round up) among N, 2N, ... up to n: never 0, never above n.
    A group the ratio leaves whole (k = n, e.g. ratio 0) stays whole, and so does a group narrower
    than N (n < N): it has no multiple of N to shrink to.
    """
    k = max(1, round(n * (1.0 - ratio)))
    if not round_to or round_to == 1 or k >= n:
        return min(k, n)
    if n < round_to:  # no multiple of round_to fits: keep the group whole
        return n
    nearest = (2 * k + round_to) // (2 * round_to) * round_to  # floor(k/N + 1/2) N, in integers
    return min(max(round_to, nearest), n // round_to * round_to)


def smallest_ratio(removed: Callable[[float], float], sparsity: float, hi: float, steps: int) -> float:
    """Bisect the smallest ratio in (0, hi] with ``removed(ratio) >= sparsity`` (removed is monotone)."""
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if removed(mid) < sparsity:
            lo = mid
        else:
            hi = mid
    return hi


def check_weights(model: nn.Module) -> None:
    """Raise if any parameter or floating buffer holds NaN/Inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidWeightsError(
                    f"{kind} '{name}' contains NaN or Inf values; folding would spread them into merged "
                    "channels. Repair or reload the checkpoint (or exclude the layer and fix it) first.")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
    if isinstance(x, tuple | list):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def forward(model: nn.Module, inputs: Any) -> Any:
    """One no-grad forward pass on a tensor, a tuple of positional inputs or a dict of keywords."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)


def run(model: nn.Module, example_inputs: Any) -> Any:
    """One forward pass; wrong inputs become an InputShapeError."""
    try:
        return forward(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        raise InputShapeError(
            f"the model cannot run on example_inputs {_describe(example_inputs)}: {type(e).__name__}: {e}. "
            "Pass a tensor (or tuple of tensors) shaped like a real batch, e.g. torch.randn(1, 3, 224, 224) "
            "for an ImageNet CNN.") from e


def prepare(model: nn.Module, example_inputs: Any) -> nn.Module:
    """Validate the model and inputs; return a deep copy to work on (the user's model is untouched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ModelModeError("the model is in training mode; call model.eval() first. Folding reads BatchNorm "
                             "running statistics and needs deterministic forward passes.")
    check_weights(model)
    work = copy.deepcopy(model)
    run(work, example_inputs)
    return work


def ignore_names(work: nn.Module, original: nn.Module, ignore: Iterable[nn.Module | str],
                 option: str = "ignore") -> set[str]:
    """Qualified names of ignored modules (given as names or as modules of the original model)."""
    by_id = {id(m): n for n, m in original.named_modules()}
    valid = {n for n, _ in work.named_modules()}
    names: set[str] = set()
    if isinstance(ignore, nn.Module | str):
        ignore = [ignore]
    for item in ignore:
        name = by_id.get(id(item)) if isinstance(item, nn.Module) else item
        if name is None or name not in valid:
            raise ValueError(f"{option} entry {item!r} is not a module of this model; use names from "
                             "model.named_modules() or the module objects themselves")
        names.add(name)
        names.update(f"{name}.{sub}" for sub, _ in work.get_submodule(name).named_modules() if sub)
    return names


def missing_inputs(model: nn.Module) -> TypeError:
    return TypeError(
        f"example_inputs is required for {type(model).__name__}: modelfold traces one forward pass to find "
        "coupled channels. Pass e.g. torch.randn(1, 3, 224, 224). (Only recognised Hugging Face "
        "transformers can be folded without it.)")
