"""Saving and loading folded transformers models (uniform and per-layer sizes), and GGUF files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ModelFoldError
from .adapters import find_adapter
from .runcheck import check_model_runs


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a transformers ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty directory that is not a model (it would be lost)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose another --out path")
    if out.is_dir() and any(out.iterdir()) and not is_hf_dir(out):
        raise CheckpointError(f"{out} is a non-empty directory that does not hold a model (no config.json); it "
                              "would be replaced as a whole, so choose another --out path or empty it first")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``; an existing ``out`` is replaced only if that works."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, what: str = "the model") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` in one rename.

    An existing ``out_dir`` is replaced only after the new copy was written completely; on any
    failure it is left as it was, the temporary directory is removed and a CheckpointError is raised.
    """
    out = Path(out_dir).resolve()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ModelFoldError) or not isinstance(e, Exception):
            raise
        raise CheckpointError(f"could not save {what} to {out}: {type(e).__name__}: {e}. "
                              "Any previous content there is unchanged; check disk space and permissions.") from e


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *, verify: bool = True) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place (``atomic_dir``).

    verify: a model of a supported family first runs one forward on a (2, 8) batch of token ids; one
    that cannot run raises ``ResultError`` and nothing is written (False skips the check). The directory
    the model was loaded from is refused (``CheckpointError``): the original is never replaced.
    """
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if source and Path(source).is_dir() and Path(source).resolve() == Path(out_dir).resolve():
        raise CheckpointError(f"{Path(out_dir).resolve()} is the directory the model was loaded from: saving there "
                              "would replace the original weights; choose another out_dir")
    if verify and find_adapter(model) is not None:
        check_model_runs(model, what="the model to save")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir).resolve()


def model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
        if arch.endswith("ForCausalLM"):
            return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has no model.safetensors; save the model with modelfold.hf.save()")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return sd


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a (folded) transformers directory, including per-layer sizes recorded by modelfold.

    Uniformly folded models are plain checkpoints (vanilla ``from_pretrained``). Non-uniform ones carry
    ``config.modelfold_layers``: the model is built from the config, each layer's projections are
    resized to the recorded sizes, then the saved weights are loaded strictly.
    """
    from transformers import AutoConfig

    from .validate import check_model_dir

    path = Path(path)
    check_model_dir(path)  # config.json readable, a model_type transformers knows, complete weight files
    try:
        return _load_pretrained(path, AutoConfig.from_pretrained(path), **kwargs)
    except (ModelFoldError, TypeError):  # TypeError: a keyword argument from_pretrained does not take
        raise
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise OSError, ValueError, RuntimeError ...
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(f"cannot load the model in {path} ({type(e).__name__}: {first[:300]}); its files are "
                              "corrupt or do not match config.json: copy them again, or re-save the model with "
                              "save_pretrained") from e


def _load_pretrained(path: Path, config: Any, **kwargs: Any) -> nn.Module:
    cls = model_class(config)
    layers = getattr(config, "modelfold_layers", None)
    if not layers:
        return cls.from_pretrained(path, **kwargs).eval()
    # Build exactly as vanilla from_pretrained does (same heads, tying, dtype); the layers whose sizes
    # differ from the config are re-created at their recorded sizes and filled from the checkpoint.
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    adapter = find_adapter(model)
    if adapter is None or len(adapter.layers(model)) != len(layers):
        raise CheckpointError(f"{path}: config.modelfold_layers does not match a supported model layout")
    for i, sizes in enumerate(layers):
        adapter.resize(model, i, sizes)
    resized = {id(p) for i in range(len(layers)) for p in adapter.layers(model)[i].parameters()}
    from .convert import to_model

    sd = to_model(model, _state_dict(path))  # checkpoint layout -> the model's (stacked MoE experts, prefixes)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in missing if k in params and id(params[k]) in resized]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recorded layer sizes (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); the directory may be corrupt")
    return model.eval()


def find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def load_any(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a transformers directory (via ``load_pretrained``) or a ``.gguf`` file (dequantized)."""
    from .validate import check_exists, check_gguf, looks_like_hf_dir

    path = Path(path)
    check_exists(path)
    if is_hf_dir(path) or (looks_like_hf_dir(path) and find_gguf(path) is None):
        return load_pretrained(path)
    g = find_gguf(path)
    if g is None:
        raise CheckpointError(f"{path} is neither a transformers directory (config.json) nor a .gguf file "
                              "(or a directory holding exactly one)")
    from transformers import AutoModelForCausalLM

    from .gguf.write import check_readable

    check_gguf(g)  # an architecture transformers can dequantize, else a clean refusal
    check_readable(g)  # no per-layer size arrays (a non-uniform fold written for llama.cpp)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=dtype)
    drop_gguf_quantizer(model)
    return model.eval()


def drop_gguf_quantizer(model: nn.Module) -> None:
    """Forget the GGUF "quantizer" of a model loaded from a .gguf file.

    transformers dequantizes GGUF tensors on load (the model holds plain dense weights) but keeps the
    quantizer object, which makes ``save_pretrained`` refuse to write the model.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is not None and type(q).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)


#: files one of which a saved tokenizer has (fast, sentencepiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored with a transformers directory or a ``.gguf`` file (CheckpointError if none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    g = None if is_hf_dir(path) else find_gguf(path)
    if not is_hf_dir(path) and g is None:
        raise CheckpointError(f"no tokenizer found at {path}: it is neither a transformers directory nor a .gguf file")
    if g is None and not any((path / n).is_file() for n in TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer (special tokens only) from config.json alone
        raise CheckpointError(f"no usable tokenizer at {path}: none of its files ({', '.join(TOKENIZER_FILES[:3])}, "
                              "...) is there. Copy the tokenizer files of the original model into the directory; "
                              "folding never changes the tokenizer.")
    try:
        if g is None:
            return AutoTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/TypeError here
        raise CheckpointError(
            f"no usable tokenizer at {path} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
            "Copy the tokenizer files of the original model (tokenizer.json, tokenizer_config.json, ...) into the "
            "directory; folding never changes the tokenizer.") from None
