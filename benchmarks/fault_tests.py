"""The fault tests, again and again, beside a CPU-burning process: are they deterministic under load?

    .venv/bin/python benchmarks/fault_tests.py               # 20 runs, ~1-2 min each under load
    .venv/bin/python benchmarks/fault_tests.py --runs 2      # smoke run

Each run is a fresh ``pytest`` process over the tests that kill things: ``tests/hf/checkpoint/test_resume.py``
(the driver SIGKILLed mid-run, fold / prune / calibrated compress, then resumed) and
``tests/hf/checkpoint/test_on_ray.py`` (a Ray worker SIGKILLed, a Ray driver SIGKILLed mid-fold and resumed).
Beside them, ``--burners`` processes spin on the CPU the whole time (2 by default: as many as this
machine has cores). A run passes only if pytest exits 0; nothing is retried. Records the load average,
each run's outcome and time in benchmarks/results/fault_tests.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/hf/checkpoint/test_resume.py", "tests/hf/checkpoint/test_on_ray.py"]


def burn() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def write(args: argparse.Namespace, runs: list[dict]) -> None:
    """The record so far (written after every run: a stopped benchmark keeps what it measured)."""
    passed = sum(r["passed"] for r in runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {"tests": TESTS, "burners": args.burners, "cores": os.cpu_count(), "commit": commit, "runs": runs,
              "passed": passed, "total": len(runs), "planned": args.runs}
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Fault tests under load: {passed} of {len(runs)} runs passed ({args.runs} planned)", "",
             f"`{' '.join(TESTS)}` at commit {commit}, in a fresh pytest process per run, beside {args.burners} "
             f"CPU-burning process(es) on a {os.cpu_count()}-core machine; other work shared the machine too (see "
             "the load column). Nothing retried. Written by `benchmarks/fault_tests.py`.", "",
             "| run | result | seconds | load (1 min) | pytest summary |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {'pass' if r['passed'] else 'FAIL'} | {r['seconds']} | {r['load1']} | {r['summary']} |"
              for r in runs]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fault_tests"))
    args = ap.parse_args()
    burners = [mp.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    runs: list[dict] = []
    try:
        for k in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"],
                                  cwd=ROOT, capture_output=True, text=True)
            tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            runs.append({"run": k + 1, "passed": proc.returncode == 0, "exit": proc.returncode,
                         "seconds": round(time.perf_counter() - t0, 1), "load1": round(os.getloadavg()[0], 2),
                         "summary": tail, **({} if proc.returncode == 0 else {"output": proc.stdout[-4000:]
                                                                              + proc.stderr[-4000:]})})
            write(args, runs)
            print(f"run {k + 1}/{args.runs}: {'pass' if proc.returncode == 0 else 'FAIL'} "
                  f"{runs[-1]['seconds']} s, load {runs[-1]['load1']}: {tail}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    print(f"{sum(r['passed'] for r in runs)}/{len(runs)} passed")
if __name__ == "__main__":
    main()
