"""Fold every torchvision classification model: identity at ratio 0, smaller model at 0.3.

Each model runs in its own subprocess with a time limit; the table says which models fold,
which are refused (and why) and how long folding takes. Random weights suffice: the
question is structural (is every group found, coupled and resized correctly?).

    .venv/bin/python benchmarks/zoo.py [--models resnet18 densenet121 ...] [--timeout 300]

Writes benchmarks/results/zoo.json and zoo.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, time, warnings
import torch, torchvision, modelfold
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
m = torchvision.models.get_model(name, weights=None).eval()
x = torch.randn(1, 3, size, size)
rec = {"model": name, "input": size}
try:
    with torch.no_grad():
        y0 = m(x)
    t = time.perf_counter()
    f0, r0 = modelfold.fold(m, x, ratio=0.0, return_report=True)
    with torch.no_grad():
        rec["identity_max_abs_diff"] = float((f0(x) - y0).abs().max())
    t = time.perf_counter()
    f, r = modelfold.fold(m, x, ratio=0.3, return_report=True)
    rec["seconds_fold_0.3"] = round(time.perf_counter() - t, 2)
    with torch.no_grad():
        y = f(x)
    rec.update(status="folds" if r.params_after < r.params_before else "refused",
               same_output_shape=tuple(y.shape) == tuple(y0.shape), params_before=r.params_before,
               params_after=r.params_after, groups=len(r.groups), groups_kept=len(r.kept_groups),
               kept_reasons=sorted({g.reason for g in r.kept_groups}))
except modelfold.errors.ModelFoldError as e:
    rec.update(status="refused", error=f"{type(e).__name__}: {e}"[:300])
except Exception as e:
    rec.update(status="crash", error=f"{type(e).__name__}: {e}"[:300])
print("RESULT " + json.dumps(rec))
"""

SIZES = {"inception_v3": 299}
FIXED_224 = ("vit", "swin", "maxvit")


def run_one(name: str, timeout: float) -> dict:
    size = SIZES.get(name, 224 if name.startswith(FIXED_224) else 64)
    t = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, name, str(size)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "error": f"no answer within {timeout:.0f}s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[7:])
            rec["seconds_total"] = round(time.perf_counter() - t, 1)
            return rec
    return {"model": name, "status": "crash", "error": (out.stderr or out.stdout)[-300:]}


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--max-params", type=float, default=150e6, help="skip larger models (memory/time)")
    args = ap.parse_args()
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "zoo.json"
    done = {r["model"]: r for r in json.loads(out_json.read_text())} if out_json.exists() else {}
    for name in names:
        n_params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        if n_params > args.max_params:
            rec = {"model": name, "status": "skipped", "error": f"{n_params / 1e6:.0f}M params > --max-params"}
        else:
            rec = run_one(name, args.timeout)
        rec["params"] = n_params
        done[name] = rec
        print(f"{name:<22} {rec['status']:<8} {rec.get('seconds_fold_0.3', '')!s:>6}s "
              f"kept {rec.get('groups_kept', '-')}/{rec.get('groups', '-')} "
              f"id-err {rec.get('identity_max_abs_diff', '-')} {rec.get('error', '')[:120]}", flush=True)
        out_json.write_text(json.dumps(sorted(done.values(), key=lambda r: r["model"]), indent=1))
    write_md(sorted(done.values(), key=lambda r: r["model"]))


def write_md(rows: list[dict]) -> None:
    lines = ["| model | params | status | fold 0.3 (s) | params after | groups kept/total | identity err | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = f"{r['params_after'] / 1e6:.2f}M" if "params_after" in r else ""
        note = r.get("error", "") or "; ".join(r.get("kept_reasons", []))[:160]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['status']} | {r.get('seconds_fold_0.3', '')} "
                     f"| {after} | {r.get('groups_kept', '')}/{r.get('groups', '')} "
                     f"| {r.get('identity_max_abs_diff', '')} | {note} |")
    (RESULTS / "zoo.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
