"""Does ``sparsity=`` remove what it says? Asked vs removed fraction of parameters on every path.

    .venv/bin/python benchmarks/sparsity_exact.py --label after            # this checkout
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/sparsity_exact.py --label before
    .venv/bin/python benchmarks/sparsity_exact.py --table                  # markdown of both

Random weights (the achieved sparsity is a property of the architecture and the planner, not of
trained values; the calibrated paths' plans do depend on the weights): the MNIST CNN of
benchmarks/mnist_nobn.py (no BatchNorm, 421,642 parameters), tests/nets.py VGGish(8) with random
BatchNorm statistics, torchvision MobileNetV2 at 64x64 inputs (``--mobilenet``), tiny Llama and
Mixtral configs (tests/hf/hf_models.py). Calibration: 64 (CNNs: 32 for MobileNetV2) random inputs,
or "self" with a small DeepInversion batch. A refusal (InvalidRatioError) is recorded with the
nearest reachable value it names. Records: benchmarks/results/sparsity_exact.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "hf"), str(REPO / "benchmarks")]
from mnist_nobn import SmallCNN  # noqa: E402  (the network of benchmarks/mnist_nobn.py)

OUT = REPO / "benchmarks" / "results" / "sparsity_exact.json"
NEAREST = re.compile(r"nearest reachable sparsity is (\d+\.\d+)")


def cases(mobilenet: bool):
    from nets import VGGish, randomize_bn

    import modelfold

    self_kw = {"calibration_kwargs": {"self_batch": 16, "self_iters": 5}}
    for name, make, shape in (("mnist-cnn (no BN)", SmallCNN, (1, 28, 28)),
                              ("VGGish(8) (BN)", lambda: randomize_bn(VGGish(8)), (3, 16, 16))):
        torch.manual_seed(0)
        model, x, cal = make().eval(), torch.randn(1, *shape), torch.randn(64, *shape)
        methods = [("fold", modelfold.fold, {}), ("prune", modelfold.prune, {}),
                   ("prune round_to=8", modelfold.prune, {"round_to": 8}),
                   ("compress, data, auto budget", modelfold.compress, {"calibration": cal}),
                   ("compress, data, auto budget, round_to=8", modelfold.compress, {"calibration": cal, "round_to": 8}),
                   ("compress, data, uniform", modelfold.compress,
                    {"calibration": cal, "calibration_kwargs": {"budget": "uniform"}}),
                   ("compress, self, auto budget", modelfold.compress, self_kw)]
        for s in (0.25, 0.5, 0.75):
            for label, fn, kw in methods:
                yield name, label, s, lambda fn=fn, kw=kw, s=s, model=model, x=x: fn(model, x, sparsity=s,
                                                                                       return_report=True, **kw)
    if mobilenet:
        import torchvision

        torch.manual_seed(0)
        model, x, cal = torchvision.models.mobilenet_v2(weights=None).eval(), torch.randn(1, 3, 64, 64), \
            torch.randn(32, 3, 64, 64)
        for s in (0.1, 0.2, 0.3):
            for label, fn, kw in (("prune", modelfold.prune, {}),
                                  ("compress, data, auto budget", modelfold.compress, {"calibration": cal})):
                yield "MobileNetV2 64x64", label, s, lambda fn=fn, kw=kw, s=s: fn(model, x, sparsity=s,
                                                                                   return_report=True, **kw)
    from hf_models import make_model

    ids = torch.randint(2, 58, (4, 16), generator=torch.Generator().manual_seed(0))
    for fam in ("llama", "mixtral"):
        model = make_model(fam, inter=64)
        methods = [("fold", modelfold.fold, {}), ("prune", modelfold.prune, {}),
                   ("fold targets=all", modelfold.fold, {"targets": "all"}),
                   ("fold round_to=8", modelfold.fold, {"round_to": 8})]
        if fam == "llama":
            methods += [("compress, data, auto budget", modelfold.compress, {"calibration": ids}),
                        ("compress, data, auto budget, targets=all", modelfold.compress,
                         {"calibration": ids, "targets": "all"})]
        for s in (0.1, 0.2, 0.3):
            for label, fn, kw in methods:
                yield f"tiny {fam} (inter 64)", label, s, lambda fn=fn, kw=kw, s=s, model=model: fn(
                    model, sparsity=s, return_report=True, **kw)


def run(label: str, mobilenet: bool) -> None:
    import modelfold

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    records = json.loads(OUT.read_text()) if OUT.is_file() else []
    records = [r for r in records if r["label"] != label or (r["model"].startswith("MobileNet") and not mobilenet)]
    for model, method, s, call in cases(mobilenet):
        t0 = time.process_time()
        rec = {"label": label, "model": model, "method": method, "asked": s, "modelfold": modelfold.__file__}
        try:
            rec["removed"] = round(call()[1].param_sparsity, 4)
        except Exception as e:  # noqa: BLE001 - recorded
            m = NEAREST.search(str(e))
            rec["error"] = type(e).__name__ + (f" (nearest {m.group(1)})" if m else f": {str(e)[:120]}")
        rec["cpu_seconds"] = round(time.process_time() - t0, 1)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        OUT.write_text(json.dumps(records, indent=1))


def table() -> str:
    records = json.loads(OUT.read_text())
    keys = list(dict.fromkeys((r["model"], r["method"], r["asked"]) for r in records))
    by = {(r["label"], r["model"], r["method"], r["asked"]): r for r in records}
    lines = ["| model | method | asked | removed before | removed after |", "|---|---|---|---|---|"]
    for k in keys:
        cells = []
        for lab in ("before", "after"):
            r = by.get((lab, *k))
            cells.append("–" if r is None else (f"{r['removed']:.4f}" if "removed" in r else r["error"]))
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="after")
    ap.add_argument("--mobilenet", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table())
    else:
        run(args.label, args.mobilenet)
