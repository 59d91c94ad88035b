"""Language-model evaluation: the shipped Wikipedia text, perplexity windows, embedding cosine.

The text is the 107 English Wikipedia articles shipped inside the ``gensim`` wheel (its test
corpus), cleaned with gensim's ``filter_wiki``. Perplexity is measured on ``windows`` non-overlapping
windows of ``ctx`` tokens spread evenly over the tokenized text (the first window at the start, the
last at the end), each starting with the tokenizer's BOS token when the model family expects one.
The same text, windows and BOS give the numbers of ``benchmarks/llm.py``.

Calibration data must not overlap the evaluation windows: :func:`wiki_split` ("calib") returns the
articles that no evaluation window touches, "eval" the ones they do.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..assets import package_dir
from ..errors import ModelFoldError, UnsupportedModelError
from ..io import atomic_write

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Families trained without a BOS token at the start of a document (their tokenizers may still name one).
NO_BOS_FAMILIES = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
SEPARATOR = "\n\n"
PARSE_VERSION = 1  # bump when _parse changes, so cached articles are parsed again


def _parse(path: Path) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.BZ2File(path) as fh:
        for _title, text, _pid in extract_pages(fh):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            t = filter_wiki(text).replace("'''", "").replace("''", "")
            t = re.sub(r"\n{3,}", "\n\n", t).strip()
            if len(t) > 200:
                out.append(t)
    return out


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    """Parsed once (gensim's wiki markup filter takes ~10 s), then read from ``$MODELFOLD_CACHE/wiki``."""
    path = package_dir("gensim", "gensim==4.4.0") / WIKI_FILE
    if not path.is_file():
        raise ModelFoldError(f"the Wikipedia test corpus is missing from the gensim package ({path}); "
                             "reinstall gensim==4.4.0")
    st = path.stat()
    key = hashlib.sha256(f"{PARSE_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("MODELFOLD_CACHE")
    cached = (Path(root) if root else Path.home() / ".cache" / "modelfold") / "wiki" / f"{key}.json"
    try:
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    out = _parse(path)
    try:
        atomic_write(cached, lambda tmp: Path(tmp).write_text(json.dumps(out), encoding="utf-8"))
    except OSError:  # a read-only home still evaluates, only slower
        pass
    return tuple(out)


def wiki_articles() -> list[str]:
    """The shipped Wikipedia articles (redirects and stubs dropped), in corpus order."""
    return list(_articles())


def wiki_text(split: str = "all", tokenizer: Any = None, ctx: int = 512, windows: int = 12) -> str:
    """The Wikipedia articles joined by blank lines.

    split: ``"all"`` (the text the evaluation windows are placed on), or ``"eval"`` / ``"calib"``: the
    articles of :func:`wiki_split` joined (needs ``tokenizer``; ``ctx``/``windows`` as for perplexity).
    """
    if split == "all":
        return SEPARATOR.join(_articles())
    return SEPARATOR.join(wiki_split(split, tokenizer, ctx=ctx, windows=windows))


def wiki_split(part: str, tokenizer: Any, ctx: int = 512, windows: int = 12, bos: bool | None = True) -> list[str]:
    """Deterministic, disjoint split of the articles around the perplexity windows.

    ``"eval"``: the articles that at least one of the ``windows`` evaluation windows of ``ctx`` tokens
    (as :func:`perplexity` places them on ``wiki_text()`` with this tokenizer) overlaps; ``"calib"``: all
    the others, which share no character with any evaluation window, in corpus order. Needs a fast
    (Rust) tokenizer for the character offsets.
    """
    if part not in ("eval", "calib"):
        raise ModelFoldError(f"part must be 'eval' or 'calib', not {part!r}")
    arts = _articles()
    text = SEPARATOR.join(arts)
    _, spans = _windows(tokenizer, text, ctx, windows, bool(bos), offsets=True)
    touched, start = [], 0
    for a in arts:
        end = start + len(a)
        touched.append(any(s < end and start < e for s, e in spans))
        start = end + len(SEPARATOR)
    return [a for a, t in zip(arts, touched, strict=True) if t == (part == "eval")]


def wiki_sentences(n: int = 50) -> list[str]:
    """The first clean sentence (60-250 characters, no table/markup residue) of each of the first ``n`` articles."""
    out: list[str] = []
    for art in _articles():
        for s in re.split(r"(?<=[.!?])\s+", art):
            s = " ".join(s.split())
            if 60 <= len(s) <= 250 and "|" not in s and "=" not in s:
                out.append(s)
                break
        if len(out) == n:
            break
    return out


def window_starts(n_tokens: int, step: int, windows: int) -> list[int]:
    """Start indices (in tokens) of up to ``windows`` non-overlapping windows of ``step`` tokens, evenly spread.

    Window ``k`` of the ``n_tokens // step`` that fit is picked for ``k = round(i * (total - 1) / (windows - 1))``;
    duplicates (more windows asked than fit) are dropped. Pure arithmetic: identical on every run.
    """
    total = n_tokens // step
    if total < 1:
        raise ModelFoldError(f"the text has {n_tokens} tokens, fewer than one window of {step}; use a longer "
                             "text or a smaller --ctx")
    if windows < 1:
        raise ModelFoldError(f"windows must be at least 1, not {windows}")
    picks = sorted({round(i * (total - 1) / max(windows - 1, 1)) for i in range(windows)})
    return [p * step for p in picks]


def _windows(tokenizer: Any, text: str, ctx: int, windows: int, bos: bool,
             offsets: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    if ctx < 2:
        raise ModelFoldError(f"ctx must be at least 2 tokens, not {ctx}")
    if bos and tokenizer.bos_token_id is None:
        raise ModelFoldError("bos=True but the tokenizer has no BOS token; pass bos=False")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
    except NotImplementedError as e:
        raise ModelFoldError("splitting the text around the evaluation windows needs character offsets, which "
                             "only fast tokenizers give; load the tokenizer with use_fast=True") from e
    ids = enc["input_ids"]
    step = ctx - 1 if bos else ctx
    prefix = [tokenizer.bos_token_id] if bos else []
    starts = window_starts(len(ids), step, windows)
    wins = torch.tensor([prefix + ids[s:s + step] for s in starts])
    spans = [(enc["offset_mapping"][s][0], enc["offset_mapping"][s + step - 1][1]) for s in starts] if offsets else []
    return wins, spans


def expects_bos(model: nn.Module | None, tokenizer: Any) -> bool:
    """Whether evaluation windows start with BOS: the tokenizer names one and the family was trained with it."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    return tokenizer.bos_token_id is not None and family not in NO_BOS_FAMILIES


def eval_windows(tokenizer: Any, text: str | None = None, ctx: int = 512, windows: int = 12,
                 bos: bool = True) -> torch.Tensor:
    """The (windows, ctx) token ids :func:`perplexity` evaluates (fewer rows if fewer windows fit).

    With ``bos`` each row is BOS + ``ctx - 1`` text tokens, else ``ctx`` text tokens; ``text`` defaults
    to :func:`wiki_text`.
    """
    return _windows(tokenizer, wiki_text() if text is None else text, ctx, windows, bos)[0]


def _context_limit(model: nn.Module) -> int | None:
    """The model's maximum context length; refuses models that are not causal LMs."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        raise UnsupportedModelError(f"perplexity needs a causal language model (…ForCausalLM); "
                                    f"{type(model).__name__} is not one. Compare an encoder's embeddings with "
                                    "embedding_cosine (CLI: modelfold eval MODEL --compare ORIGINAL)")
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def window_nll(model: nn.Module, wins: torch.Tensor, progress: bool = False) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every token after the first of each row, and their count."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for w in tqdm(wins, desc="perplexity", unit="window", disable=not progress, leave=False):
            w = w.to(device)
            logits = model(w[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += w.numel() - 1
    finally:
        model.train(was_training)
    return nll, count


def perplexity(model: nn.Module, tokenizer: Any, text: str | None = None, ctx: int = 512, windows: int = 12,
               progress: bool = False, bos: bool | None = None) -> float:
    """Perplexity ``exp(mean NLL)`` of a causal LM on ``windows`` windows of ``ctx`` tokens of ``text``.

    text: defaults to the shipped Wikipedia text (:func:`wiki_text`). bos: start each window with the
    tokenizer's BOS (``None``: when the family expects one, :func:`expects_bos`). Deterministic.
    """
    limit = _context_limit(model)
    if limit is not None and ctx > limit:
        raise ModelFoldError(f"ctx {ctx} exceeds the model's context length {limit}; pass a smaller ctx")
    use_bos = expects_bos(model, tokenizer) if bos is None else bos
    wins = eval_windows(tokenizer, text, ctx=ctx, windows=windows, bos=use_bos)
    nll, count = window_nll(model, wins, progress=progress)
    return math.exp(nll / count)


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str] | None = None,
                        max_length: int = 128) -> torch.Tensor:
    """L2-normalized mean-pooled last hidden states, one row per sentence (default :func:`wiki_sentences`)."""
    sentences = list(wiki_sentences() if sentences is None else sentences)
    if not sentences:
        raise ModelFoldError("no sentences to embed")
    if tokenizer.pad_token_id is None:
        raise ModelFoldError("the tokenizer has no padding token; set tokenizer.pad_token first")
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        out = model(**batch, output_hidden_states=True)
    finally:
        model.train(was_training)
    h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
    mask = batch["attention_mask"][..., None].to(h.dtype)
    return torch.nn.functional.normalize(((h * mask).sum(1) / mask.sum(1)).float(), dim=-1)


def embedding_cosines(model_a: nn.Module, model_b: nn.Module, tokenizer: Any,
                      sentences: Sequence[str] | None = None, max_length: int = 128) -> torch.Tensor:
    """Per-sentence cosine similarity of the mean-pooled embeddings of two models (same tokenizer)."""
    a = sentence_embeddings(model_a, tokenizer, sentences, max_length)
    b = sentence_embeddings(model_b, tokenizer, sentences, max_length)
    if a.shape != b.shape:
        raise ModelFoldError(f"the models' embeddings differ in width ({a.shape[1]} vs {b.shape[1]}); compare "
                             "a folded model with its own original")
    return (a * b).sum(-1)


def embedding_cosine(model_a: nn.Module, model_b: nn.Module, tokenizer: Any,
                     sentences: Sequence[str] | None = None, max_length: int = 128) -> float:
    """Mean cosine similarity of the two models' sentence embeddings (1.0: identical directions)."""
    return float(embedding_cosines(model_a, model_b, tokenizer, sentences, max_length).mean())
