"""Checks on a model directory or GGUF file before anything is loaded: clean errors, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from .adapters import SUPPORTED, adapter_for_type

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def families_text() -> str:
    return ", ".join(SUPPORTED)


def unsupported_type(model_type: str | None, what: str = "") -> UnsupportedModelError:
    """The error for a transformers model whose family modelfold has no adapter for."""
    who = f" ({what})" if what else ""
    if adapter_for_type(model_type) is not None:
        return UnsupportedModelError(
            f"model_type={model_type!r}{who} is a family modelfold folds, but this model's decoder/encoder layers "
            "are not where that family keeps them (a task head that wraps the model differently?). Fold the "
            "family's base model or its *ForCausalLM / *Model class, then re-attach the head.")
    return UnsupportedModelError(
        f"modelfold cannot fold transformers models of model_type={model_type!r}{who}: it recognises the layers of "
        f"these families only: {families_text()}. See docs/families.md; a family with the same layer layout can be "
        "added with a short Family declaration in modelfold/hf/adapters/__init__.py.")


def looks_like_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with transformers files (weights, tokenizer, config) -- even a broken or incomplete one."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = {c.name for c in p.iterdir()}
    return "config.json" in names or bool(names & set(WEIGHT_FILES + _HF_FILES)) or any(
        n.endswith(".safetensors") for n in names)


def is_hf_spec(spec: str) -> bool:
    """True if a command-line model spec names a transformers model: a .gguf file or a model directory."""
    p = Path(spec)
    return spec.endswith(".gguf") or (p.is_dir() and (p / "config.json").is_file()) or looks_like_hf_dir(spec)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict; CheckpointError if missing, unreadable or not a model's."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{p} has no config.json: a Hugging Face model directory needs the config.json it "
                              "was saved with. Copy it from the original model (or re-save the model with "
                              "save_pretrained).")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg} is corrupt (not valid JSON: {e}). Restore it from the original model or "
                              "re-save the model with save_pretrained.") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointError(f"{cfg} does not describe a transformers model (no \"model_type\" entry). Restore "
                              "it from the original model or re-save the model with save_pretrained.")
    return data


def check_known_to_transformers(data: dict[str, Any], cfg: Path) -> None:
    from transformers import CONFIG_MAPPING

    mtype = data["model_type"]
    if mtype not in CONFIG_MAPPING:
        import transformers

        raise UnsupportedModelError(
            f"{cfg} names model_type={mtype!r}, which transformers {transformers.__version__} does not know (custom "
            f"code is not run by modelfold), and modelfold folds only these families: {families_text()}.")


def has_weights(path: str | os.PathLike) -> bool:
    p = Path(path)
    return any((p / n).is_file() for n in WEIGHT_FILES) or any(
        c.suffix in (".safetensors", ".bin") for c in p.iterdir() if c.is_file())


def check_model_dir(path: str | os.PathLike, *, weights: bool = True, foldable: bool = False) -> dict[str, Any]:
    """Validate a model directory: config.json, a model_type transformers knows, weights, and (if
    ``foldable``) a family modelfold folds; with ``weights``, complete safetensors headers. Returns the
    parsed config."""
    p = Path(path)
    check_exists(p)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory holding a transformers model (config.json and weights)")
    data = read_config(p)
    check_known_to_transformers(data, p / "config.json")
    if foldable and adapter_for_type(data["model_type"]) is None:
        raise unsupported_type(data["model_type"], str(p))
    if weights and not has_weights(p):
        found = sorted(c.name for c in p.iterdir())
        raise CheckpointError(f"{p} has a config.json but no weights (expected model.safetensors, a sharded "
                              f"model-*.safetensors with its index, or pytorch_model.bin; found {found[:8]}). Copy "
                              "the weight files next to config.json, or re-save the model with save_pretrained.")
    if weights:
        check_safetensors(p)
    return data


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (header only)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # noqa: BLE001 - gguf raises plain ValueError/KeyError on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                              "truncated or not a GGUF file at all: copy or download it again, or convert the "
                              "original model again") from None


def check_exists(path: str | os.PathLike) -> None:
    """CheckpointError naming the path when nothing is there (a typo, or a file still downloading)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a transformers model directory (config.json and weights) "
                              "or a .gguf file; check the path")


def check_safetensors(path: str | os.PathLike) -> None:
    """Every ``*.safetensors`` file of a model directory has a complete header covering the file (a truncated
    or foreign file is refused before transformers reads it)."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {first[:200]}); it "
                                  "is truncated or corrupt: copy or download it again, or re-save the model with "
                                  "save_pretrained") from None


def check_gguf(path: str | os.PathLike) -> str:
    """Refuse a GGUF file whose architecture transformers cannot dequantize into a model."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)

    def norm(a: str) -> str:
        return a.replace("-", "").replace("_", "").lower()

    if norm(arch) not in {norm(a) for a in GGUF_SUPPORTED_ARCHITECTURES}:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} cannot be loaded (transformers reads GGUF files of these "
            f"architectures only: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}). Fold the original Hugging "
            "Face checkpoint instead.")
    return arch


def check_foldable(path: str | os.PathLike, weights: bool = True) -> None:
    """Before loading anything: ``path`` is a model directory of a family modelfold folds (with its weights),
    or a GGUF file (or a directory holding one) of an architecture transformers reads."""
    p = Path(path)
    check_exists(p)
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() and not (p / "config.json").is_file() else []
    if p.suffix == ".gguf" and p.is_file():
        check_gguf(p)
    elif len(ggufs) == 1:
        check_gguf(ggufs[0])
    else:
        check_model_dir(p, weights=weights, foldable=True)
