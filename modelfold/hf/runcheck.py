"""Does a compressed transformers model run? One forward on a few token ids, as a user calls it.

* :func:`check_model_runs`: the whole model (the plain transformers class, its own forward) on a
  (2, 8) batch of token ids; used before ``fold_model`` / ``prune_model`` / ``compress_model`` return
  and before ``save`` / ``save_gguf`` write.
* :func:`check_layer_runs`: decoder/encoder layer ``i`` alone, for the layer-by-layer paths, where
  the rest of the model is a meta-device skeleton: the layer's inputs are captured once at layer 0
  (a fake-tensor forward that stops there; shapes only) and replaced by real tensors of the same
  shapes, dtype and device as layer ``i``'s weights.

A failure raises :class:`modelfold.errors.ResultError` naming the module and the way out.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..calib.capture import module_call
from ..errors import ResultError
from ..runcheck import run_or_raise
from .adapters import Adapter, find_adapter

BATCH, SEQ = 2, 8


def _special_ids(config: Any) -> set[int]:
    """Token ids with a meaning beyond text (image/audio placeholders, ...): never fed to the check."""
    out: set[int] = set()
    for c in (config, getattr(config, "text_config", None)):
        for k, v in (vars(c).items() if c is not None else ()):
            if isinstance(v, int) and not isinstance(v, bool) and k.endswith(("_token_index", "_token_id")):
                out.add(v)
    return out


def tiny_ids(model: nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
    """A deterministic (2, 8) batch of ordinary token ids for ``model`` (on its embeddings' device)."""
    emb = model.get_input_embeddings()
    vocab = int(getattr(emb, "num_embeddings", 0) or model.config.vocab_size)
    special = _special_ids(model.config)
    cand = [t for t in range(2, vocab) if t not in special] or list(range(vocab))
    ids = [cand[(7 * j + 3) % len(cand)] for j in range(BATCH * SEQ)]  # made where it runs, whatever the default
    return torch.tensor(ids, device=emb.weight.device if device is None else device).view(BATCH, SEQ)


def _way_out(model: nn.Module, adapter: Adapter | None):
    def advice(name: str, _prev: str | None) -> str:
        try:
            align = adapter.align(model) if adapter is not None else {}
        except Exception:  # noqa: BLE001 - advice only
            align = {}
        known = f" (declared for this family: {align})" if align else ""
        return ("Runtimes constrain widths (grouped/fused kernels want 16-byte aligned rows): pass round_to=16 "
                f"(or 64) so every kept width is a multiple of it{known}, or a smaller ratio, or leave that "
                "layer out (skip_first/skip_last or a per-layer plan); please report the family so the "
                "constraint can be declared in modelfold/hf/adapters.")

    return advice


def check_model_runs(model: nn.Module, adapter: Adapter | None = None, what: str = "the compressed model",
                     original: nn.Module | None = None) -> None:
    """One forward of ``model`` (its own class and forward) on :func:`tiny_ids`; a failure is a ResultError.

    ``adapter``: the family's (found from ``model`` when None; only for the advice). ``original``: the
    model it was compressed from; on a failure it runs too, and if it fails as well the message says
    so (the input itself cannot run in this runtime: fix it first).
    """
    ids = tiny_ids(model)
    adapter = adapter if adapter is not None else find_adapter(model)
    try:
        run_or_raise(model, lambda: model(input_ids=ids), what=what, way_out=_way_out(model, adapter))
    except ResultError as e:
        if original is None:
            raise
        try:
            with torch.no_grad():
                original(input_ids=tiny_ids(original))
        except Exception as e0:  # noqa: BLE001 - the input fails as well
            raise ResultError(f"{e} Note: the input model fails the same check ({type(e0).__name__}: {e0}): it "
                              "cannot run in this runtime either; fix it first (e.g. widths the kernels "
                              "accept).") from e
        raise


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _meta(v: Any) -> Any:
    """``v`` with every tensor replaced by an empty meta tensor of its shape and dtype (a template)."""
    if isinstance(v, torch.Tensor):
        return torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
    if isinstance(v, tuple | list):
        return type(v)(_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: _meta(x) for k, x in v.items()}
    return v


def _capture(model: nn.Module, adapter: Adapter) -> tuple[tuple, dict]:
    """(args, kwargs) layer 0 receives on a (2, 8) batch, as meta templates (shapes and dtypes).

    The forward runs under a FakeTensorMode up to layer 0 (embeddings, positions, masks): no weights
    are read or computed on, so it works alike on a loaded model and on a meta-device skeleton, and
    transformers skips its data-dependent checks (it treats fake tensors as tracing).
    """
    if model in _TEMPLATES:
        return _TEMPLATES[model]
    from torch._subclasses.fake_tensor import FakeTensorMode

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def run() -> None:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            dev = model.get_input_embeddings().weight.device  # meta on a skeleton
            model(input_ids=torch.zeros(BATCH, SEQ, dtype=torch.long, device=dev), **extra)

    call = module_call(adapter.layers(model)[0], run)
    if call is None:
        raise RuntimeError(f"{type(model).__name__}: the forward never reached layer 0")
    _TEMPLATES[model] = (_meta(call[0]), _meta(call[1]))
    return _TEMPLATES[model]


def _real(v: Any, name: str, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Any:
    """A real input for template ``v`` (same shapes) on ``device``: floats random in ``dtype`` (masks
    zero: attend everywhere), booleans True, integers positions 0..n-1 along the last dimension."""
    if isinstance(v, torch.Tensor):
        shape = tuple(v.shape)
        if v.is_floating_point():
            if "mask" in name:
                return torch.zeros(shape, dtype=dtype, device=device)
            return torch.randn(shape, generator=gen, device=gen.device).to(device=device, dtype=dtype)
        if v.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool, device=device)
        if not shape:
            return torch.zeros((), dtype=v.dtype, device=device)
        return torch.arange(shape[-1], dtype=v.dtype, device=device).expand(shape).contiguous()
    if isinstance(v, tuple | list):
        return type(v)(_real(x, name, device, dtype, gen) for x in v)
    if isinstance(v, dict):
        return {k: _real(x, f"{name}.{k}", device, dtype, gen) for k, x in v.items()}
    return v


def check_layer_runs(model: nn.Module, adapter: Adapter, i: int) -> None:
    """Run decoder/encoder layer ``i`` of ``model`` once on a tiny input (2 x 8 tokens); raise a
    :class:`~modelfold.errors.ResultError` naming the failing module if it cannot run.

    For the layer-by-layer paths: call it after layer ``i`` was folded (its weights real, in place in
    ``model``); the rest of ``model`` may be the meta-device skeleton. Layer ``i``'s inputs are built
    from what layer 0 receives (captured once per model, shapes only) as real tensors on layer ``i``'s
    device and dtype; nothing in ``model`` changes.
    """
    layer = adapter.layers(model)[i]
    w = next((p for p in layer.parameters() if p.is_floating_point()), None)
    if w is None or w.is_meta:
        raise ValueError(f"layer {i} has no materialised weights; call check_layer_runs after loading and "
                         "folding it, before it goes back to the meta device")
    args, kwargs = _capture(model, adapter)
    gen = torch.Generator().manual_seed(i)
    args = tuple(_real(a, "hidden_states" if j == 0 else f"arg{j}", w.device, w.dtype, gen)
                 for j, a in enumerate(args))
    kwargs = {k: _real(v, k, w.device, w.dtype, gen) for k, v in kwargs.items()}
    prefix = next((n for n, m in model.named_modules() if m is layer), f"layer {i}")
    run_or_raise(layer, lambda: layer(*args, **kwargs), what=f"layer {i} of the compressed model",
                 way_out=_way_out(model, adapter), prefix=prefix)


__all__ = ["check_layer_runs", "check_model_runs", "tiny_ids"]
