"""Does llama.cpp's generation speed follow the bytes of weights a token reads? Measured interleaved, for a shared
machine.

    .venv/bin/python benchmarks/deploy_speed.py                       # f16/q8_0/q4_0 x 1 and 2 threads (~25 min)
    .venv/bin/python benchmarks/deploy_speed.py --types q8_0 --threads 1 --reps 3 --methods original compress18

One worker process per (GGUF type, thread count) loads the original and every compressed file (the models of
``benchmarks/deploy.py``, its cache; missing GGUF files are written here) and decodes ``--gen`` tokens one at a
time after a 16-token prompt (no sampling) with each, in the order O C_a O C_b ... O: the compressed models are
shuffled anew in each of ``--reps`` repetitions and every one sits between two runs of the original. Its speed-up
in a repetition is its tokens/s over the geometric mean of those two original runs, so a load change slower than
a few seconds cancels; the reported speed-up is the median over repetitions. Each run records the 1-minute load
average before it and the process's CPU seconds beside the wall seconds (CPU time hardly moves when other
processes take the cores, so ``speedup_cpu`` is the steadier estimate; with 2 threads it also counts the time a
thread waits at a barrier). ``OMP_WAIT_POLICY=passive`` as in deploy.py (``--omp-active`` to compare).

The goal of issue 20: gen speed-up >= 0.9 x the weight-bytes reduction (bytes of every matrix a generated token
reads, the output head included, the input-embedding lookup excluded: ``llamacpp.weight_bytes``).
``efficiency`` = speed-up / bytes reduction (the goal: >= 0.9); ``gain_share`` = (speed-up - 1) / (reduction - 1),
the share of the possible gain that arrived (the stricter reading at small reductions). To say why a case misses,
the seconds per token of every model of a (type, threads) are fitted as ``fixed + per_byte * weight_bytes``: the
fixed part (per-token work that does not shrink with the weights: per-operation thread synchronization, norms,
RoPE, attention over the KV cache, the Python call) is what keeps the speed-up below the bytes reduction.
Writes benchmarks/results/deploy_speed.{json,md} (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy  # noqa: E402

SPEED_METHODS = ["original", "compress10", "compress18", "compress30", "prune10", "prune18", "prune30"]


def worker(paths: list[str], prompt: list[int], threads: int, reps: int, seed: int) -> dict:
    """The interleaved runs of one (type, threads): model 0 is the original."""
    from modelfold.evaluate import llamacpp as lc

    llms = [lc.load(p, n_ctx=len(prompt) + 8, n_threads=threads, logits_all=False) for p in paths]
    for llm in llms:  # warm-up: first touches of the mmapped weights, threads started
        lc.decode_seconds(llm, prompt[:24])
    rng = random.Random(seed)
    runs = []
    for rep in range(reps):
        order = list(range(1, len(paths)))
        rng.shuffle(order)
        seq = [0] + [i for c in order for i in (c, 0)]
        for pos, i in enumerate(seq):
            load = os.getloadavg()[0]
            wall, cpu = lc.decode_seconds(llms[i], prompt)
            runs.append({"rep": rep, "pos": pos, "model": i, "load1": round(load, 2), "wall_s": round(wall, 4),
                         "cpu_s": round(cpu, 4)})
    return {"runs": runs}


def ratios(runs: list[dict], key: str) -> dict[int, list[float]]:
    """model -> its speed-ups over the geometric mean of the original runs just before and after it."""
    out: dict[int, list[float]] = {}
    by_rep: dict[int, list[dict]] = {}
    for r in runs:
        by_rep.setdefault(r["rep"], []).append(r)
    for seq in by_rep.values():
        seq.sort(key=lambda r: r["pos"])
        for j in range(1, len(seq) - 1):
            if seq[j]["model"] == 0:
                continue
            base = (seq[j - 1][key] * seq[j + 1][key]) ** 0.5  # seconds of the original around it
            out.setdefault(seq[j]["model"], []).append(base / seq[j][key])
    return out


def fit_fixed(sec_per_token: list[float], wbytes: list[int]) -> tuple[float, float]:
    """Least squares of seconds/token = fixed + per_byte * bytes; returns (fixed ms, ms per MB)."""
    a = np.stack([np.ones(len(wbytes)), np.array(wbytes, dtype=float) / 1e6], axis=1)
    coef, *_ = np.linalg.lstsq(a, np.array(sec_per_token) * 1e3, rcond=None)
    return float(coef[0]), float(coef[1])


def gguf_files(methods: list[str], types: list[str], cache: Path) -> dict[tuple[str, str], Path]:
    """(method, type) -> GGUF file in the cache; the missing ones are written from the cached directories."""
    import modelfold.hf as mh

    files = {}
    for m in methods:
        for t in types:
            path = cache / f"{m}.{t}.gguf"
            if not path.is_file():
                src = deploy.smollm2() if m == "original" else cache / m
                print(mh.save_gguf(mh.load_any(src), path, dtype=t, source=deploy.smollm2()), flush=True)
            files[m, t] = path
    return files


def run_worker(paths: list[Path], args: argparse.Namespace, threads: int, prompt_file: Path) -> dict:
    env = dict(os.environ)
    if not args.omp_active:
        env["OMP_WAIT_POLICY"] = "passive"
    cmd = [sys.executable, __file__, "--worker", *map(str, paths), "--prompt-file", str(prompt_file),
           "--threads", str(threads), "--reps", str(args.reps), "--seed", str(args.seed)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"speed worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def count_params(path: Path) -> int:
    """Parameters of a cached model from the files' headers (loading the models costs minutes on busy cores): every
    tensor of a transformers directory's safetensors, or of a GGUF file (SmolLM2 ties its head: no output.weight)."""
    if path.suffix == ".gguf":
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    from safetensors import safe_open

    n = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            n += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())  # noqa: SIM118
    return n


