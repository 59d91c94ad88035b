#!/usr/bin/env python
"""How small and low-resolution can the self-calibration batch of a CNN be? MobileNetV2 (ImageNet).

    python benchmarks/cnn_self_batch.py                       # the default grid, resumable
    python benchmarks/cnn_self_batch.py --rows 32x50x64 16x25x64 --sparsity 0.2
    python benchmarks/cnn_self_batch.py --rows default        # compress() with its defaults

Each row is ``modelfold.compress(mobilenet_v2, torch.zeros(1, 3, 224, 224), sparsity=s)`` with no data
(``calibration="self"``: a DeepInversion batch of B images, T steps, R x R pixels) in a fresh
subprocess with an empty ``$MODELFOLD_CACHE`` (nothing cached: the synthesis is paid in every row).
Quality: top-1 agreement with the original model and mean KL(original || compressed) on the held-out
evaluation crops of ``benchmarks/mobilenet.py`` (never the calibration images). Cost per row: wall
seconds, CPU seconds of the process (getrusage user + sys), peak RSS (ru_maxrss), the 1-minute load
average sampled every 5 s (mean and max: the machine is shared), and the stage split reported by the
compression (synthesis, automatic budget, the rest: activation scores, compression, refit, checks).
Records: ``benchmarks/results/cnn_self_batch.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
GRID = ("32x50x64", "32x50x112", "16x50x64", "32x25x64", "64x50x64", "16x25x64", "32x100x64", "32x25x112",
        "64x25x112", "32x25x160")


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one(row: str, sparsity: float, seed: int, threads: int | None = None) -> dict:
    """Run one row in this process; return its record."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    import modelfold
    from benchmarks.mobilenet import compare, eval_images, logits
    from modelfold.assets import mobilenet_v2_imagenet

    loads: list[float] = [_load1()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            loads.append(_load1())

    threading.Thread(target=sample, daemon=True).start()
    model = mobilenet_v2_imagenet()
    x, _ = eval_images()
    ref = logits(model, x)
    size, *flags = row.split("+")
    opts = {f"budget_{f}": True for f in flags}  # e.g. "+refit": calibration_kwargs={"budget_refit": True}
    if size != "default":
        b, t, r = (int(v) for v in size.split("x"))
        opts.update(self_batch=b, self_iters=t, self_shape=(3, r, r))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out, rep = modelfold.compress(model, torch.zeros(1, 3, 224, 224), sparsity=sparsity, seed=seed,
                                  calibration_kwargs=opts or None, return_report=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    info = rep.repair_info
    synth, budget = info.get("self_seconds", 0.0), info.get("budget_seconds", 0.0)
    settings = info.get("self_settings", {})
    return {"model": "mobilenet_v2_imagenet", "method": "compress (calibrated selection + LS, automatic budget)",
            "calibration": "self", "row": row, "options": {k: v for k, v in opts.items() if k.startswith("budget_")},
            "self_batch": settings.get("batch"), "self_iters": settings.get("iters"),
            "self_shape": info.get("self_shape"), "self_source": info.get("self_source"), "seed": seed, "target_sparsity": sparsity,
            "param_sparsity": round(rep.param_sparsity, 5), **{k: round(v, 4) for k, v in compare(ref, logits(out, x)).items()},
            "eval_images": len(x), "total_seconds": round(wall, 1),
            "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
            "synthesis_seconds": round(synth, 1), "budget_seconds": round(budget, 1),
            "compress_seconds": round(wall - synth - budget, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "load1_mean": round(sum(loads) / len(loads), 2), "load1_max": max(loads),
            "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count()}


def table(records: list[dict]) -> str:
    lines = ["| self batch (images x steps x px) | removed | top-1 agreement | mean KL | wall s | CPU s | synthesis s "
             "| budget s | rest s | peak RSS GiB | load1 mean / max |", "|" + "---|" * 11]
    for r in records:
        shape = r.get("self_shape") or ["?"]
        note = (" (default)" if r["row"].startswith("default") else "") + "".join(f" +{k}" for k in r.get("options", {}))
        note += " (cached batch: no synthesis)" if r.get("self_source") == "cache" else ""
        lines.append(f"| {r['self_batch']} x {r['self_iters']} x {shape[-1]}{note} "
                     f"| {r['param_sparsity']:.1%} | {r['agreement']:.1%} | {r['kl']:.3f} | {r['total_seconds']:.0f} "
                     f"| {r['cpu_seconds']:.0f} | {r['synthesis_seconds']:.0f} | {r['budget_seconds']:.0f} "
                     f"| {r['compress_seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['load1_mean']:.1f} / {r['load1_max']:.1f} |")
    return "\n".join(lines)


def write(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(out)
    md = ["# MobileNetV2 (ImageNet): self-calibration batch size and resolution", "",
          "`benchmarks/cnn_self_batch.py`: `modelfold.compress(mobilenet_v2, torch.zeros(1, 3, 224, 224), "
          "sparsity=s)` without data, one fresh process per row, nothing cached unless the row says so. Agreement: top-1 agreement "
          "with the original on 140 held-out crops (benchmarks/mobilenet.py). Wall and CPU seconds "
          "(getrusage) on the shared 2-core machine: load1 is the 1-minute load average during the row.", ""]
    for s in sorted({r["target_sparsity"] for r in records}):
        md += [f"## sparsity={s}", "", table([r for r in records if r["target_sparsity"] == s]), ""]
    out.with_suffix(".md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--rows", nargs="*", default=list(GRID),
                    help="BxTxR (images x steps x pixels) or 'default', optionally +refit (budget_refit=True)")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "cnn_self_batch.json")
    ap.add_argument("--threads", type=int, help="torch threads per row (default: torch's)")
    ap.add_argument("--cache", type=Path, help="a kept $MODELFOLD_CACHE (default: a new empty one per row); a row "
                    "whose batch is found there records self_source 'cache' and no synthesis cost")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RECORD " + json.dumps(one(args.one, args.sparsity, args.seed, args.threads)), flush=True)
        return
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {(r["row"], r["target_sparsity"], r["seed"]) for r in records}
    for row in args.rows:
        if (row, args.sparsity, args.seed) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(args.cache) if args.cache else tmp
            env = {**os.environ, "MODELFOLD_CACHE": cache, "PYTHONPATH": str(REPO),
                   # the tracer's wall-clock bound (300 s per step) fires on a machine this loaded: off
                   "MODELFOLD_TRACE_TIMEOUT": os.environ.get("MODELFOLD_TRACE_TIMEOUT", "0")}
            proc = subprocess.run([sys.executable, __file__, "--one", row, "--sparsity", str(args.sparsity),
                                   "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else []),
                                  env=env, capture_output=True, text=True)
        got = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
        if proc.returncode or not got:
            print(f"{row}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        rec = json.loads(got[-1][len("RECORD "):])
        records = [r for r in (json.loads(args.out.read_text()) if args.out.is_file() else records)
                   if (r["row"], r["target_sparsity"], r["seed"]) != (row, args.sparsity, args.seed)] + [rec]
        write(records, args.out)
        print(f"{row}: removed {rec['param_sparsity']:.3f} agreement {rec['agreement']:.3f} kl {rec['kl']:.3f} "
              f"wall {rec['total_seconds']:.0f}s cpu {rec['cpu_seconds']:.0f}s load {rec['load1_mean']:.1f}", flush=True)


if __name__ == "__main__":
    main()
