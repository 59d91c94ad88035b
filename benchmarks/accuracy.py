#!/usr/bin/env python
"""Accuracy vs parameter sparsity of folding (naive/AR/DIR/R) and the data-free baselines.

    python benchmarks/accuracy.py                       # full sweep, both models
    python benchmarks/accuracy.py --models vgg11_bn_fmnist --ratios 0.3 0.5 --test-limit 2000

For each model x method x channel ratio: measured parameter sparsity, MACs, accuracy on the
full Fashion-MNIST test set, wall time of the compression. Fold-R sees 1024 training images,
Fold-DIR none (its DeepInversion batch is synthesized once per model and cached; the
synthesis time is recorded separately as ``synthesis_seconds``). ``tp-magnitude`` is
Torch-Pruning's own MagnitudePruner at the same number of channels removed per group (a
cross-check of SP-L2). Results are appended incrementally to ``--out`` (JSON), so an
interrupted run resumes; ``--plot-only`` rebuilds the PNG and markdown from the JSON.
Extra studies: ``--dir-budgets`` (Fold-DIR accuracy vs synthesis budget), ``--rho-study``
(which slices enter Fold-AR's ρ̄) and ``--calibrated`` (calibrated compression, self-calibrated and
with data, Neuron Merging; docs/calibration-cnn.md), added to ``accuracy.dir_budget.json`` /
``accuracy.rho.json`` / ``accuracy.calibrated.json`` (earlier records of other models, checkpoints
or settings are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import modelfold  # noqa: E402
from modelfold.cache import model_hash  # noqa: E402
from modelfold.report import count_macs, count_params  # noqa: E402
from modelfold.traced.baselines import ifm  # noqa: E402
from modelfold.traced.repair.dir import DIRSettings, synthetic_batch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
METHODS = ("fold-naive", "fold-ar", "fold-dir", "fold-r", "sp-l1", "sp-l2", "ifm", "tp-magnitude")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MODELS = ("resnet18_fmnist", "vgg11_bn_fmnist")
TP_DEFAULT_RATIOS = (0.3, 0.5)  # where TP with one pruner / its default importance is also evaluated (time)
EXAMPLE = torch.zeros(1, 1, 32, 32)


def load_model(name: str, source: str, resume_dir: Path) -> tuple[nn.Module, str]:
    """The zoo checkpoint (``final``) or the training script's latest resume state (``resume``)."""
    from modelfold import zoo

    if source == "final" or (source == "auto" and zoo.checkpoint_path(name).is_file()):
        return zoo.load_pretrained(name), "final"
    path = resume_dir / name.removesuffix("_fmnist") / "resume.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = zoo.PRETRAINED[name]()
    model.load_state_dict(state["model"])
    return model.eval(), f"resume epoch {state['epoch']} step {state['step']}"


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 1000):
            correct += int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
    return correct / len(x)


def tp_magnitude(model: nn.Module, ratio: float, p: int = 2, rows_only: bool = True,
                 per_group: bool = True) -> nn.Module:
    """Torch-Pruning MagnitudePruner removing n - round(n(1-ratio)) channels per group, like SP.

    rows_only: score channels by the norm of their producer rows only (what SP-L2 does);
    otherwise TP's default group importance (mean over all coupled slices, mean-normalized).
    per_group: one pruner per group, visited in TP's order, so that each group is scored on the
    weights left by the groups pruned before it (as SP-L2 does). A single pruner (``False``)
    scores every group on the original weights before cutting anything.
    """
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    imp = _RowNorm(p) if rows_only else tp.importance.MagnitudeImportance(p=p)

    def ratio_of(mod: nn.Module) -> float:
        n = mod.weight.shape[0]
        return max(0.0, 1 - (max(1, round(n * (1 - ratio))) + 0.5) / n)  # TP keeps int(n (1 - r)) = k

    with torch.enable_grad():
        if not per_group:
            ratios = {mod: ratio_of(mod) for mod in m.modules() if isinstance(mod, nn.Conv2d | nn.Linear)}
            tp.pruner.MagnitudePruner(m, EXAMPLE, importance=imp, pruning_ratio=ratio,
                                      pruning_ratio_dict=ratios, ignored_layers=[last]).step()
            return m.eval()
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=EXAMPLE)
        roots = [g[0].dep.target.module for g in dg.get_all_groups(
            ignored_layers=[last], root_module_types=[nn.Conv2d, nn.Linear])]
        for root in roots:
            tp.pruner.MagnitudePruner(m, EXAMPLE, importance=imp, pruning_ratio=0.0,
                                      pruning_ratio_dict={root: ratio_of(root)}, ignored_layers=[last]).step()
    return m.eval()


