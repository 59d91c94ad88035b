"""Memory benchmark: fold a transformers checkpoint layer by layer vs loading it whole.

    .venv/bin/python benchmarks/stream_fold.py                 # TinyLlama-1.1B shape, bf16 (~2.2 GB), ~25 min
    .venv/bin/python benchmarks/stream_fold.py --layers 2      # smoke run
    .venv/bin/python benchmarks/stream_fold.py --shape 7b --modes stream --out benchmarks/results/stream_fold_7b
                                      # LLaMA-7B shape (12.55 GiB bf16; needs ~24 GB of disk), layer by layer only

No 1B-parameter checkpoint ships in a package, so a checkpoint of TinyLlama-1.1B's shape (22 layers,
hidden 2048, SwiGLU 5632, 32 query / 4 KV heads, vocab 32000) is written with seeded random bf16
weights (memory and time do not depend on the values). Each mode runs in a fresh process that reports
its own peak resident memory (ru_maxrss) and wall time:

* ``stream``: ``modelfold.hf.fold_checkpoint`` (layer by layer from the safetensors shards);
* ``memory``: ``load_pretrained`` + ``fold_model`` + ``save`` (the whole model in memory);
* ``stream-capped`` / ``memory-capped``: the same in a memory cgroup whose RAM limit (``--cap-gib``)
  is smaller than the checkpoint, i.e. a checkpoint larger than RAM (where cgroups cannot be created,
  RLIMIT_DATA is used instead, which limits virtual private memory and so is stricter).

Both unconstrained outputs are compared tensor by tensor (when both ran). The layer-by-layer runs also
report where their time went (seconds spent reading, folding and writing; reading and writing run in
threads beside the folding) and the bytes written. Writes benchmarks/results/stream_fold.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
SHAPES = {"tinyllama": dict(layers=22, hidden=2048, inter=5632, heads=32, kv_heads=4, vocab=32000),
          "7b": dict(layers=32, hidden=4096, inter=11008, heads=32, kv_heads=32, vocab=32000)}


def make_checkpoint(path: Path, a: argparse.Namespace) -> int:
    """Write a random bf16 Llama checkpoint of the given shape, one tensor at a time; returns bytes."""
    import transformers

    from modelfold.hf.checkpoint import ShardWriter, skeleton

    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, tie_word_embeddings=False, dtype="bfloat16",
                                   architectures=["LlamaForCausalLM"])
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    model = skeleton(path)  # meta device: names and shapes only
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(path, 1 << 30)
    for name, p in model.state_dict().items():
        t = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * 0.02
        w.add(name, t.to(torch.bfloat16))
    w.close()
    return w.total


def _written() -> int | None:
    """Bytes this process caused to be written to storage (Linux /proc/self/io), or None."""
    try:
        line = next(v for v in Path("/proc/self/io").read_text().splitlines() if v.startswith("write_bytes"))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return None


def child(mode: str, src: str, dst: str, ratio: float, targets: str, threads: int) -> None:
    torch.set_num_threads(threads)
    import modelfold.hf as mh
    from modelfold.hf.checkpoint import fold_checkpoint

    t0 = time.perf_counter()
    info = {}
    if mode == "stream":
        info = fold_checkpoint(src, dst, ratio=ratio, targets=targets, progress=False).info
    else:
        model = mh.load_pretrained(src, dtype=torch.bfloat16)
        mh.save(mh.fold_model(model, ratio=ratio, targets=targets), dst)
    use = resource.getrusage(resource.RUSAGE_SELF)
    rss = use.ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": rss, "written_bytes": _written(),
                      "cpu_seconds": use.ru_utime + use.ru_stime, "load_avg": os.getloadavg(),
                      "stages": info}))


CGROUP = Path("/sys/fs/cgroup/memory")  # cgroup v1 memory controller, if this machine lets us use it


def cgroup_for(cap: int) -> Path | None:
    """A fresh memory cgroup limited to ``cap`` bytes of RAM (page cache included), or None."""
    try:
        cg = CGROUP / f"modelfold-bench-{os.getpid()}-{time.monotonic_ns()}"
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(cap))
        return cg
    except OSError:
        return None


def run(mode: str, src: Path, dst: Path, a: argparse.Namespace, cap: int | None) -> dict:
    cg = cgroup_for(cap) if cap is not None else None

    def limit() -> None:
        if cg is not None:  # the child's RAM (RSS + page cache) is capped; the kernel OOM-kills beyond it
            (cg / "cgroup.procs").write_text(str(os.getpid()))
        elif cap is not None:  # fallback: cap private writable memory (virtual, so stricter than RSS)
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    cmd = [sys.executable, __file__, "--child", mode, str(src), str(dst), "--ratio", str(a.ratio),
           "--targets", a.targets, "--threads", str(a.threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    limit_kind = None if cap is None else ("cgroup memory.limit_in_bytes" if cg is not None else "RLIMIT_DATA")
    if cg is not None:
        cg.rmdir()
    rec = {"mode": mode + ("-capped" if cap else ""), "cap_bytes": cap, "limit": limit_kind,
           "returncode": p.returncode}
    if p.returncode == 0:
        rec.update(json.loads(p.stdout.strip().splitlines()[-1]))
    else:
        last = (p.stderr.strip().splitlines() or [""])[-1][:160]
        rec.update(seconds=time.perf_counter() - t0, peak_rss=None,
                   error="killed: out of memory (SIGKILL)" if p.returncode == -9 else last or "no message")
    rss = "-" if rec["peak_rss"] is None else f"{rec['peak_rss'] / 2**30:.2f} GiB"
    err = f"  {rec['error']}" if p.returncode else ""
    print(f"  {rec['mode']:<14} rc={p.returncode} {rec['seconds']:.1f}s peak RSS {rss}{err}", flush=True)
    return rec


def same_outputs(a: Path, b: Path) -> bool:
    from modelfold.hf.checkpoint import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    if set(ra.keys()) != set(rb.keys()):
        return False
    return all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="preset shape (overrides --layers/--hidden/--inter/--heads/--kv-heads/--vocab)")
    p.add_argument("--modes", default="stream,memory,stream-capped,memory-capped",
                   help="comma-separated runs (the 7B shape does not fit in RAM whole: use --modes stream)")
    p.add_argument("--src", default=None, help="checkpoint to use (written there first if missing); kept afterwards")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's, else 22)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--targets", default="mlp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap-gib", type=float, default=1.25, help="RAM limit of the capped runs (GiB)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=str(OUT / "stream_fold"))
    a = p.parse_args()
    if a.child:
        child(*a.child, a.ratio, a.targets, a.threads)
        return
    for k, v in SHAPES.get(a.shape, {}).items():
        if k != "layers" or a.layers is None:
            setattr(a, k, v)
    a.layers = a.layers or 22
    work = Path(tempfile.mkdtemp(prefix="stream_fold-", dir=a.workdir))
    t0 = time.perf_counter()
    if a.src and Path(a.src).exists():
        from modelfold.hf.checkpoint import checkpoint_bytes

        src, size = Path(a.src), checkpoint_bytes(a.src)
    elif a.src:  # written there and kept for later runs
        src = Path(a.src)
        size = make_checkpoint(src, a)
    else:
        src = work / "src"
        size = make_checkpoint(src, a)
    print(f"checkpoint: {a.layers} layers, {size / 2**30:.2f} GiB bf16, ready in {time.perf_counter() - t0:.0f}s")
    cap = int(a.cap_gib * 2**30)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    recs = []
    for m in modes:
        capped = m.endswith("-capped")
        base = m.removesuffix("-capped")
        recs.append(run(base, src, work / m, a, cap if capped else None))
        if capped:  # the unconstrained outputs are compared below
            import shutil

            shutil.rmtree(work / m, ignore_errors=True)
    ok = {r["mode"]: r["returncode"] == 0 for r in recs}
    identical = None
    if ok.get("stream") and ok.get("memory"):
        identical = same_outputs(work / "stream", work / "memory")
    out_size = sum(f.stat().st_size for f in (work / "stream").glob("*.safetensors")) if ok.get("stream") else None
    shape = {k: getattr(a, k) for k in ("layers", "hidden", "inter", "heads", "kv_heads", "vocab", "ratio",
                                          "targets", "threads")}
    result = {"shape": shape, "checkpoint_bytes": size, "output_bytes": out_size,
              "stream_equals_memory": identical, "runs": recs}
    print(f"stream output == in-memory output, tensor by tensor: {identical}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    gib = lambda v: "-" if v is None else f"{v / 2**30:.2f}"  # noqa: E731
    rows = ["| mode | RAM limit (GiB) | exit | peak RSS (GiB) | seconds | CPU seconds | load avg (1 min) at end "
            "| read / fold / write s (threads) | written (GB) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        cap_txt = gib(r["cap_bytes"]) + ("" if r["limit"] in (None, "cgroup memory.limit_in_bytes") else " (RLIMIT_DATA)")
        st = r.get("stages") or {}
        stage = "/".join(f"{st[k]:.0f}" for k in ("read_seconds", "fold_seconds", "write_seconds")) if st else "-"
        wrote = "-" if r.get("written_bytes") is None else f"{r['written_bytes'] / 1e9:.2f}"
        rows.append(f"| {r['mode']} | {cap_txt} | {r['returncode']} | {gib(r['peak_rss'])} | "
                    f"{r['seconds']:.0f} | {r.get('cpu_seconds', 0):.0f} | {(r.get('load_avg') or [0])[0]:.1f} | "
                    f"{stage} | {wrote} | {r.get('error', '')} |")
    Path(a.out + ".md").write_text(
        f"Checkpoint: Llama, {a.layers} layers, hidden {a.hidden}, SwiGLU {a.inter}, {a.heads}/{a.kv_heads} heads, "
        f"vocab {a.vocab}, bf16, {gib(size)} GiB; fold ratio {a.ratio} ({a.targets}), output {gib(out_size)} GiB, "
        f"{a.threads} threads. Layer-by-layer output identical to in-memory output: "
        f"{'not compared' if identical is None else identical}.\n\n"
        + "\n".join(rows) + "\n")
    print("\n".join(rows))
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # a --src checkpoint lives elsewhere and is kept


if __name__ == "__main__":
    main()
