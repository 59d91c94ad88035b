"""Calibration data: what the model makes itself (``"self"``), or what the user gives.

* Causal LMs: sequences sampled from the model itself, starting at its BOS token (temperature 1,
  no top-k/top-p), seeded and cached on disk per model hash and settings, like Fold-DIR's batch.
* Encoders (BERT-style, no generative head): sequences of random whole-word tokens of the model's
  own vocabulary between [CLS] and [SEP] (an encoder cannot write text; see docs/calibration.md
  for what this recovers against real text).
* CNNs: the DeepInversion batch (``modelfold.repair.dir``), see docs/calibration-cnn.md.

User data for transformers: a LongTensor of token ids (n, L), or a list of strings together with
``tokenizer=`` (split into ``seq_len`` token chunks).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ... import cache as caches
from ...cache import model_hash
from ...checks import check_weights
from ...device import model_device
from ...errors import CalibrationError

#: Default self-made text of a causal LM: 16 sequences x 256 tokens. The same 4,096 tokens as 8 x 512 in half
#: the sampling steps (a step reads every weight once, whatever the batch): SmolLM2-135M at 18%, 12 windows,
#: perplexity 34.64 against 37.31 with 8 x 512 (one seed each), sampling 255 steps instead of 511.
SELF_SHAPE = (16, 256)


def cache_dir() -> Path:
    """``$MODELFOLD_CACHE/calib`` (default ``~/.cache/modelfold/calib``)."""
    return caches.cache_dir("calib")


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")


def self_text(model: nn.Module, n_seq: int = SELF_SHAPE[0], seq_len: int = SELF_SHAPE[1], *, seed: int = 0, temperature: float = 1.0,
              use_cache: bool = True, progress: bool = False, info: dict[str, Any] | None = None
              ) -> torch.Tensor:
    """(n_seq, seq_len) token ids sampled from the causal LM ``model`` itself, from its BOS token.

    Seeded; cached on disk per (model fingerprint, settings). ``info`` receives ``source``
    ("cache" or "sampled") and ``seconds``.
    """
    if not is_causal_lm(model):
        raise CalibrationError(f"self-generated text needs a causal LM; {type(model).__name__} cannot generate. "
                               "Encoders use calibration='self' through random_words(); or pass token ids")
    if n_seq < 1 or seq_len < 2:
        raise CalibrationError(f"need n_seq >= 1 and seq_len >= 2, got {n_seq} x {seq_len}")
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
    if bos is None:
        raise CalibrationError(f"{type(model).__name__} has no bos_token_id to start sampling from; pass "
                               "calibration token ids (or text with tokenizer=) instead")
    check_weights(model)  # NaN/Inf weights: a clear error, not torch.multinomial's on the probabilities
    t0 = time.perf_counter()
    key = f"text-{model_hash(model, sampled=True)}-{n_seq}x{seq_len}-s{seed}-t{temperature}"
    path = cache_dir() / f"{key}.pt"
    if use_cache and path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
            if ids.shape == (n_seq, seq_len):
                if info is not None:
                    info.update(source="cache", seconds=time.perf_counter() - t0)
                return ids
        except Exception:  # noqa: BLE001 - a corrupt cache entry is regenerated
            pass
    from tqdm.auto import tqdm

    dev = model_device(model)  # the sampling draws from that device's generator: seeded here, restored after
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        bar = tqdm(total=seq_len - 1, desc=f"sampling {n_seq} calibration sequences", disable=not progress,
                   leave=False)
        out = sample(model, int(bos), n_seq, seq_len, temperature, step=lambda: bar.update(1))
        bar.close()
    ids = out.cpu()
    if use_cache:
        _store(ids, path)
    if info is not None:
        info.update(source="sampled", seconds=time.perf_counter() - t0)
    return ids


def eos_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence token ids of ``model`` (generation config first, then the model config)."""
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return []


def sample(model: nn.Module, bos: int, n_seq: int, seq_len: int, temperature: float = 1.0,
           step: Any = None) -> torch.Tensor:
    """(n_seq, seq_len) ids: ``bos`` then tokens drawn one step at a time for all sequences at once, each
    step one forward of the new tokens against the model's KV cache; end-of-sequence tokens are never
    drawn (every sequence runs to ``seq_len``). Draws from torch's current generator: the same tokens as
    ``model.generate(do_sample=True, top_k=0, top_p=1.0, min_new_tokens=seq_len - 1)`` from the same seed
    (tested), without its per-step bookkeeping."""
    from transformers import DynamicCache

    dev = model_device(model)
    ids = torch.full((n_seq, seq_len), bos, dtype=torch.long, device=dev)
    eos = [e for e in eos_ids(model) if 0 <= e < model.get_input_embeddings().num_embeddings]
    cache = DynamicCache(config=model.config)
    for t in range(seq_len - 1):
        logits = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
        if temperature != 1.0:
            logits = logits / temperature
        if eos:
            logits[:, eos] = -float("inf")
        ids[:, t + 1] = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]
        if step is not None:
            step()
    return ids


