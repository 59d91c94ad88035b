"""Attention inside the heads against whole-head selection on Qwen2.5-Coder-1.5B (issue 19), in memory.

    make assets-large                                  # once
    .venv/bin/python benchmarks/qwen.py --rows original  # once: the fp32 directory and the evaluation windows
    .venv/bin/python benchmarks/qwen_attention.py

Qwen2 (28 layers, 12 query heads in 2 KV groups, head_dim 128). At about equal attention parameters
removed, with the same self-made calibration text (8 x 256, the model's own samples) and the same 4
evaluation windows as ``benchmarks/qwen.py``:

* head selection: ``compress_model(targets="attention", ratio=1/6, budget="uniform")``: query heads 6 -> 5
  per KV group in every layer (16.7% of q and o; k and v whole), least-squares refit of o_proj;
* inside the heads: ``narrow_heads(head_dim=106)``: every head 128 -> 106 wide (17.2% of q, k, v and o).

Both run in memory (fp32 model + its working copy, ~15 GB). Writes benchmarks/results/qwen_attention.{json,md}.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from calib_cost import commit  # noqa: E402
from qwen import fp32_dir, work_dir  # noqa: E402

from modelfold.evaluate import text as ev  # noqa: E402
from modelfold.hf import load_any  # noqa: E402
from modelfold.hf.attention_inside import narrow_heads  # noqa: E402
from modelfold.hf.calib.compress import compress_model  # noqa: E402
from modelfold.hf.calib.data import self_text  # noqa: E402
from modelfold.report import count_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def attention_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)


def main() -> None:
    torch.set_num_threads(2)
    code = commit()
    model = load_any(fp32_dir()).eval()
    wins = torch.load(work_dir() / "windows.pt", weights_only=True)
    total, attn = count_params(model), attention_params(model)
    t = time.perf_counter()
    ids = self_text(model, 8, 256, seed=0, progress=True)
    sampling = time.perf_counter() - t
    rows = {"heads-q5of6": lambda: compress_model(model, ratio=1 / 6, calibration=ids, targets="attention",
                                                  budget="uniform", progress=True),
            "inside-106": lambda: narrow_heads(model, 106, calibration=ids, progress=True)}
    records = []
    for name, fn in rows.items():
        t, cpu = time.perf_counter(), time.process_time()
        small = fn()
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        nll, cnt = ev.window_nll(small.eval(), wins, progress=True)
        rec = {"model": "Qwen2.5-Coder-1.5B-Instruct", "row": name, "calibration": "self", "calibration_shape": [8, 256],
               "attention_sparsity": round(1 - attention_params(small) / attn, 4),
               "param_sparsity": round(1 - count_params(small) / total, 4),
               "perplexity": round(float(torch.tensor(nll / cnt).exp()), 3), "eval_windows": len(wins),
               "compress_seconds": round(seconds, 1), "cpu_seconds": round(cpu_s, 1),
               "sampling_seconds": round(sampling, 1), "load1": round(os.getloadavg()[0], 2),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "commit": code}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        del small
        (OUT / "qwen_attention.json").write_text(json.dumps(records, indent=1))
    lines = ["# Qwen2.5-Coder-1.5B: attention inside the heads vs head selection (benchmarks/qwen_attention.py)", "",
             "Self-made calibration 8 x 256, 4 evaluation windows of 512 tokens (original 13.997), in memory, 2 cores.",
             "", "| row | attention removed | all removed | perplexity | compress s | CPU s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['attention_sparsity']:.1%} | {r['param_sparsity']:.1%} | {r['perplexity']} | "
              f"{r['compress_seconds']} | {r['cpu_seconds']} |" for r in records]
    (OUT / "qwen_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
