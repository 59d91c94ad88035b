"""``modelfold eval``: perplexity (causal LMs), embedding cosine (encoders), top-1/agreement (image models)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import CheckpointError, ModelFoldError
from ..report import count_params

HELP = "measure a model: perplexity, embedding cosine or image top-1, optionally next to its original"
EPILOG = """\
What is measured depends on MODEL:
  causal LM (HF dir / .gguf)  perplexity on --text FILE or the shipped Wikipedia text (--ctx, --windows)
  encoder (HF dir)            cosine of mean-pooled sentence embeddings to --compare ORIGINAL
  image model (CNN spec)      top-1 on labelled images, agreement and KL to --compare ORIGINAL
                              (--images DIR | imagenet | fmnist)
examples:
  modelfold eval folded_dir --compare SmolLM2-135M-Instruct.Q4_1.gguf
  modelfold eval folded_minilm --compare path/to/all-MiniLM-L6-v2
  modelfold eval folded.pt --compare mobilenet_v2 --compare-weights mobilenet_v2.pth --images imagenet
  modelfold eval small.gguf --runtime llama.cpp --compare SmolLM2-135M-Instruct.Q4_1.gguf   (through llama.cpp)
"""


def add_parser(sub: Any) -> None:
    """Register the ``eval`` subcommand on the ``modelfold`` parser."""
    sp = sub.add_parser("eval", help=HELP, description=HELP, epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("model", metavar="MODEL", help="model to measure (see 'modelfold --help')")
    sp.add_argument("--compare", metavar="ORIGINAL", help="second model, measured the same way, shown side by side")
    sp.add_argument("--weights", help="state_dict file for MODEL (CNNs)")
    sp.add_argument("--compare-weights", metavar="FILE", help="state_dict file for ORIGINAL (CNNs)")
    sp.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use (default: MODEL's, else ORIGINAL's)")
    sp.add_argument("--text", metavar="FILE", help="causal LMs: UTF-8 text file (default: the shipped Wikipedia "
                    "articles)")
    sp.add_argument("--ctx", type=int, default=512, help="causal LMs: tokens per window (default 512)")
    sp.add_argument("--windows", type=int, default=12, help="causal LMs: windows, evenly spread (default 12)")
    sp.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                    help="causal LMs: start windows with BOS (auto: when the family expects one)")
    sp.add_argument("--sentences", metavar="FILE", help="encoders: one sentence per line (default: 50 "
                    "Wikipedia sentences)")
    sp.add_argument("--images", default="imagenet", help="image models: a folder, imagenet (foolbox + scikit-"
                    "image samples) or fmnist (Fashion-MNIST test set); default imagenet")
    sp.add_argument("--limit", type=int, help="image models: use only the first N images")
    sp.add_argument("--runtime", choices=("transformers", "llama.cpp"), default="transformers",
                    help="causal LMs in .gguf files: llama.cpp measures perplexity through llama.cpp itself "
                    "(llama-cpp-python; also per-layer files transformers cannot load), tokenized by the file's "
                    "own tokenizer; default transformers")
    sp.add_argument("--threads", type=int, default=None, help="--runtime llama.cpp: CPU threads (default: torch's)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _load(spec: str, weights: str | None) -> tuple[nn.Module, str]:
    """(model, kind) with kind one of lm, encoder, image."""
    from .. import io
    from ..hf.validate import is_hf_spec

    if is_hf_spec(spec):
        from ..hf import load_any

        if weights:
            raise ModelFoldError("--weights/--compare-weights apply to CNNs; a Hugging Face model carries its weights")
        model = load_any(spec)
        can = getattr(model, "can_generate", None)
        return model, "lm" if callable(can) and can() else "encoder"
    return io.load_model(spec, weights), "image"


def _tokenizer(args: argparse.Namespace) -> Any:
    from ..hf import load_tokenizer

    for src in filter(None, (args.tokenizer, args.model, args.compare)):
        try:
            return load_tokenizer(src)
        except Exception as e:  # noqa: BLE001 - try the next source
            if src == args.tokenizer:
                raise CheckpointError(f"cannot load the tokenizer {src}: {e}") from None
    raise CheckpointError(f"no tokenizer found with {args.model}" + (f" or {args.compare}" if args.compare else "")
                          + "; pass --tokenizer DIR (a folder holding tokenizer.json / tokenizer_config.json)")


def _read(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} file {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} file {p} is not UTF-8 text ({e}); convert it") from None


def run(args: argparse.Namespace) -> int:
    """Measure MODEL (and ORIGINAL), print a table or JSON."""
    if getattr(args, "runtime", "transformers") == "llama.cpp":
        return _run_llama_cpp(args)
    model, kind = _load(args.model, args.weights)
    ref = ref_kind = None
    if args.compare:
        ref, ref_kind = _load(args.compare, args.compare_weights)
        if ref_kind != kind:
            raise ModelFoldError(f"{args.model} is a {kind} model but {args.compare} is a {ref_kind} model; compare "
                                 "a folded model with its own original")
    names = [args.model] + ([args.compare] if args.compare else [])
    models = [model] + ([ref] if ref is not None else [])
    res: dict = {"kind": kind, "models": [{"name": n, "parameters": count_params(m)} for n, m in zip(names, models,
                                                                                               strict=True)]}
    if kind == "lm":
        _lm(args, models, res)
    elif kind == "encoder":
        if ref is None:
            raise ModelFoldError(f"{args.model} is an encoder: its embeddings are measured against another model; "
                                 "pass --compare ORIGINAL")
        from ..evaluate.text import embedding_cosines

        sents = None if not args.sentences else [s for s in _read(args.sentences, "sentences").splitlines() if s.strip()]
        cos = embedding_cosines(model, ref, _tokenizer(args), sents)
        res.update(sentences=len(cos), cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    else:
        from ..evaluate.images import image_agreement, load_images

        x, y = load_images(args.images, args.limit)
        r = image_agreement(model, ref, x, y, progress=True)
        res.update(images=args.images, n=r["n"], n_labelled=r["n_labelled"])
        res["models"][0]["top1"] = r["top1_a"]
        if ref is not None:
            res["models"][1]["top1"] = r["top1_b"]
            res.update(agreement=r["agreement"], kl=r["kl"])
    print(json.dumps(res, indent=1) if args.json else _table(res))
    return 0


def _lm(args: argparse.Namespace, models: list[nn.Module], res: dict) -> None:
    from ..evaluate.text import eval_windows, expects_bos, window_nll

    tok = _tokenizer(args)
    text = _read(args.text, "text") if args.text else None
    bos = {"yes": True, "no": False}.get(args.bos)
    for m, rec in zip(models, res["models"], strict=True):
        use_bos = expects_bos(m, tok) if bos is None else bos
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and args.ctx > limit:
            raise ModelFoldError(f"--ctx {args.ctx} exceeds the context length {limit} of {rec['name']}")
        wins = eval_windows(tok, text, ctx=args.ctx, windows=args.windows, bos=use_bos)
        nll, count = window_nll(m, wins, progress=True)
        rec.update(perplexity=float(__import__("math").exp(nll / count)), bos=use_bos)
    res.update(text=args.text or "wikipedia (gensim test corpus)", ctx=args.ctx, windows=int(wins.shape[0]),
               predicted_tokens=count)


def _run_llama_cpp(args: argparse.Namespace) -> int:
    """Perplexity of MODEL (and ORIGINAL), both GGUF files, through llama.cpp."""
    import math

    import gguf

    from ..evaluate import llamacpp

    names = [args.model] + ([args.compare] if args.compare else [])
    bad = [n for n in names if not str(n).endswith(".gguf")]
    if bad or args.weights or args.compare_weights or args.tokenizer:
        raise ModelFoldError(f"--runtime llama.cpp measures .gguf causal LMs with their own tokenizer; "
                             f"{', '.join(bad) or '--weights/--tokenizer'} does not fit (drop --runtime to use "
                             "transformers)")
    text = _read(args.text, "text") if args.text else None
    bos = {"yes": True, "no": False}.get(args.bos)
    res: dict = {"kind": "lm", "runtime": "llama.cpp", "models": []}
    for name in names:
        llm = llamacpp.load(name, n_ctx=args.ctx, n_threads=args.threads)
        wins, use_bos = llamacpp.eval_windows(llm, text, args.ctx, args.windows, bos)
        nll, count = llamacpp.window_nll(llm, wins, progress=True)
        params = sum(int(t.n_elements) for t in gguf.GGUFReader(name).tensors)
        res["models"].append({"name": name, "parameters": params, "perplexity": math.exp(nll / count),
                              "bos": use_bos, "weight_bytes": llamacpp.weight_bytes(name)})
    res.update(text=args.text or "wikipedia (gensim test corpus)", ctx=args.ctx, windows=len(wins),
               predicted_tokens=count)
    print(json.dumps(res, indent=1) if args.json else _table(res) + "\n  (through llama.cpp)")
    return 0


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _table(res: dict) -> str:
    ms = res["models"]
    width = max(14, *(len(Path(m["name"]).name) + 2 for m in ms))
    row = lambda label, vals: f"  {label:<26}" + "".join(f"{_fmt(v):>{width}}" for v in vals)  # noqa: E731
    lines = [row("", [Path(m["name"]).name for m in ms]),
             row("parameters", [f"{m['parameters'] / 1e6:.2f}M" for m in ms])]
    if res["kind"] == "lm":
        lines.append(row("perplexity", [m["perplexity"] for m in ms]))
        lines.append(f"  on {res['text']}: {res['windows']} windows x {res['ctx']} tokens, "
                     f"{res['predicted_tokens']:,} predicted tokens" + (", BOS first" if ms[0]["bos"] else ""))
    elif res["kind"] == "encoder":
        lines.append(f"  embedding cosine to {Path(ms[1]['name']).name}: mean {res['cosine_mean']:.4f}, "
                     f"min {res['cosine_min']:.4f} over {res['sentences']} sentences")
    else:
        lines.append(row(f"top-1 ({res['n_labelled']} labelled)",
                         [None if m["top1"] is None else f"{m['top1']:.1%}" for m in ms]))
        if "agreement" in res:
            lines.append(f"  top-1 agreement {res['agreement']:.2%}, mean KL {res['kl']:.4g} nats "
                         f"over {res['n']} images ({res['images']})")
    return "\n".join(lines)
