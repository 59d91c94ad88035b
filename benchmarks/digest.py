"""Digests of a fixed set of compressions: a refactoring that changes none of them changed no behaviour.

    .venv/bin/python benchmarks/digest.py            # print the digests and write benchmarks/results/digest.json
    .venv/bin/python benchmarks/digest.py --check    # compare with the committed file; exit 1 on a difference

Covers the CNN engine (fold with every repair, magnitude prune, calibrated compress with a uniform ratio
and with the automatic budget for ``sparsity=``) and the transformers paths (fold, prune, calibrated
compress uniform and automatic, in memory and layer by layer, GGUF out). Every model is small and seeded;
one torch thread; caches point at a fresh temporary directory. A digest is the SHA-256 of every output
tensor (name, dtype, shape, bytes; sorted by name), or of every output file's bytes, plus the widths
of the report. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULT = Path(__file__).resolve().parent / "results" / "digest.json"


def _tensors(sd: dict) -> str:
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _files(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"|")
            h.update(p.read_bytes())
    return h.hexdigest()


def _widths(report) -> list:
    return [[g.root, g.channels_before, g.channels_after] for g in report.groups]


def cnn_cases() -> dict[str, Callable[[], dict]]:
    import torch
    import torch.nn as nn

    import modelfold

    class Net(nn.Module):  # conv-BN-ReLU stem, a residual block, a head: every slice kind
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                                      nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(torch.relu(h + self.a(h)))

    def net() -> nn.Module:
        torch.manual_seed(0)
        m = Net()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
        return m.eval()

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    data = [(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2 + i)), torch.zeros(8))
            for i in range(2)]

    def run(fn: Callable, **kw: object) -> dict:
        model, report = fn(net(), x, return_report=True, **kw)
        return {"tensors": _tensors(model.state_dict()), "widths": _widths(report)}

    cases: dict[str, Callable[[], dict]] = {}
    for repair in ("none", "ar", "dir", "data"):
        extra = {"dir_batch": 8, "dir_iters": 5} if repair == "dir" else {"data": data} if repair == "data" else {}
        cases[f"cnn fold 0.3 repair={repair}"] = (lambda r=repair, e=extra: run(modelfold.fold, ratio=0.3,
                                                                                  repair=r, **e))
    cases["cnn prune sp-l2 0.3"] = lambda: run(modelfold.prune, ratio=0.3)
    cases["cnn compress ratio 0.3"] = lambda: run(modelfold.compress, ratio=0.3, calibration=x)
    cases["cnn compress sparsity 0.3"] = lambda: run(modelfold.compress, sparsity=0.3, calibration=x)
    return cases


def hf_cases(tmp: Path) -> dict[str, Callable[[], dict]]:
    import torch
    import transformers as T

    from modelfold import hf
    from modelfold.hf.checkpoint import compress_checkpoint

    def llama(layers: int = 4) -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = T.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            attn_implementation="eager")
        return T.LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(3))
    src = tmp / "src"
    llama().save_pretrained(src, max_shard_size="40KB")

    def mem(fn: Callable, **kw: object) -> dict:
        model, report = fn(llama(), return_report=True, **kw)
        return {"tensors": _tensors(model.state_dict()), "widths": _widths(report)}

    def disk(fn: Callable, name: str, **kw: object) -> dict:
        report = fn(src, tmp / name, progress=False, **kw)
        return {"files": _files(tmp / name), "widths": _widths(report)}

    def gguf() -> dict:
        model = hf.fold_model(llama(), ratio=0.3)
        hf.save_gguf(model, tmp / "m.gguf", dtype="f16")
        return {"files": _files(tmp / "m.gguf")}

    both = {"targets": "all"}
    return {
        "hf fold 0.3 all": lambda: mem(hf.fold_model, ratio=0.3, **both),
        "hf prune 0.3 all": lambda: mem(hf.prune_model, ratio=0.3, **both),
        "hf compress ratio 0.3": lambda: mem(hf.compress_model, ratio=0.3, calibration=ids, budget="uniform"),
        "hf compress sparsity 0.2 auto": lambda: mem(hf.compress_model, sparsity=0.2, calibration=ids),
        "hf fold_checkpoint 0.3": lambda: disk(hf.fold_checkpoint, "fold", ratio=0.3, **both),
        "hf prune_checkpoint 0.3": lambda: disk(hf.prune_checkpoint, "prune", ratio=0.3),
        "hf compress_checkpoint sparsity 0.2": lambda: disk(compress_checkpoint, "compress", sparsity=0.2,
                                                            calibration=ids),
        "hf save_gguf f16 of fold 0.3": gguf,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with benchmarks/results/digest.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        os.environ["MODELFOLD_CACHE"] = str(Path(d) / "cache")
        cases = {**cnn_cases(), **hf_cases(Path(d))}
        got = {}
        for name, fn in cases.items():
            got[name] = fn()
            print(f"{name:40s} {next(iter(v for k, v in got[name].items() if k != 'widths'))[:16]}", flush=True)
    if args.check:
        want = json.loads(RESULT.read_text())
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        print("digests identical" if not diff else f"DIFFERENT: {diff}")
        sys.exit(1 if diff else 0)
    RESULT.write_text(json.dumps(got, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
