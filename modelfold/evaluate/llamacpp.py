"""Measuring a GGUF file in llama.cpp itself (llama-cpp-python): perplexity on the evaluation windows, prompt and
generation speed, the bytes of weights a generated token reads.

``modelfold eval small.gguf --runtime llama.cpp`` and ``benchmarks/deploy.py`` use these. llama-cpp-python must
be importable (scripts/install.sh installs the portable wheel from ../shared/wheels/ when it is there).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedModelError


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedModelError(
            "--runtime llama.cpp needs llama-cpp-python: scripts/install.sh installs the portable wheel from "
            "../shared/wheels/ when it lies beside the repo (pip install llama-cpp-python compiles llama.cpp "
            "from source, ~1 h on 2 cores); or drop --runtime to evaluate with transformers") from None
    return llama_cpp


def load(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` (CPU, quiet); a file llama.cpp refuses raises ``CheckpointError``."""
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                               n_threads=n_threads or torch.get_num_threads(), n_gpu_layers=0)
    except ValueError as e:
        raise CheckpointError(f"llama.cpp could not load {path} ({e}); run it with verbose llama.cpp logging "
                              "to see why, or evaluate it with transformers (drop --runtime)") from None


def tokenize(llm: Any, text: str) -> list[int]:
    """The GGUF's own tokenizer (llama.cpp), no special tokens added."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def bos_id(llm: Any) -> int | None:
    b = llm.token_bos()
    return None if b is None or b < 0 else int(b)


def window_nll(llm: Any, wins: torch.Tensor | np.ndarray, progress: bool = False) -> tuple[float, int]:
    """Summed NLL (nats) of every token after the first of each row, from llama.cpp's logits, and their count."""
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    for w in tqdm(np.asarray(wins), desc="perplexity (llama.cpp)", unit="window", disable=not progress, leave=False):
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = torch.from_numpy(np.array(llm.scores[: len(w) - 1], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(w[1:]).long(),
                                                       reduction="sum"))
        count += len(w) - 1
    return nll, count


def eval_windows(llm: Any, text: str | None = None, ctx: int = 512, windows: int = 12,
                 bos: bool | None = None) -> tuple[np.ndarray, bool]:
    """(windows, ctx) token ids like :func:`modelfold.evaluate.text.eval_windows`, from the GGUF's own tokenizer:
    the text (default: the shipped Wikipedia articles), evenly spread windows, BOS first when the file names one
    (``bos=None``). Returns the ids and whether BOS was used."""
    from .text import wiki_text, window_starts

    ids = tokenize(llm, wiki_text() if text is None else text)
    b = bos_id(llm)
    use_bos = b is not None if bos is None else bos
    if use_bos and b is None:
        raise UnsupportedModelError("the GGUF file names no BOS token; pass bos=False (--bos no)")
    step = ctx - 1 if use_bos else ctx
    wins = np.array([([b] if use_bos else []) + ids[s:s + step] for s in window_starts(len(ids), step, windows)])
    return wins, use_bos


def perplexity(path: str | os.PathLike, text: str | None = None, ctx: int = 512, windows: int = 12,
               bos: bool | None = None, n_threads: int | None = None, progress: bool = False) -> float:
    """Perplexity through llama.cpp on :func:`eval_windows` (the counterpart of
    :func:`modelfold.evaluate.perplexity`)."""
    llm = load(path, n_ctx=ctx, n_threads=n_threads)
    nll, count = window_nll(llm, eval_windows(llm, text, ctx, windows, bos)[0], progress=progress)
    return math.exp(nll / count)


def weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of every matrix a generated token reads: all 2-D tensors except the input-embedding lookup, plus
    the token embedding once more when it also serves as the output head (no ``output.weight``)."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    names = {t.name for t in tensors}
    total = 0
    for t in tensors:
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total


def speed(path: str | os.PathLike, prompt: list[int], gen: int = 128, n_threads: int = 2,
          repeats: int = 1) -> dict[str, float]:
    """Prompt processing (the whole ``prompt`` in one batch) and greedy generation (``gen`` tokens, one at a
    time) tokens/s in llama.cpp; the best of ``repeats`` runs of each."""
    llm = load(path, n_ctx=len(prompt) + gen + 8, n_threads=n_threads, logits_all=False)
    llm.eval(prompt[:8])  # warm-up: first touches of the mmapped weights
    pp, tg = 0.0, 0.0
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp = max(pp, len(prompt) / (time.perf_counter() - t))
        llm.reset()
        n, t = 0, 0.0
        for _tok in llm.generate(prompt[:16], top_k=1, temp=0.0, reset=True):
            n += 1
            if n == 1:
                t = time.perf_counter()  # the first token comes after the 16-token prompt
            elif n == gen + 1:
                break
        tg = max(tg, gen / (time.perf_counter() - t))
    return {"pp_tokens_per_s": pp, "gen_tokens_per_s": tg}


def decode_seconds(llm: Any, tokens: list[int], prefix: int = 16) -> tuple[float, float]:
    """Generation cost without sampling: ``tokens[:prefix]`` in one batch, then every further token decoded one at
    a time (as generation feeds them). Returns (wall seconds, CPU seconds of this process: all its threads) of the
    one-token steps. CPU time barely moves when other processes take the cores, so its ratios are steadier."""
    llm.reset()
    llm.eval(tokens[:prefix])
    wall, cpu = time.perf_counter(), time.process_time()
    for tok in tokens[prefix:]:
        llm.eval([tok])
    return time.perf_counter() - wall, time.process_time() - cpu
