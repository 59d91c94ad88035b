"""Calibrated compression of traced CNNs: activation features and least-squares compensation.

Two roles in the engine (``engine.compress(..., calib=CNNCalibrator(...))``):

* before a group is planned, :meth:`CNNCalibrator.activation_features` measures the group's
  channels as its consumers see them on the calibration inputs (current, partly compressed
  network): per-position energies and a fixed subsample of values. Activation-aware planners
  (``modelfold.traced.planners``) read them.
* after every group is compressed, :meth:`CNNCalibrator.finish` refits, in execution order,
  every consumer (conv with groups=1 or linear) whose inputs were folded or pruned: ridge regression
  (``calib.compensate``) of the consumer's output on the compressed network's activations onto the
  reference consumer's output on the reference activations of the same inputs. Sequential: each
  consumer sees the already refitted layers before it. Output rows that a group folded or pruned
  are mapped with the recorded row map ``M`` (target ``M (W0 h0 + b0)``). The fitted constant goes to
  the consumer's bias, or into the running mean of the BatchNorm that reads it, so no parameter is
  added where a BN follows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calib.capture import StopForward, hooks, module_call, run_stopped, run_through
from ..calib.compensate import Gram, conv_patches, ridge_refit, with_ones
from ..checks import forward
from ..merge import representatives
from .engine import resolve
from .groups import CHANNEL, CONSUMER, PRODUCER, ChannelGroup

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def refittable(mod: nn.Module) -> bool:
    """Consumers the refit handles: Linear, and Conv2d with groups=1 (not transposed)."""
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and not mod.transposed


def capture_input(model: nn.Module, name: str, x: Any) -> torch.Tensor:
    """Input of submodule ``name`` on ``x`` (forward stopped right there)."""
    call = module_call(model.get_submodule(name), lambda: forward(model, x))
    if call is None:
        raise RuntimeError(f"module {name} did not run on the calibration inputs")
    return call[0][0].detach()


def rows(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Regression rows of ``mod``'s input: im2col patches (conv) or flattened features (linear)."""
    return conv_patches(h, mod) if isinstance(mod, nn.Conv2d) else h.reshape(-1, h.shape[-1])


def execution_order(model: nn.Module, x: Any) -> tuple[list[str], dict[str, int]]:
    """Module names in the order they first run on ``x``, and how often each ran."""
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if not list(m.children()):
            def hook(mod: nn.Module, inp: Any, name: str = name) -> None:
                if name not in calls:
                    order.append(name)
                calls[name] = calls.get(name, 0) + 1
            handles.append(m.register_forward_pre_hook(hook))
    try:
        forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def bn_after(model: nn.Module, x: Any) -> dict[str, str]:
    """conv/linear name -> name of the BatchNorm that reads exactly its output (run once each)."""
    from .repair.stats import conv_bn_pairs

    return dict(conv_bn_pairs(model, x))