def _store(ids: torch.Tensor, path: Path) -> None:
    """Cache ``ids`` at ``path`` atomically; the cache is an optimisation, so a full disk or a read-only
    cache directory only warns (and leaves no temporary file)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        torch.save(ids, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"calibration cache not written ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "it is sampled again next time", stacklevel=3)


def random_words(tokenizer: Any, n_seq: int = 128, seq_len: int = 32, *, seed: int = 0) -> torch.Tensor:
    """(n_seq, seq_len) ids: [CLS] + random whole-word alphabetic vocabulary tokens + [SEP]."""
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items() if t.isalpha() and t.isascii() and len(t) > 1)
    if not words:
        raise CalibrationError("the tokenizer's vocabulary has no whole-word tokens to sample from; pass "
                               "calibration text (with tokenizer=) or token ids instead of 'self'")
    gen = torch.Generator().manual_seed(seed)
    table = torch.tensor(words, dtype=torch.long, device="cpu")
    body = table[torch.randint(len(words), (n_seq, seq_len - 2), generator=gen, device="cpu")]
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls is None or sep is None:
        raise CalibrationError("the tokenizer has no [CLS]/[SEP] (or BOS/EOS) tokens")
    return torch.cat([torch.full((n_seq, 1), cls, device="cpu"), body, torch.full((n_seq, 1), sep, device="cpu")], 1)


def text_ids(tokenizer: Any, texts: Sequence[str], n_seq: int, seq_len: int, *, bos: bool = True) -> torch.Tensor:
    """Tokenize ``texts`` as one stream and cut ``n_seq`` chunks of ``seq_len`` ids (BOS first if ``bos``)."""
    if tokenizer is None:
        raise CalibrationError("calibration text needs tokenizer=; or pass token ids as a LongTensor")
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    b = getattr(tokenizer, "bos_token_id", None) if bos else None
    body = seq_len - (1 if b is not None else 0)
    if len(stream) < n_seq * body:
        raise CalibrationError(f"calibration text has {len(stream)} tokens; {n_seq} x {seq_len} need "
                               f"{n_seq * body}: give more text or fewer/shorter sequences")
    rows = [stream[i * body:(i + 1) * body] for i in range(n_seq)]
    ids = torch.tensor(rows, dtype=torch.long, device="cpu")
    if b is not None:
        ids = torch.cat([torch.full((n_seq, 1), int(b), device="cpu"), ids], 1)
    return ids


def resolve(model: nn.Module, calibration: Any, tokenizer: Any = None, *, n_seq: int | None = None,
            seq_len: int | None = None, seed: int = 0, progress: bool = False,
            info: dict[str, Any] | None = None) -> torch.Tensor:
    """Token ids (n, L) for ``calibration``: "self", a LongTensor of ids, or a list of strings."""
    if isinstance(calibration, str) and calibration == "self":
        if is_causal_lm(model):
            return self_text(model, n_seq or SELF_SHAPE[0], seq_len or SELF_SHAPE[1], seed=seed, progress=progress,
                             info=info)
        if tokenizer is None:
            raise CalibrationError(f"calibration='self' for the encoder {type(model).__name__} needs tokenizer= "
                                   "(random whole-word sequences are drawn from its vocabulary; on the command line: "
                                   "the tokenizer files beside the model), or pass token ids")
        if info is not None:
            info.update(source="random-words")
        return random_words(tokenizer, n_seq or 128, seq_len or 32, seed=seed)
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32) or calibration.ndim != 2 or calibration.numel() == 0:
            raise CalibrationError(f"calibration token ids must be a non-empty 2-D integer tensor (n, L); got "
                                   f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        vocab = model.get_input_embeddings().num_embeddings
        if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
            raise CalibrationError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
        if info is not None:
            info.update(source="data")
        return calibration.long()
    if isinstance(calibration, Sequence) and not isinstance(calibration, str) and calibration \
            and all(isinstance(t, str) for t in calibration):
        if info is not None:
            info.update(source="data")
        return text_ids(tokenizer, calibration, n_seq or 8, seq_len or 512, bos=is_causal_lm(model))
    if isinstance(calibration, Sequence) and not isinstance(calibration, str) and not calibration:
        raise CalibrationError("calibration= is an empty list: give texts (with tokenizer=), a LongTensor of token "
                               "ids (n, L), or 'self'")
    raise CalibrationError(f"calibration={calibration!r:.60} is not understood: use 'self', a LongTensor of token "
                           "ids (n, L), or a list of strings with tokenizer=")
