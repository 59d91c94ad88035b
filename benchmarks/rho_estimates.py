#!/usr/bin/env python
"""How well does each data-free ρ̄ of Fold-AR track the real correlation of merged channels?

    python benchmarks/rho_estimates.py                    # both shipped models, ratio 0.3

For every folded group of the shipped Fashion-MNIST checkpoints, with the k-means clusters
Fold-AR actually uses, the mean over clusters (of size > 1) of:
- ``pooled``: mean pairwise cosine of the producer rows with each conv's taps summed per
  input channel (Fold-AR's default),
- ``producer``: the same on the full producer rows, ``all``: on every weight slice,
- ``data``: the mean pairwise correlation of the members' conv outputs (pre-BatchNorm) on 256
  training images, i.e. the quantity the estimates stand in for.
Writes ``benchmarks/results/rho_estimates.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modelfold import zoo  # noqa: E402
from modelfold.datasets import fashion_mnist  # noqa: E402
from modelfold.traced.engine import compress  # noqa: E402
from modelfold.traced.groups import PRODUCER  # noqa: E402
from modelfold.traced.planners import kmeans_planner  # noqa: E402
from modelfold.traced.repair import make_repair  # noqa: E402
from modelfold.traced.repair.ar import cluster_rho, rho_blocks  # noqa: E402

EXAMPLE = torch.zeros(1, 1, 32, 32)


def conv_output_corr(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Channel correlation matrix of every conv's output on ``x`` (positions and images pooled)."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.transpose(0, 1).flatten(1)))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.corrcoef(a.double()) for n, a in acts.items()}


def cluster_mean(c: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean off-diagonal entry of ``c`` within each cluster."""
    size = torch.bincount(labels, minlength=k).double()
    m = torch.zeros(k, len(labels), dtype=torch.float64)
    m[labels, torch.arange(len(labels))] = 1
    return ((m @ c @ m.T).diagonal() - size) / (size * (size - 1)).clamp_min(1)


def study(name: str, ratio: float, seed: int) -> list[dict]:
    model = zoo.load_pretrained(name)
    corr = conv_output_corr(model, fashion_mnist("train")[0][:256])
    fixer = make_repair("ar", model=model, example_inputs=EXAMPLE)
    work = fixer.before(copy.deepcopy(model))
    rows: list[dict] = []
    base = kmeans_planner(seed)

    def plan(cg, feats, k):  # noqa: ANN001, ANN202 - a Planner
        p = base(cg, feats, k)
        size = torch.bincount(p.labels, minlength=k)
        multi = size > 1
        prods = [key.rsplit(":", 2)[0] for key in feats if key.split(":")[-2] == PRODUCER]
        prods = [m for m in prods if m in corr and corr[m].shape[0] == cg.size]
        if prods and bool(multi.any()):
            row = {"model": name, "ratio": ratio, "group": cg.root, "channels": cg.size, "producers": len(prods)}
            for mode in ("pooled", "producer", "all"):
                row[mode] = float(cluster_rho(rho_blocks(feats, mode, work), p.labels, k)[multi].mean())
            data = sum(cluster_mean(corr[m], p.labels, k) for m in prods) / len(prods)
            row["data"] = float(data[multi].mean())
            rows.append(row)
        return p

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(work, EXAMPLE, ratio, plan, seed=seed)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18_fmnist", "vgg11_bn_fmnist"])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rho_estimates.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for name in args.models for r in study(name, args.ratio, args.seed)]
    print(f"{'model':16s} {'group':24s} {'n':>4s} {'pooled':>7s} {'producer':>8s} {'all':>6s} {'data':>6s}")
    for r in rows:
        print(f"{r['model']:16s} {r['group']:24s} {r['channels']:4d} {r['pooled']:7.3f} {r['producer']:8.3f} "
              f"{r['all']:6.3f} {r['data']:6.3f}")
    for name in args.models:
        rs = [r for r in rows if r["model"] == name]
        err = {m: sum(abs(r[m] - r["data"]) for r in rs) / len(rs) for m in ("pooled", "producer", "all")}
        print(f"{name}: mean |estimate - data| " + ", ".join(f"{m} {v:.3f}" for m, v in err.items()))
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
