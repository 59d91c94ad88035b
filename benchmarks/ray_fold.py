"""Layer-by-layer folding on Ray: 1 vs 2 local workers, and per-layer costs for planning big folds.

    .venv/bin/python benchmarks/ray_fold.py                  # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/ray_fold.py --layers 2 --no-layer-costs      # smoke run

Part 1 writes a Llama checkpoint of TinyLlama-1.1B's layer shape (hidden 2048, SwiGLU 5632, 32/4
heads, bf16, seeded random weights; ``--layers`` of them, small vocabulary) and folds its MLPs at
ratio 0.3, each run in a fresh process: ``local`` (one process, one torch thread), then
``executor="ray"`` on a local cluster of 1 and of 2 CPUs (one single-threaded task per layer). It
reports wall time (Ray start-up measured apart), the tasks' own seconds and CPU seconds, and checks
that every output equals the local one tensor by tensor.

Part 2 times the fold of one MLP (k-means + merge, one thread, no I/O) at the widths of
TinyLlama-1.1B, LLaMA-7B and LLaMA-2-70B (28672 neurons x 8192; ~8 GB peak), in a fresh process each.
A 405B layer (53248 x 16384) needs ~25 GB, more than this machine has; docs/distributed.md
extrapolates it from these points. Writes benchmarks/results/ray_fold.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "ray_fold"
LAYER_SHAPES = {"tinyllama-1.1b": (2048, 5632), "llama-7b": (4096, 11008), "llama-2-70b": (8192, 28672)}


def make_checkpoint(path: Path, layers: int) -> int:
    import transformers

    from modelfold.hf.checkpoint import ShardWriter, skeleton

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                   tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(path, 1 << 30)
    for name, p in skeleton(path).state_dict().items():
        t = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * 0.02
        w.add(name, t.to(torch.bfloat16))
    w.close()
    return w.total


def child_fold(mode: str, src: str, dst: str) -> dict:
    torch.set_num_threads(1)
    from modelfold.hf.checkpoint import fold_checkpoint

    rec: dict = {"ray_init_seconds": 0.0}
    if mode.startswith("ray-"):
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=int(mode.split("-")[1]), include_dashboard=False, logging_level="error",
                 log_to_driver=False)
        rec["ray_init_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    report = fold_checkpoint(src, dst, ratio=0.3, targets="mlp", progress=False,
                             executor="ray" if mode.startswith("ray-") else "local")
    rec.update(fold_seconds=time.perf_counter() - t, info=report.info)
    return rec


def child_layer(hidden: int, inter: int) -> dict:
    """Fold one random bf16 SwiGLU MLP of this width at ratio 0.3 (the step fold_checkpoint runs per layer)."""
    torch.set_num_threads(1)
    import torch.nn as nn

    from modelfold.hf.adapters.base import MLPSpec
    from modelfold.hf.mlp import fold_mlp

    g = torch.Generator().manual_seed(0)
    box = nn.Module()
    for name, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        lin = nn.Linear(shape[1], shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16), requires_grad=False)
        setattr(box, name, lin)
    spec = MLPSpec("mlp", [(box, "gate"), (box, "up")], (box, "down"))
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        fold_mlp(spec, round(inter * 0.7))
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def spawn(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}  # this checkout's modelfold, in Ray workers too
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200], "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def same(a: Path, b: Path) -> bool:
    from modelfold.hf.checkpoint import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    return set(ra.keys()) == set(rb.keys()) and all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--no-layer-costs", action="store_true", help="skip part 2")
    p.add_argument("--shapes", default=",".join(LAYER_SHAPES), help="part 2 widths, from " + ",".join(LAYER_SHAPES))
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        rec = child_fold(*rest) if kind == "fold" else child_layer(*map(int, rest))
        print(json.dumps(rec))
        return
    result: dict = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "layers": a.layers, "runs": [],
                    "layer_costs": {}}
    work = Path(tempfile.mkdtemp(prefix="ray_fold-"))
    try:
        size = make_checkpoint(work / "src", a.layers)
        print(f"checkpoint: {a.layers} TinyLlama-shaped layers, {size / 2**30:.2f} GiB", flush=True)
        for mode in ("local", "ray-1", "ray-2"):
            rec = {"mode": mode, **spawn(["--child", "fold", mode, str(work / "src"), str(work / mode)]),
                   "load_avg": os.getloadavg()[0]}
            if "error" not in rec and mode != "local":
                rec["equals_local"] = same(work / mode, work / "local")
            result["runs"].append(rec)
            print(f"  {mode}: {json.dumps(rec)}", flush=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if not a.no_layer_costs:
        for name in a.shapes.split(","):
            hidden, inter = LAYER_SHAPES[name]
            rec = {"hidden": hidden, "inter": inter, **spawn(["--child", "layer", str(hidden), str(inter)]),
                   "load_avg": os.getloadavg()[0]}
            result["layer_costs"][name] = rec
            print(f"  one {name} MLP: {json.dumps(rec)}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| run | Ray start (s) | fold wall (s) | task seconds: sum / max | task CPU s | == local | load avg |",
            "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        info = r.get("info", {})
        rows.append(f"| {r['mode']} | {r.get('ray_init_seconds', 0):.1f} | {r.get('fold_seconds', float('nan')):.1f} | "
                    + (f"{info.get('read_seconds', 0) + info.get('fold_seconds', 0) + info.get('write_seconds', 0):.1f}"
                       f" / {info.get('task_max_seconds', 0):.1f} | {info.get('task_cpu_seconds', 0):.1f}"
                       if r["mode"] != "local" else f"{info.get('fold_seconds', 0):.1f} (fold) / - | "
                                                    f"{info.get('cpu_seconds', 0):.1f}")
                    + f" | {r.get('equals_local', '-')} | {r['load_avg']:.1f} |")
    rows += ["", "| one MLP fold (1 thread) | neurons x hidden | seconds | CPU seconds | peak RSS (GiB) | load avg |",
             "|---|---|---|---|---|---|"]
    for name, r in result["layer_costs"].items():
        rows.append(f"| {name} | {r['inter']} x {r['hidden']} | {r.get('seconds', float('nan')):.1f} | "
                    f"{r.get('cpu_seconds', float('nan')):.1f} | {r.get('peak_rss', 0) / 2**30:.2f} | {r['load_avg']:.1f} |")
    Path(a.out + ".md").write_text(
        f"{a.layers} TinyLlama-shaped layers (2048 x 5632 SwiGLU, bf16), MLP fold at ratio 0.3; "
        f"{os.cpu_count()} CPUs shared with other jobs (1-minute load average at the start "
        f"{result['load_avg_start'][0]:.1f}).\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
