"""Channel-group discovery on top of Torch-Pruning's dependency graph.

Torch-Pruning traces the model through autograd and, for every conv/linear output,
yields the group of all coupled (module, axis, indices) slices, including residual adds,
concatenations (with offsets) and flatten-into-linear expansions. This module turns
such a group into a :class:`ChannelGroup` of typed slices, and refuses (marks
non-foldable) every group that touches a layer or op whose folding rule we do not know.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from ..bounds import BoundExceeded, bounded
from ..errors import UnsupportedModelError
from ..merge import position_table

PRODUCER, CONSUMER, CHANNEL = "producer", "consumer", "channel"

# Autograd ops that act on each channel independently (or only move data), so channel
# identity survives them. Anything else found in a group makes that group non-foldable.
SAFE_OPS = {
    "Relu", "Relu6", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Sigmoid", "Tanh",
    "Hardswish", "Hardsigmoid", "Mish", "Softplus", "Add", "Sub", "Mul", "Div", "Neg",
    "MaxPool2DWithIndices", "MaxPool1DWithIndices", "MaxPool3DWithIndices", "MaxPool2D",
    "AvgPool2D", "AvgPool1D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D",
    "AdaptiveAvgPool1D", "Mean", "Clone", "Dropout", "NativeDropout", "Permute", "T",
    "Addmm", "Mm", "Bmm", "Squeeze", "Unsqueeze", "Flatten", "Contiguous", "ToCopy",
    "Clamp", "ClampMin", "Abs", "Pow", "Exp", "Expand", "Upsample",
}
_REDUCTIONS = {"Mean", "Sum", "Amax", "Max", "Min", "Amin", "Std", "Var", "Norm"}


def _op_name(grad_fn: object) -> str:
    name = grad_fn if isinstance(grad_fn, str) else grad_fn.name()
    return name.replace("Backward", "").rstrip("0123456789")


def _reduces_channels(grad_fn: object) -> bool:
    """True if a reduction's dims include axis 1 (the channel axis of NCHW / NC tensors)."""
    dims = getattr(grad_fn, "_saved_dim", None)
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dims is None:
        return True  # full reduction
    ndim = len(sizes) if sizes is not None else 4
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d - 2**64 if d >= 2**63 else d for d in dims]  # autograd stores negative dims as uint64
    return any(d % ndim == 1 for d in dims) if ndim > 1 else True


@dataclass(frozen=True)
class Slice:
    """One (module, tensors, axis, indices) slice of a channel group."""

    module: str
    kind: str  # producer | consumer | channel
    tensors: tuple[tuple[str, int], ...]  # (attribute name, axis); "" = the Parameter itself
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]
    exact: bool = True  # False where merging is an approximation (LayerNorm statistics)

    def table(self, n: int) -> torch.Tensor:
        return position_table(list(self.idxs), list(self.root_idxs), n)


@dataclass
class ChannelGroup:
    """All slices indexing one channel space of ``size`` channels."""

    root: str
    size: int
    slices: list[Slice] = field(default_factory=list)
    foldable: bool = True
    reason: str = ""

    @property
    def members(self) -> list[str]:
        return [f"{s.module}:{s.kind}" for s in self.slices]

    def __str__(self) -> str:
        state = "foldable" if self.foldable else f"kept ({self.reason})"
        body = ", ".join(self.members)
        return f"{self.root} [{self.size} ch, {state}]: {body}"


def _classify(item: object, dg: tp.DependencyGraph) -> tuple[str, tuple[tuple[str, int], ...], bool] | str:
    """Return (kind, tensors, exact) for a group item, "" to skip it, or a refusal reason."""
    dep = item.dep
    node = dep.target
    mod = node.module
    out = dg.is_out_channel_pruning_fn(dep.handler)
    t = node.type
    T = ops.OPTYPE
    if t in (T.CONV, T.DEPTHWISE_CONV):
        tr = 1 if mod.transposed else 0
        if mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1:
            return CHANNEL, (("weight", 0), ("bias", 0)), True
        if mod.groups > 1:
            return f"grouped convolution {node.name} (groups={mod.groups})"
        if out:
            return PRODUCER, (("weight", tr), ("bias", 0)), True
        return CONSUMER, (("weight", 1 - tr),), True
    if t == T.LINEAR:
        return (PRODUCER, (("weight", 0), ("bias", 0)), True) if out else (CONSUMER, (("weight", 1),), True)
    if t == T.BN:
        return CHANNEL, (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)), True
    if t == T.LN:
        if len(mod.normalized_shape) != 1:
            return f"LayerNorm {node.name} over several axes"
        return CHANNEL, (("weight", 0), ("bias", 0)), False
    if t == T.PRELU:
        return (CHANNEL, (("weight", 0),), True) if mod.num_parameters > 1 else ""
    if t == T.PARAMETER:
        dim = dg.module2node[mod].pruning_dim
        if sum(s > 1 for s in mod.shape) != 1:
            return f"parameter {node.name} of shape {tuple(mod.shape)} (not a per-channel vector)"
        return CHANNEL, (("", dim),), True
    if t == T.ELEMENTWISE:
        grad_fn = node.grad_fn if node.grad_fn is not None else mod._grad_fn
        name = _op_name(grad_fn)
        if name in _REDUCTIONS and (isinstance(grad_fn, str) or _reduces_channels(grad_fn)):
            return f"reduction over channels ({name}) at {node.name}"
        if name not in SAFE_OPS:
            return f"unknown op {name} at {node.name}"
        return ""
    if t in (T.CONCAT, T.SPLIT, T.RESHAPE):
        return ""
    return f"unsupported layer {type(mod).__name__} at {node.name}"


