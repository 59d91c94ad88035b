"""Wall time of folding large torchvision CNNs (random weights) on this machine.

    .venv/bin/python benchmarks/fold_time.py [--models resnet50 vgg11_bn] [--ratio 0.5] [--threads 2]

Prints a table and writes benchmarks/results/fold_time.json. Times include tracing, the
coupling check of every group, k-means (3 restarts) and the surgery.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torchvision

import modelfold

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet50", "vgg11_bn", "mobilenet_v2"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':<14} {'params':>9} {'after':>9} {'MACs':>9} {'after':>9} {'fold s':>7} {'verify off s':>12}")
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        t = time.perf_counter()
        _, rep = modelfold.fold(model, x, ratio=args.ratio, return_report=True)
        secs = time.perf_counter() - t
        t = time.perf_counter()
        modelfold.fold(model, x, ratio=args.ratio, verify=False)
        secs_noverify = time.perf_counter() - t
        row = {"model": name, "ratio": args.ratio, "threads": args.threads, "seconds": round(secs, 2),
               "seconds_verify_off": round(secs_noverify, 2), "params_before": rep.params_before,
               "params_after": rep.params_after, "macs_before": rep.macs_before, "macs_after": rep.macs_after,
               "cpu": platform.processor() or platform.machine()}
        rows.append(row)
        print(f"{name:<14} {rep.params_before / 1e6:>8.2f}M {rep.params_after / 1e6:>8.2f}M "
              f"{rep.macs_before / 1e9:>8.2f}G {rep.macs_after / 1e9:>8.2f}G {secs:>7.1f} {secs_noverify:>12.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fold_time.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