class CNNCalibrator:
    """Activation statistics for planners and sequential least-squares refits of consumers.

    batches: calibration inputs; lam: ridge strength relative to the mean Gram diagonal;
    score_samples: inputs used for activation features (the first ones); sample_dim: values kept
    per channel and consumer for activation k-means; bn_reset: re-estimate the running statistics of
    BatchNorms in folded/pruned groups on the calibration inputs (in order, before the consumers
    after them are refitted); compensate: False turns the refit off (selection only); progress: a
    tqdm bar over the refitted consumers; cache_bytes:
    memory for the reference model's consumer inputs (computed once instead of once per consumer);
    prior: the ridge pulls towards the plainly compressed consumer instead of towards zero.
    """

    def __init__(self, batches: list[torch.Tensor], lam: float = 1e-3, score_samples: int = 128,
                 sample_dim: int = 256, seed: int = 0, bn_reset: bool = False, compensate: bool = True,
                 progress: bool = False, cache_bytes: int = 2 << 30,
                 prior: bool = True) -> None:
        self.batches = batches
        self.progress = progress
        self.lam = lam
        self.score_samples = score_samples
        self.sample_dim = sample_dim
        self.seed = seed
        self.bn_reset = bn_reset
        self.compensate = compensate
        self.cache_bytes = cache_bytes
        self.prior = prior
        self.reference: nn.Module | None = None
        self.row_maps: dict[str, torch.Tensor] = {}  # producer -> (rows now, rows in reference)
        self.consumers: set[str] = set()
        self.norms: set[str] = set()
        self.info: dict[str, Any] = {"refit": 0, "refit_skipped": []}

    # -- before the fold ---------------------------------------------------------------
    def start(self, model: nn.Module) -> None:
        """Snapshot the uncompressed model: the reference every refit aims at."""
        import copy

        self.reference = copy.deepcopy(model).eval()

    def _score_batches(self) -> list[torch.Tensor]:
        out, seen = [], 0
        for b in self.batches:
            if seen >= self.score_samples:
                break
            out.append(b[: self.score_samples - seen])
            seen += out[-1].shape[0]
        return out

    def activation_features(self, model: nn.Module, cg: ChannelGroup) -> dict[str, torch.Tensor]:
        """Per consumer X: ``X:activation:sq`` (n, m) energy of each channel position, and
        ``X:activation:samples`` (n, m*s) a fixed subsample of its values."""
        cons = [s for s in cg.slices if s.kind == CONSUMER
                and isinstance(model.get_submodule(s.module), nn.Linear | nn.Conv2d)]
        if not cons:
            return {}
        acc: dict[str, list] = {}
        gen = torch.Generator().manual_seed(self.seed)
        pairs: list = []
        pending: set[str] = set()
        for sl in cons:
            table = sl.table(cg.size)

            def hook(mod: nn.Module, inp: Any, sl=sl, table=table) -> None:
                if sl.module not in pending:
                    return  # a module that runs twice: its first call counts
                h = inp[0].detach()
                flat = h.movedim(1 if isinstance(mod, nn.Conv2d) else -1, 0).reshape(h.shape[1 if isinstance(
                    mod, nn.Conv2d) else -1], -1).double()
                vals = flat[table.reshape(-1)]  # (n*m, samples)
                sq = vals.pow(2).sum(1).view(table.shape)
                per = max(1, -(-self.sample_dim // (table.shape[1] * max(1, len(self.batches)))))
                take = min(vals.shape[1], per)
                idx = torch.randperm(vals.shape[1], generator=gen)[:take]
                s = vals[:, idx].view(table.shape[0], -1)
                if sl.module in acc:
                    acc[sl.module][0] += sq
                    acc[sl.module][1].append(s)
                else:
                    acc[sl.module] = [sq, [s]]
                pending.discard(sl.module)
                if not pending:
                    raise StopForward  # the rest of the network is not needed
            pairs.append((model.get_submodule(sl.module), hook))
        with hooks(pairs):
            for b in self._score_batches():
                pending.update(sl.module for sl in cons)
                run_stopped(lambda b=b: forward(model, b))
        feats: dict[str, torch.Tensor] = {}
        for name, (sq, samples) in acc.items():
            feats[f"{name}:activation:sq"] = sq.float()
            n = samples[0].shape[0]
            m = acc[name][0].shape[1]
            feats[f"{name}:activation:samples"] = torch.cat([s.view(n, m, -1) for s in samples], 2).view(n, -1).float()
        return feats

    def record(self, model: nn.Module, cg: ChannelGroup, keep: torch.Tensor, labels: torch.Tensor | None,
               k: int) -> None:
        """Note how the group maps rows of its producers (call before its channels are removed)."""
        n = cg.size
        for sl in cg.slices:
            mod = resolve(model, sl.module)
            if sl.kind == CONSUMER:
                self.consumers.add(sl.module)
            elif sl.kind == CHANNEL and isinstance(mod, BN_TYPES):
                self.norms.add(sl.module)
            if sl.kind != PRODUCER:
                continue
            table = sl.table(n)
            rows_now = mod.weight.shape[0]
            if table.shape[1] != 1 or getattr(mod, "transposed", False):
                self.info["refit_skipped"].append(sl.module)
                continue
            table = table[:, 0]
            m = torch.zeros(rows_now, rows_now, dtype=torch.float64)
            if labels is None:
                survivors = table[keep]
                m[survivors, survivors] = 1.0
            else:
                reps = representatives(labels, k)
                size = torch.bincount(labels, minlength=k).double()
                for c in range(k):
                    m[table[reps[c]], table[labels == c]] = 1.0 / size[c]
            other = torch.ones(rows_now, dtype=torch.bool)
            other[table] = False
            m[other, other] = 1.0
            alive = other.clone()
            alive[table[keep if labels is None else representatives(labels, k)]] = True
            m = m[alive]
            prev = self.row_maps.get(sl.module)
            self.row_maps[sl.module] = m if prev is None else m @ prev

    # -- after the fold ----------------------------------------------------------------
    def finish(self, model: nn.Module) -> None:
        """Refit every consumer of a compressed group, in execution order (sequential)."""
        if not self.compensate or self.reference is None:
            return
        order, calls = execution_order(model, self.batches[0][:1])
        bns = bn_after(model, self.batches[0][:1])
        self._reference_inputs([n for n in order if n in self.consumers and calls.get(n, 0) == 1
                                and refittable(model.get_submodule(n))])
        todo = [n for n in order if n in self.consumers or (n in self.norms and self.bn_reset)]
        for name in tqdm(todo, desc="least-squares refit", disable=not self.progress, leave=False):
            if name in self.norms and self.bn_reset:
                self._reset_bn(model, name)
            if name not in self.consumers:
                continue
            mod = model.get_submodule(name)
            if not refittable(mod) or calls.get(name, 0) != 1:
                self.info["refit_skipped"].append(name)
                continue
            self._refit(model, name, bns.get(name))
            self.info["refit"] += 1

    def _reset_bn(self, model: nn.Module, name: str) -> None:
        bn = model.get_submodule(name)
        if not bn.track_running_stats:
            return
        mom = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
        try:
            for b in self.batches:
                run_through(model.get_submodule(name), lambda b=b: forward(model, b))
        finally:
            bn.momentum = mom
            bn.eval()

    def _reference_inputs(self, names: list[str]) -> None:
        """Inputs of every consumer to refit in the reference model, in one pass per batch (kept in
        memory up to ``cache_bytes``; beyond that each refit recomputes its own)."""
        one: dict[str, int] = {}

        def size(mod: nn.Module, inp: Any, n: str) -> None:
            one.setdefault(n, inp[0][0].numel() * inp[0].element_size())

        hooks = [self.reference.get_submodule(n).register_forward_pre_hook(
            lambda m, i, n=n: size(m, i, n)) for n in names]
        try:
            forward(self.reference, self.batches[0][:1])
        finally:
            for h in hooks:
                h.remove()
        total = sum(one.values()) * sum(b.shape[0] for b in self.batches)
        self.cache: dict[str, list[torch.Tensor]] = {}
        if total > self.cache_bytes:
            return
        store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = [self.reference.get_submodule(n).register_forward_pre_hook(
            lambda m, i, n=n: store[n].append(i[0].detach())) for n in names]
        try:
            for b in self.batches:
                forward(self.reference, b)
        finally:
            for h in hooks:
                h.remove()
        self.cache = store

    def _refit(self, model: nn.Module, name: str, bn_name: str | None) -> None:
        ref = self.reference.get_submodule(name)
        mod = model.get_submodule(name)
        g = Gram()
        cached = getattr(self, "cache", {}).get(name)
        for i, b in enumerate(self.batches):
            h0 = rows(ref, cached[i] if cached else capture_input(self.reference, name, b))
            h1 = rows(mod, capture_input(model, name, b))
            g.add(with_ones(h1.double()), with_ones(h0.double()))
        w0 = ref.weight.detach().double().flatten(1)
        b0 = ref.bias.detach().double() if ref.bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
        rmap = self.row_maps.get(name)
        if rmap is not None:
            w0, b0 = rmap @ w0, rmap @ b0
        prior = mod.weight.detach().double().flatten(1) if self.prior else None
        w, bias = ridge_refit(w0, g.aa, g.ab, self.lam, bias=b0, fit_bias=True, prior=prior)
        with torch.no_grad():
            mod.weight.copy_(w.view_as(mod.weight).to(mod.weight.dtype))
            if mod.bias is not None:
                mod.bias.copy_(bias.to(mod.bias.dtype))
            elif bn_name is not None and model.get_submodule(bn_name).running_mean is not None:
                bn = model.get_submodule(bn_name)
                bn.running_mean.sub_(bias.to(bn.running_mean.dtype))
            else:
                mod.bias = nn.Parameter(bias.to(mod.weight.dtype))


def added_params(model: nn.Module, consumers: set[str], x: Any) -> int:
    """Parameters :meth:`CNNCalibrator.finish` adds to the compressed ``model`` when it refits
    ``consumers``: a new bias for every refitted consumer that has none and no BatchNorm (with running
    statistics) reading its output. ``sparsity=`` counts them, so the asked fraction stays exact."""
    if not any(getattr(model.get_submodule(n), "bias", 0) is None for n in consumers):
        return 0  # every consumer has its bias: nothing to add (and no forward needed)
    return sum(model.get_submodule(n).weight.shape[0] for n in bias_gaining(model, x) if n in consumers)


def bias_gaining(model: nn.Module, x: Any) -> list[str]:
    """Modules (in execution order) a least-squares refit gives a new bias: refittable, called once,
    without a bias and without a BatchNorm (with running statistics) reading their output."""
    order, calls = execution_order(model, x)
    bns = bn_after(model, x)
    out = []
    for name in order:
        mod = model.get_submodule(name)
        if not refittable(mod) or calls.get(name, 0) != 1 or mod.bias is not None:
            continue
        bn = bns.get(name)
        if bn is not None and model.get_submodule(bn).running_mean is not None:
            continue
        out.append(name)
    return out