def model_info(methods: list[str], cache: Path) -> dict[str, dict]:
    """Parameters, sparsity and the commit that made each cached model (deploy.py's made_by.json)."""
    base = count_params(deploy.smollm2())
    info = {}
    for m in methods:
        params = base if m == "original" else count_params(cache / m)
        made = cache / m / "made_by.json"
        info[m] = {"params": params, "param_sparsity": round(1 - params / base, 4),
                   "made_by": json.loads(made.read_text()) if made.is_file() else None}
    return info


def summarize(res: dict, methods: list[str], files: dict, t: str, threads: int, info: dict, gen: int) -> list[dict]:
    """One record per model of one (type, threads) worker: median tokens/s, interleaved speed-ups, the goal."""

    runs = res["runs"]
    wall, cpu = ratios(runs, "wall_s"), ratios(runs, "cpu_s")
    wb = [weight_bytes(files[m, t]) for m in methods]
    sec = [float(np.median([r["wall_s"] for r in runs if r["model"] == i])) / gen for i in range(len(methods))]
    sec_cpu = [float(np.median([r["cpu_s"] for r in runs if r["model"] == i])) / gen for i in range(len(methods))]
    fixed, per_mb = fit_fixed(sec_cpu if threads == 1 else sec, wb)
    recs = []
    for i, m in enumerate(methods):
        loads = [r["load1"] for r in runs if r["model"] == i]
        red = wb[0] / wb[i]
        rec = {"runtime": "llama.cpp", "model": "SmolLM2-135M-Instruct", "method": m, "gguf_type": t,
               "gguf_arch": gguf_arch(files[m, t]), "threads": threads, **{k: info[m][k] for k in ("params",
               "param_sparsity")}, "weight_bytes": wb[i], "bytes_reduction": round(red, 4),
               "gen_tokens_per_s": round(1 / sec[i], 2), "gen_tokens_per_cpu_s": round(1 / sec_cpu[i], 2),
               "load1_min_median_max": [min(loads), float(np.median(loads)), max(loads)], "runs": len(loads)}
        if i:
            s, sc = float(np.median(wall[i])), float(np.median(cpu[i]))
            rec.update(gen_speedup=round(s, 4), gen_speedup_q1_q3=[round(float(x), 4) for x in np.percentile(
                wall[i], [25, 75])], gen_speedup_cpu=round(sc, 4), gen_speedup_cpu_q1_q3=[
                round(float(x), 4) for x in np.percentile(cpu[i], [25, 75])])
            derive(rec)
        rec["fit_fixed_ms_per_token"], rec["fit_ms_per_mb"] = round(fixed, 3), round(per_mb, 5)
        rec["made_by"] = info[m]["made_by"]
        recs.append(rec)
    return recs


def derive(rec: dict) -> None:
    """The goal's numbers from the measured speed-ups. The verdict uses CPU time at 1 thread (on oversubscribed
    cores a single thread's wall time mostly measures its share of the CPU) and wall time with more threads (CPU
    time there also counts the waits at each operation's barrier)."""
    red, s, sc = rec["bytes_reduction"], rec["gen_speedup"], rec["gen_speedup_cpu"]
    basis = sc if rec["threads"] == 1 else s
    rec.update(efficiency=round(s / red, 3), efficiency_cpu=round(sc / red, 3),
               speedup_basis="cpu" if rec["threads"] == 1 else "wall", gain_share=round((basis - 1) / (red - 1), 3),
               meets_goal=bool(basis >= 0.9 * red))