class _RowNorm:
    """TP importance: p-norm over the producer rows (weight and bias) of every out-channel slice."""

    def __init__(self, p: int) -> None:
        self.p = p

    def __call__(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        total = None
        for dep, idxs in group:
            mod = dep.target.module
            if dep.handler not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            parts = [mod.weight.detach()[idxs].flatten(1).abs().pow(self.p).sum(1)]
            if mod.bias is not None:
                parts.append(mod.bias.detach()[idxs].abs().pow(self.p))
            s = sum(parts)
            total = s if total is None else total + s
        return total.pow(1.0 / self.p)


def compress(method: str, model: nn.Module, ratio: float, ctx: dict) -> nn.Module:
    if method.startswith("fold-"):
        repair = {"fold-naive": "none", "fold-ar": "ar", "fold-dir": "dir", "fold-r": "data"}[method]
        kw: dict[str, Any] = {}
        if repair == "data":
            kw["data"] = ctx["fold_r_data"]
        if repair == "dir":
            kw.update(dir_batch=ctx["dir"].batch, dir_iters=ctx["dir"].iters, dir_lr=ctx["dir"].lr)
        if repair == "ar":
            kw["repair_kwargs"] = {"ar_rho": ctx.get("ar_rho", "pooled")}
        return modelfold.fold(model, EXAMPLE, ratio=ratio, repair=repair, seed=ctx["seed"], **kw)
    if method in ("sp-l1", "sp-l2"):
        return modelfold.prune(model, EXAMPLE, ratio=ratio, norm=int(method[-1]))
    if method == "ifm":
        return ifm(model, EXAMPLE, ratio=ratio)
    if method == "tp-magnitude":
        return tp_magnitude(model, ratio)
    raise ValueError(method)


def measure(name: str, method: str, model: nn.Module, ratio: float, ctx: dict) -> dict:
    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compress(method, model, ratio, ctx) if method != "original" else model
    seconds = time.perf_counter() - t0
    params = count_params(out)
    rec = {"model": name, "method": method, "ratio": ratio,
           "param_sparsity": 1 - params / ctx["params0"], "params": params,
           "macs": count_macs(out, EXAMPLE), "accuracy": evaluate(out, *ctx["test"]),
           "seconds": seconds, "checkpoint": ctx["checkpoint"], "test_size": len(ctx["test"][0])}
    if method == "fold-dir":
        rec.update(synthesis_seconds=ctx["synthesis_seconds"], dir_batch=ctx["dir"].batch,
                   dir_iters=ctx["dir"].iters)
    if method == "tp-magnitude" and ratio in TP_DEFAULT_RATIOS:
        rec["accuracy_tp_one_pruner"] = evaluate(tp_magnitude(model, ratio, per_group=False), *ctx["test"])
        rec["accuracy_tp_default_importance"] = evaluate(tp_magnitude(model, ratio, rows_only=False),
                                                         *ctx["test"])
    return rec


def save(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def save_study(rows: list[dict], path: Path, fields: tuple[str, ...]) -> None:
    """Write a study's rows, keeping earlier records (other models/checkpoints/settings) in ``path``."""
    key = lambda r: tuple(r.get(f) for f in fields)  # noqa: E731
    new = {key(r) for r in rows}
    old = json.loads(path.read_text()) if path.is_file() else []
    save([r for r in old if key(r) not in new] + rows, path)


STUDY_KEY = ("model", "checkpoint", "ratio", "test_size")


def context(name: str, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    from modelfold.datasets import fashion_mnist

    model, tag = load_model(name, args.source, Path(args.resume_dir))
    xt, yt = fashion_mnist("test")
    if args.test_limit:
        xt, yt = xt[:args.test_limit], yt[:args.test_limit]
    xtr, _ = fashion_mnist("train")
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))[:args.fold_r_samples]
    ctx = {"seed": args.seed, "test": (xt, yt), "fold_r_data": xtr[pick], "params0": count_params(model),
           "checkpoint": f"{tag} sha256:{model_hash(model)[:12]}",
           "dir": DIRSettings(batch=args.dir_batch, iters=args.dir_iters, seed=args.seed)}
    return model, ctx


def ensure_dir_batch(model: nn.Module, ctx: dict, progress: bool = True) -> None:
    t0 = time.perf_counter()
    synthetic_batch(model, tuple(EXAMPLE.shape[1:]), ctx["dir"], progress=progress)
    ctx["synthesis_seconds"] = time.perf_counter() - t0
    print(f"  DeepInversion batch {ctx['dir'].batch}x{ctx['dir'].iters}: {ctx['synthesis_seconds']:.0f}s "
          "(0 if cached)", flush=True)


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    for name in args.models:
        model, ctx = context(name, args)
        key = lambda r: (r["model"], r["method"], r["ratio"], r["checkpoint"])  # noqa: E731
        done = {key(r) for r in records}
        records = [r for r in records if r["model"] != name or r["checkpoint"] == ctx["checkpoint"]]
        todo = [("original", 0.0)] + [(m, r) for r in args.ratios for m in args.methods]
        for method, ratio in todo:
            if (name, method, ratio, ctx["checkpoint"]) in done:
                continue
            if method == "fold-dir" and "synthesis_seconds" not in ctx:
                ensure_dir_batch(model, ctx)
            rec = measure(name, method, model, ratio, ctx)
            records.append(rec)
            save(records, out)
            print(f"{name:16s} {method:12s} r={ratio:.2f} sparsity={rec['param_sparsity']:.3f} "
                  f"acc={rec['accuracy']:.4f} {rec['seconds']:.1f}s", flush=True)
    report(records, out)


def report(records: list[dict], out: Path) -> None:
    """Markdown table and accuracy-vs-sparsity plot from the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    lines = ["# Accuracy vs parameter sparsity (Fashion-MNIST test set)", "",
             "Generated by `benchmarks/accuracy.py`; accuracy in %, sparsity = fraction of parameters "
             "removed. Fold-R: 1024 training images; Fold-DIR: DeepInversion batch, no data.", ""]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rs = [r for r in records if r["model"] == name]
        orig = next((r for r in rs if r["method"] == "original"), None)
        ckpt = rs[0]["checkpoint"]
        dirs = {f"{r['dir_batch']}x{r['dir_iters']}" for r in rs if r["method"] == "fold-dir"}
        lines += [f"## {name}", "", f"checkpoint: {ckpt}; original accuracy "
                  f"{100 * orig['accuracy']:.2f}%" if orig else "",
                  f"test images: {rs[0]['test_size']}; DeepInversion budget (batch x steps): "
                  f"{', '.join(sorted(dirs)) or '-'}", "",
                  "| ratio | sparsity | " + " | ".join(methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for ratio in sorted({r["ratio"] for r in rs if r["method"] != "original"}):
            row = {r["method"]: r for r in rs if r["ratio"] == ratio}
            sp = next(iter(row.values()))["param_sparsity"]
            cells = [f"{100 * row[m]['accuracy']:.2f}" if m in row else "" for m in methods]
            lines.append(f"| {ratio:.2f} | {100 * sp:.1f}% | " + " | ".join(cells) + " |")
        lines.append("")
        for m in methods:
            pts = sorted((r["param_sparsity"], r["accuracy"]) for r in rs if r["method"] == m)
            ax.plot([100 * p for p, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, label=m,
                    ls="--" if m.startswith("tp") else "-")
        if orig:
            ax.axhline(100 * orig["accuracy"], color="k", lw=0.8, ls=":", label="original")
        ax.set(title=f"{name} ({ckpt.split(' sha')[0]})", xlabel="parameter sparsity (%)",
               ylabel="test accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def dir_budgets(args: argparse.Namespace) -> None:
    """Fold-DIR accuracy at one ratio for several DeepInversion budgets (batch x iterations)."""
    import dataclasses

    rows = []
    for name in args.models:
        model, ctx = context(name, args)
        for budget in args.budgets:
            b, it = (int(v) for v in budget.split("x"))
            ctx["dir"] = dataclasses.replace(ctx["dir"], batch=b, iters=it)
            ensure_dir_batch(model, ctx)
            for ratio in args.ratios:
                rec = measure(name, "fold-dir", model, ratio, ctx)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                save_study(rows, RESULTS / "accuracy.dir_budget.json", STUDY_KEY + ("dir_batch", "dir_iters"))


def rho_study(args: argparse.Namespace) -> None:
    """Fold-AR with ρ̄ from pooled producer rows, producer rows, all group slices, per-BN rows."""
    rows = []
    for name in args.models:
        model, ctx = context(name, args)
        for mode in args.rho_modes:
            ctx["ar_rho"] = mode
            for ratio in args.ratios:
                rec = measure(name, "fold-ar", model, ratio, ctx) | {"ar_rho": mode}
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                save_study(rows, RESULTS / "accuracy.rho.json", STUDY_KEY + ("ar_rho",))


CALIBRATED = ("sp-act+ls:self", "fold-act+ls:self", "fold+ls:self", "neuron-merging", "sp-act+ls:data",
              "fold-act+ls:data")


def calibrated(method: str, model: nn.Module, amount: dict, ctx: dict) -> tuple[nn.Module, Any]:
    """One calibrated row: ``base:source`` with source self (DeepInversion batch) or data (Fold-R's
    training images); ``amount`` is {"ratio": r} or {"sparsity": s} (automatic per-group budget)."""
    base, _, source = method.partition(":")
    if base == "neuron-merging":
        return modelfold.prune(model, EXAMPLE, merge="neuron", return_report=True, **amount)
    cal = ctx["fold_r_data"] if source == "data" else "self"
    opts: dict[str, Any] = {"grouping": "weight"} if base == "fold+ls" else {}
    if source == "self":
        opts.update(self_batch=ctx["dir"].batch, self_iters=ctx["dir"].iters)
    fn = modelfold.prune if base.startswith("sp-") else modelfold.fold
    return fn(model, EXAMPLE, calibration=cal, calibration_kwargs=opts, seed=ctx["seed"], return_report=True,
              **amount)


def calibrated_study(args: argparse.Namespace) -> None:
    """Calibrated rows (docs/calibration-cnn.md) at the given ratios (uniform) and sparsities (automatic
    per-group budgets), to ``accuracy.calibrated.json``; earlier records of other settings are kept."""
    import warnings

    out = RESULTS / "accuracy.calibrated.json"
    rows: list[dict] = []
    for name in args.models:
        model, ctx = context(name, args)
        ensure_dir_batch(model, ctx)
        todo = [(m, {"ratio": r}) for r in args.ratios for m in args.cal_methods]
        todo += [(m, {"sparsity": s}) for s in args.cal_sparsities for m in args.cal_methods
                 if m != "neuron-merging"]
        for method, amount in todo:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m, rep = calibrated(method, model, amount, ctx)
            source = method.partition(":")[2] or "none"
            rec = {"model": name, "method": method.partition(":")[0] + ("+auto" if "sparsity" in amount else ""),
                   "calibration": source, "ratio": amount.get("ratio"), "target_sparsity": amount.get("sparsity"),
                   "param_sparsity": rep.param_sparsity, "accuracy": evaluate(m, *ctx["test"]),
                   "seconds": time.perf_counter() - t0, "checkpoint": ctx["checkpoint"],
                   "test_size": len(ctx["test"][0]), "plan": rep.repair_info.get("plan"),
                   "calibration_samples": rep.repair_info.get("samples")}
            rows.append(rec)
            save_study(rows, out, ("model", "method", "calibration", "ratio", "target_sparsity", "checkpoint",
                                   "test_size"))
            print(f"{name:16s} {rec['method']:18s} {source:5s} sparsity={rec['param_sparsity']:.3f} "
                  f"acc={rec['accuracy']:.4f} {rec['seconds']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--source", choices=("auto", "final", "resume"), default="auto",
                   help="zoo checkpoint, or the training script's resume state (auto: final if present)")
    p.add_argument("--resume-dir", default=str(REPO / "cache" / "train"),
                   help="--out-dir of scripts/train_fmnist.py (for --source resume)")
    p.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (dev only)")
    p.add_argument("--fold-r-samples", type=int, default=1024)
    p.add_argument("--dir-batch", type=int, default=DIRSettings.batch)
    p.add_argument("--dir-iters", type=int, default=DIRSettings.iters)
    p.add_argument("--dir-budgets", action="store_true", help="run the Fold-DIR budget study instead")
    p.add_argument("--budgets", nargs="+", default=["64x50", "128x200", "256x400"])
    p.add_argument("--rho-study", action="store_true", help="run the Fold-AR ρ̄ study instead")
    p.add_argument("--rho-modes", nargs="+", default=["pooled", "producer", "all", "bn"])
    p.add_argument("--calibrated", action="store_true",
                   help="run the calibrated rows instead (accuracy.calibrated.json; docs/calibration-cnn.md)")
    p.add_argument("--cal-methods", nargs="+", default=list(CALIBRATED), choices=CALIBRATED)
    p.add_argument("--cal-sparsities", nargs="*", type=float, default=[0.7],
                   help="--calibrated: parameter sparsities for automatic per-group budgets")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plot_only:
        report(json.loads(Path(args.out).read_text()), Path(args.out))
    elif args.dir_budgets:
        dir_budgets(args)
    elif args.rho_study:
        rho_study(args)
    elif args.calibrated:
        calibrated_study(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