def describe(group: object, dg: tp.DependencyGraph, names: dict) -> ChannelGroup:
    """Convert one Torch-Pruning group into a typed :class:`ChannelGroup`."""
    root_mod = group[0].dep.target.module
    root = names.get(root_mod, group[0].dep.target.name)
    n = len(group[0].idxs)
    cg = ChannelGroup(root=root, size=n)
    seen: set[tuple[int, str]] = set()
    for item in group:
        res = _classify(item, dg)
        if isinstance(res, str):
            if res:
                cg.foldable, cg.reason = False, res
                return cg
            continue
        kind, tensors, exact = res
        mod = item.dep.target.module
        key = (id(mod), kind)
        if key in seen:  # e.g. a depthwise conv appears as both input and output item
            continue
        seen.add(key)
        name = names.get(mod, item.dep.target.name)
        sl = Slice(name, kind, tensors, tuple(int(i) for i in item.idxs),
                   tuple(int(i) for i in item.root_idxs), exact)
        try:
            sl.table(n)
        except ValueError as e:
            cg.foldable, cg.reason = False, f"irregular slice at {name}: {e}"
            return cg
        cg.slices.append(sl)
    if not any(s.kind == PRODUCER for s in cg.slices):
        cg.foldable, cg.reason = False, "no producer (channels come from the network input)"
    return cg


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Torch-Pruning traces through autograd: undo no_grad/inference_mode for the trace."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


BOUND_HINT = ("The dependency tracer cannot follow this model (typically window attention or a channel "
              "shuffle); fold a sub-module that avoids it, or pass its modules with ignore=... "
              "Limits: MODELFOLD_TRACE_TIMEOUT (seconds) and MODELFOLD_TRACE_MEMORY_GB (0 disables)")


def build_graph(model: nn.Module, example_inputs: object) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning dependency graph, with modelfold errors."""
    with grad_enabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with bounded("tracing the model's channel dependencies"):
                return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        except BoundExceeded as e:
            raise UnsupportedModelError(f"{e}. {BOUND_HINT}") from None
        except Exception as e:  # noqa: BLE001 - any failure inside the tracer
            raise UnsupportedModelError(
                f"could not trace the model's channel dependencies ({type(e).__name__}: {e}). "
                "The dependency tracer does not understand an op in this model; pass the "
                "offending modules with ignore=... or fold a sub-module instead."
            ) from e


def output_layers(dg: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/linear layers whose output channels reach the model output (never folded)."""
    found: list[nn.Module] = []
    stack = [n for n in dg.module2node.values() if not n.outputs]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.type in (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR):
            found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def module_names(dg: tp.DependencyGraph) -> dict:
    """Qualified names of the graph's modules and unwrapped parameters."""
    names = dict(dg._module2name)
    names.update(dg._param_to_name)
    return names


def iter_groups(
    dg: tp.DependencyGraph, ignore: Sequence[nn.Module] = ()
) -> Iterator[tuple[object, ChannelGroup]]:
    """Yield (torch-pruning group, ChannelGroup) for every conv/linear output space.

    Generated lazily, so a group pruned by the caller updates the ones that follow.
    """
    names = module_names(dg)
    ignored = list(ignore) + output_layers(dg)
    roots = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]
    with grad_enabled(), warnings.catch_warnings():
        # Torch-Pruning warns, then keeps expanding index maps until memory runs out, when it cannot
        # infer channel counts through reshapes (e.g. Swin's window partition): stop at the warning.
        warnings.filterwarnings("error", message="Maximum recursive depth")
        try:
            groups = dg.get_all_groups(ignored_layers=ignored, root_module_types=roots)
            while True:
                with bounded("grouping the model's channels"):  # bounds the tracer, not the caller's work
                    group = next(groups, None)
                    desc = None if group is None else describe(group, dg, names)
                if group is None:
                    return
                yield group, desc
        except UnsupportedModelError:
            raise
        except BoundExceeded as e:
            raise UnsupportedModelError(f"{e}. {BOUND_HINT}") from None
        except Exception as e:  # noqa: BLE001 - failures inside the dependency tracer
            raise UnsupportedModelError(
                f"the dependency tracer failed while grouping channels ({type(e).__name__}: {e}). "
                "Usually a reshape/permute the tracer cannot follow (window attention, channel "
                "shuffle); fold a sub-module that avoids it, or pass its modules with ignore=...") from e