@functools.cache
def weight_bytes(path: Path) -> int:
    """``llamacpp.weight_bytes``, once per file (parsing SmolLM2's 49k-token vocabulary takes seconds of CPU)."""
    from modelfold.evaluate import llamacpp as lc

    return lc.weight_bytes(path)


@functools.cache
def gguf_arch(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def attach_quality(recs: list[dict], deploy_json: Path) -> None:
    """Perplexity, prompt tokens/s and peak RSS of the same file from deploy.py's records, where it has them."""
    if not deploy_json.is_file():
        return
    full = {(r["method"], r["gguf_type"]): r for r in json.loads(deploy_json.read_text())["records"]
            if r["runtime"] == "llama.cpp"}
    for rec in recs:
        src = full.get((rec["method"], rec["gguf_type"]))
        for k in ("perplexity", "pp_tokens_per_s", "peak_rss_gib"):
            rec[k] = src[k] if src else None


def table(recs: list[dict], meta: dict) -> str:
    runs = "; ".join(f"{x['date']} at commit {x['commit']} (load average 1 min {x['load1_range'][0]}-"
                     f"{x['load1_range'][1]})" for x in [*meta.get("earlier_runs", []), meta])
    lines = [f"SmolLM2-135M-Instruct in llama.cpp (llama-cpp-python {meta['llama_cpp']}), {meta['cpus']} cores "
             f"shared with other jobs; runs: {runs}; OMP_WAIT_POLICY={meta['omp_wait_policy']}; "
             f"{meta['gen']} tokens decoded per run, {meta['reps']} interleaved repetitions (O C O C ... O), "
             "speed-up = median over repetitions of tokens/s over the original runs around it.\n",
             "Efficiency = speed-up / bytes reduction, the goal is >= 0.9: by CPU time at 1 thread, by wall time with "
             "2 threads (the bold one decides); gain share = (speed-up - 1) / (bytes reduction - 1), same basis.\n",
             "| type | threads | method | arch | params removed | weight MB | bytes reduction | gen tok/s (wall) | "
             "gen tok / CPU s | speed-up wall (q1-q3) | speed-up CPU time (q1-q3) | efficiency CPU / wall | "
             "gain share | ppl | load |", "|" + "---|" * 15]
    for r in recs:
        sp = eff = share = cpu = ""
        if r["method"] != "original":
            derive(r)
            q, qc = r["gen_speedup_q1_q3"], r.get("gen_speedup_cpu_q1_q3", [float("nan")] * 2)
            sp = f"{r['gen_speedup']:.2f}x ({q[0]:.2f}-{q[1]:.2f})"
            cpu = f"{r['gen_speedup_cpu']:.2f}x ({qc[0]:.2f}-{qc[1]:.2f})"
            e = [f"{r['efficiency_cpu']:.2f}", f"{r['efficiency']:.2f}"]
            e[r["speedup_basis"] == "wall"] = f"**{e[r['speedup_basis'] == 'wall']}**"
            eff = " / ".join(e) + ("" if r["meets_goal"] else " (miss)")
            share = f"{r['gain_share']:.2f}"
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else ""
        ld = r["load1_min_median_max"]
        lines.append(f"| {r['gguf_type']} | {r['threads']} | {r['method']} | {r['gguf_arch']} | "
                     f"{r['param_sparsity']:.1%} | {r['weight_bytes'] / 1e6:.1f} | {r['bytes_reduction']:.3f}x | "
                     f"{r['gen_tokens_per_s']:.1f} | {r['gen_tokens_per_cpu_s']:.1f} | {sp} | {cpu} | {eff} | {share} | "
                     f"{ppl} | {ld[0]}-{ld[2]} |")
    lines += ["", "Seconds per generated token fitted as fixed + per MB of weights (CPU time at 1 thread, wall time "
              "at 2), per run (the models measured together) and over all runs:", "",
              "| type | threads | run | fixed ms/token | ms per MB | fixed share of the original's token |",
              "|---|---|---|---|---|---|"]
    for t, th in dict.fromkeys((r["gguf_type"], r["threads"]) for r in recs):
        rs = [r for r in recs if r["gguf_type"] == t and r["threads"] == th]
        rate = "gen_tokens_per_cpu_s" if th == 1 else "gen_tokens_per_s"
        o_ms = 1e3 / float(np.mean([r[rate] for r in rs if r["method"] == "original"]))
        fits = {r.get("run", "this run"): (r["fit_fixed_ms_per_token"], r["fit_ms_per_mb"]) for r in rs}
        if len(fits) > 1:
            fits["all"] = fit_fixed([1 / r[rate] for r in rs], [r["weight_bytes"] for r in rs])
        for run, (fixed, per_mb) in fits.items():
            lines.append(f"| {t} | {th} | {run} | {fixed:.2f} | {per_mb:.4f} | {fixed / o_ms:.0%} |")
    return "\n".join(lines) + "\n"


def merge(old: dict, recs: list[dict], raw: list[dict], m: dict) -> tuple[list[dict], list[dict], dict]:
    """``old`` (an earlier output) with this run's records: a compressed model measured now replaces its old
    record; the originals of both runs stay (each run's speed-ups are relative to its own original runs)."""
    new = {(r["method"], r["gguf_type"], r["threads"]) for r in recs if r["method"] != "original"}
    keep = [r for r in old["records"] if (r["method"], r["gguf_type"], r["threads"]) not in new]
    recs = sorted(keep + recs, key=lambda r: (r["gguf_type"], r["threads"], r["run"], r["bytes_reduction"]))
    return recs, old["runs"] + raw, {**m, "earlier_runs": old["meta"].get("earlier_runs", []) + [old["meta"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=SPEED_METHODS, choices=list(deploy.METHODS))
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded per run (after a 16-token prompt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "modelfold" / "deploy"))
    ap.add_argument("--out", default=str(deploy.OUT / "deploy_speed.json"))
    ap.add_argument("--omp-active", action="store_true", help="leave OpenMP's default (spinning) wait policy")
    ap.add_argument("--append", action="store_true", help="keep the records of --out that this run does not "
                    "measure (each compressed model's speed-up is relative to the original runs of its own run)")
    ap.add_argument("--merge-from", metavar="JSON", help="measure nothing: merge that output of an earlier run into "
                    "--out (as --append would have) and rewrite the tables")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        prompt = [int(x) for x in np.load(args.prompt_file)]
        print(json.dumps(worker(args.worker, prompt, args.threads[0], args.reps, args.seed)))
        return
    if args.merge_from:
        new = json.loads(Path(args.merge_from).read_text())
        recs, raw, m = merge(json.loads(Path(args.out).read_text()), new["records"], new["runs"], new["meta"])
        for x in raw:  # quartiles of the CPU-time speed-ups (records of older versions of this script lack them)
            cpu = ratios(x["runs"], "cpu_s")
            for r in recs:
                if r["gguf_type"] == x["gguf_type"] and r["threads"] == x["threads"] and r["method"] in x[
                        "methods"][1:] and x["methods"].index(r["method"]) in cpu:
                    r["gen_speedup_cpu_q1_q3"] = [round(float(v), 4) for v in np.percentile(
                        cpu[x["methods"].index(r["method"])], [25, 75])]
        Path(args.out).write_text(json.dumps({"meta": m, "records": recs, "runs": raw}, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(table(recs, m))
        print(table(recs, m))
        return
    import llama_cpp

    methods = ["original"] + [m for m in args.methods if m != "original"]
    cache = Path(args.cache)
    t0 = time.time()
    if not (cache / "windows4.npy").is_file() or any(not (cache / m / "config.json").is_file() for m in methods[1:]):
        deploy.prepare(argparse.Namespace(cache=args.cache, windows=4, methods=methods))  # compresses what is missing
    prompt_file = cache / f"prompt{args.gen}.npy"
    np.save(prompt_file, np.load(cache / "windows4.npy")[0][: 16 + args.gen])
    files = gguf_files(methods, args.types, cache)
    info = model_info(methods, cache)
    recs, raw = [], []
    for t in args.types:
        for th in args.threads:
            res = run_worker([files[m, t] for m in methods], args, th, prompt_file)
            raw.append({"gguf_type": t, "threads": th, "methods": methods, "runs": res["runs"]})
            recs += summarize(res, methods, files, t, th, info, args.gen)
            print(table(recs[-len(methods):], meta(args, raw, t0, llama_cpp.__version__)), flush=True)
    attach_quality(recs, deploy.OUT / "deploy.json")
    m = meta(args, raw, t0, llama_cpp.__version__)
    for r in recs:
        r["run"] = m["date"]
    if args.append and Path(args.out).is_file():
        recs, raw, m = merge(json.loads(Path(args.out).read_text()), recs, raw, m)
    Path(args.out).write_text(json.dumps({"meta": m, "records": recs, "runs": raw}, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(recs, m))
    print(table(recs, m))


def meta(args: argparse.Namespace, raw: list[dict], t0: float, version: str) -> dict:
    loads = [r["load1"] for x in raw for r in x["runs"]]
    return {"gen": args.gen, "prompt": 16, "reps": args.reps, "seed": args.seed, "threads": args.threads,
            "omp_wait_policy": "default" if args.omp_active else "passive", "commit": deploy.git_commit(),
            "llama_cpp": version, "cpus": os.cpu_count(), "load1_range": [min(loads), max(loads)],
            "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "order": "per repetition: original, then each compressed model (shuffled) followed by the original"}


if __name__ == "__main__":
    main()
