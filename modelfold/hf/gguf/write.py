"""Write a (folded) transformers causal LM as a GGUF file for llama.cpp / ollama / transformers.

Tensor names come from the ``gguf`` package's name map (``gguf.get_tensor_name_map``), tensors are
quantized by ``gguf.quants``, and Q/K rows are permuted into llama.cpp's RoPE layout for the llama
architecture (transformers un-permutes them on load). With ``source=`` (the GGUF the model was loaded
from) every metadata field is copied (tokenizer, chat template, names), except the sizes that
folding changes, which are re-derived from the tensors.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...errors import CheckpointError, InvalidWeightsError, ModelFoldError, UnsupportedModelError
from ...io import atomic_write
from ..runcheck import check_model_runs
from .layers import PER_LAYER, choose_arch, gguf_tensors, pad_ffn

#: transformers ``model_type`` -> GGUF architecture (llama.cpp runs Mistral as ``llama``). Per-layer sizes go to
#: ``layers.PER_LAYER`` instead (``deci`` for llama/mistral/qwen2, ``openelm`` for qwen3).
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: Output types: names accepted by ``save_gguf(dtype=...)`` / ``--gguf-type``.
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass
class GGUFInfo:
    """What ``save_gguf`` wrote: tensor types and the tensors that could not take the asked type."""

    path: Path
    types: Counter = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    arch: str = ""
    #: layer -> (FFN width, width written): zero neurons added so that rows split into quantization blocks
    padded: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        size = self.path.stat().st_size / 2**20
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        s = f"wrote {self.path} ({size:.1f} MiB, architecture {self.arch}; tensors: {types})"
        if self.arch in PER_LAYER.values():
            s += f"\n  per-layer sizes: llama.cpp's {self.arch} architecture (transformers cannot load this file)"
        if self.padded:
            pads = ", ".join(f"{i}: {a}->{b}" for i, (a, b) in list(self.padded.items())[:4])
            s += (f"\n  FFN widths padded with zero neurons to the 32-value quantization block in {len(self.padded)} "
                  f"layers ({pads}{' ...' if len(self.padded) > 4 else ''}; same outputs; compress with "
                  "--round-to 32 to avoid them)")
        if self.fallbacks:
            s += (f"\n  {len(self.fallbacks)} tensors kept at a wider type, their rows do not split into the "
                  f"quantization blocks: {', '.join(self.fallbacks[:4])}{' ...' if len(self.fallbacks) > 4 else ''}")
        return s


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def _writable(qtype: Any) -> bool:
    """True if ``gguf.quants`` can produce ``qtype`` in numpy."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype in (T.F32, T.F16):
        return True
    cls = quants._type_traits.get(qtype)  # noqa: SLF001 - the package's own registry of numpy quantizers
    return cls is not None and "quantize_blocks" in vars(cls)


def _sizes(sd: dict[str, torch.Tensor], n_layers: int, head_dim: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"ffn": [], "heads": [], "kv_heads": []}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        try:
            out["ffn"].append(sd[p + "mlp.down_proj.weight"].shape[1])
            out["heads"].append(sd[p + "self_attn.q_proj.weight"].shape[0] // head_dim)
            out["kv_heads"].append(sd[p + "self_attn.k_proj.weight"].shape[0] // head_dim)
        except KeyError as e:
            raise UnsupportedModelError(f"layer {i} has no {e.args[0]}: not a llama-style decoder layout") from None
    return out


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _hparams(model: nn.Module, arch: str, sizes: dict[str, list[int]], head_dim: int) -> dict[str, Any]:
    """Architecture key (without the ``arch.`` prefix) -> value, every size taken from the tensors."""
    c = model.config
    arrays = arch in PER_LAYER.values()
    per_layer = {k: (list(v) if arrays else v[0]) for k, v in sizes.items()}  # one number when uniform
    hp: dict[str, Any] = {
        "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": per_layer["ffn"],
        "attention.head_count": per_layer["heads"], "attention.head_count_kv": per_layer["kv_heads"],
        "rope.dimension_count": head_dim, "rope.freq_base": _rope_theta(c),
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size,
    }
    if arrays or head_dim * max(sizes["heads"]) != c.hidden_size or head_dim * min(sizes["heads"]) != c.hidden_size:
        hp["attention.key_length"] = hp["attention.value_length"] = head_dim
    return hp


def _check(model: nn.Module, source: Path | None) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHES:
        raise UnsupportedModelError(f"writing GGUF supports the model types {', '.join(ARCHES)}, not {mt!r}; save "
                                    "a transformers directory instead (--out DIR)")
    rope = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default" and source is None:
        raise UnsupportedModelError(f"rope scaling {rope!r} is only written when folding from a GGUF file that "
                                    "carries it (pass source=)")
    return ARCHES[mt]


def check_readable(path: str | os.PathLike) -> None:
    """Refuse, before transformers does with a raw error, a GGUF with per-layer sizes (a non-uniform plan)."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not usable
        raise CheckpointError(f"cannot read the GGUF file {path}: {type(e).__name__}: {e}") from None
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
    keys = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
    per_layer = [k for k in keys if isinstance(getattr(fields.get(f"{arch}.{k}"), "contents", lambda: 0)(), list)]
    if per_layer:
        raise UnsupportedModelError(f"{path} has per-layer sizes ({', '.join(per_layer)} are arrays: a non-uniform "
                                    "plan, llama.cpp's deci/openelm), which transformers' GGUF loader cannot read; "
                                    "run it with llama.cpp (modelfold eval FILE --runtime llama.cpp), or compress "
                                    "the original again with --out DIR (a transformers directory keeps per-layer "
                                    "sizes)")


def _metadata(writer: Any, reader: Any, arch: str, hp: dict[str, Any], model: nn.Module) -> None:
    from gguf import GGUFValueType, Keys

    derived = {f"{arch}.{k}" for k in hp} | {f"{arch}.attention.key_length", f"{arch}.attention.value_length"}
    skip = derived | {Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
    if reader is not None:
        src_arch = reader.fields["general.architecture"].contents()
        for f in reader.fields.values():
            # the source's architecture keys (llama.rope..., qwen3.context_length) under the written architecture
            name = f"{arch}.{f.name[len(src_arch) + 1:]}" if f.name.startswith(f"{src_arch}.") else f.name
            if f.name.startswith("GGUF.") or name in skip:
                continue
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    else:
        name = model.config.name_or_path or f"modelfold {model.config.model_type}"
        writer.add_name(str(name))
        writer.add_tokenizer_model("no_vocab")  # model only: llama.cpp takes token ids, not text
    for k, v in hp.items():
        key = f"{arch}.{k}"
        if isinstance(v, float):
            writer.add_key_value(key, v, GGUFValueType.FLOAT32)
        elif isinstance(v, list):  # per-layer sizes
            writer.add_key_value(key, [int(x) for x in v], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
        else:
            writer.add_key_value(key, int(v), GGUFValueType.UINT32)


def _check_complete(tmp: str, path: Path, n_tensors: int) -> None:
    """The file just written holds every tensor completely: numpy's ``tofile`` (used by the gguf package)
    can stop short at a full disk or a file-size limit without raising."""
    import gguf

    size = os.path.getsize(tmp)
    try:
        reader = gguf.GGUFReader(tmp)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        complete = len(reader.tensors) == n_tensors and end <= size
    except Exception:  # noqa: BLE001 - a truncated file fails to parse
        complete = False
    if not complete:
        raise CheckpointError(f"could not write {path}: the file came out incomplete ({size} bytes): the disk is "
                              "full or a file-size limit was hit. Free some space and run again; nothing was "
                              "written there")


def _read_source(source: Path | None, model: nn.Module, arch: str, dtype: str) -> Any:
    """The source GGUF's reader (its metadata and tensor types travel), checked against the model; or None."""
    import gguf

    if source is None:
        if dtype == "source":
            raise ModelFoldError("dtype='source' needs source= (the GGUF file the model was loaded from)")
        return None
    try:
        reader = gguf.GGUFReader(source)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not usable
        raise CheckpointError(f"cannot read the source GGUF {source}: {type(e).__name__}: {e}; pass the intact "
                              "GGUF file the model was loaded from, or no source") from None
    src_arch = reader.fields["general.architecture"].contents()
    if src_arch != arch and not (src_arch == PER_LAYER.get(model.config.model_type)):
        raise CheckpointError(f"{source} is a {src_arch!r} GGUF but the model is {arch!r}")
    return reader


def _check_finite(sd: dict[str, torch.Tensor]) -> None:
    for key, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidWeightsError(f"tensor {key} holds NaN or Inf values; a GGUF file of them would not run (a "
                                      "quantized block with one NaN loses all its values). Reload or repair the "
                                      "model's weights before writing it; nothing was written")


def _add_tensors(writer: Any, tensors: Any, want_type: Any, reader: Any, info: GGUFInfo) -> tuple[set[str], bool]:
    """Add every tensor in its type (F16 where its rows do not split into the type's blocks) and the source's
    extra tensors (e.g. rope_freqs); returns (names written, whether any was quantized)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    written: set[str] = set()
    quantized = False
    for _key, gname, data in tensors:
        want = want_type(gname, data.ndim)
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
            info.fallbacks.append(gname)
            want = T.F16
        if want == T.F32:
            out = data
        elif want == T.F16:
            out = data.astype(np.float16)
        else:
            out = gguf.quants.quantize(data, want)
            quantized = quantized or want != T.BF16
        writer.add_tensor(gname, out, raw_dtype=want)
        info.types[want.name] += 1
        written.add(gname)
    for rt in reader.tensors if reader is not None else ():
        if rt.name not in written and not rt.name.startswith(("blk.", "output")):  # e.g. rope_freqs
            writer.add_tensor(rt.name, rt.data, raw_shape=rt.data.shape, raw_dtype=rt.tensor_type)
            info.copied.append(rt.name)
            info.types[rt.tensor_type.name] += 1
    return written, quantized


def _pad(sd: dict, c: Any, sizes: Any, head_dim: int, arch: str, want_type: Any, info: GGUFInfo) -> tuple[Any, str]:
    """FFN widths padded with zero neurons to the quantization block of each layer's type (same outputs)."""
    import gguf

    blocks = {i: gguf.GGML_QUANT_SIZES[want_type(f"blk.{i}.ffn_down.weight", 2)][0] for i in range(c.num_hidden_layers)}
    info.padded = pad_ffn(sd, c.num_hidden_layers, blocks)
    if info.padded:
        sizes = _sizes(sd, c.num_hidden_layers, head_dim)
        arch = info.arch = choose_arch(c, sizes, head_dim, sd, arch)
    return sizes, arch


def _file_type(writer: Any, dtype: str, reader: Any) -> None:
    import gguf

    ftype = {"source": None, "f32": "ALL_F32"}.get(dtype, f"MOSTLY_{dtype.upper()}")
    if ftype is None and reader is not None and "general.file_type" in reader.fields:
        writer.add_file_type(int(reader.fields["general.file_type"].contents()))
    elif ftype is not None:
        writer.add_file_type(int(gguf.LlamaFileType[ftype]))


def save_gguf(model: nn.Module, path: str | os.PathLike, dtype: str = "f16", source: str | os.PathLike | None = None,
              progress: bool = False, verify: bool = True, pad: bool = True) -> GGUFInfo:
    """Write ``model`` (a llama/mistral/qwen2/qwen3 causal LM, folded or not) to a GGUF file, atomically.

    dtype: one of :data:`TYPES` for every matrix, or ``"source"``: each tensor in the type it has in
    ``source`` (where ``gguf.quants`` can write it, else Q8_0). 1-D tensors (norms, biases) stay F32, as
    llama.cpp writes them. Quantized types need rows that split into 32-value blocks (``layers.ROUND_TO``):
    with ``pad=True`` an FFN width that is not a multiple of 32 gets zero neurons (the same outputs; listed in
    ``GGUFInfo.padded``; compress with ``round_to=32`` to avoid them); any other matrix whose rows do not split
    (or every one, with ``pad=False``) is written as F16 and listed in ``GGUFInfo.fallbacks``.
    source: the GGUF the model was loaded from; its metadata (tokenizer, chat template) is carried over.
    Without it the file has no vocabulary (llama.cpp then evaluates token ids, not text).
    Per-layer sizes (a non-uniform plan: ``compress``'s automatic budget) are written as llama.cpp's ``deci``
    architecture (llama, mistral, qwen2) or ``openelm`` (qwen3 with tied embeddings), which only llama.cpp loads;
    other cases raise ``UnsupportedModelError`` naming why.
    verify: the model first runs one forward on a few token ids (transformers, its own class); one that
    cannot run raises ``ResultError`` and nothing is written (False skips the check).
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    source = None if source is None else Path(source)
    if source is not None and Path(path).resolve() == source.resolve():
        raise CheckpointError(f"the output {path} is the source GGUF {source}; the input is never overwritten: "
                              "write to another path")
    arch = _check(model, source)
    if dtype != "source" and dtype not in TYPES:
        raise ModelFoldError(f"unknown GGUF type {dtype!r}; use one of {', '.join(TYPES)} or 'source'")
    reader = _read_source(source, model, arch, dtype)
    src_types = {t.name: t.tensor_type for t in reader.tensors} if reader is not None else {}
    if verify:
        check_model_runs(model, what="the model to write as GGUF")

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and c.tie_word_embeddings)}
    _check_finite(sd)
    sizes = _sizes(sd, c.num_hidden_layers, head_dim)
    arch = choose_arch(c, sizes, head_dim, sd, arch)

    def want_type(gname: str, ndim: int) -> Any:
        if ndim == 1:
            return T.F32
        src = src_types.get(gname) or src_types.get(gname.replace(".attn_qkv.", ".attn_q."), T.F16)
        want = _qtype(dtype) if dtype != "source" else src
        return want if _writable(want) else T.Q8_0

    info = GGUFInfo(path=Path(path).resolve(), arch=arch)
    if pad:
        sizes, arch = _pad(sd, c, sizes, head_dim, arch, want_type, info)
    hp = _hparams(model, arch, sizes, head_dim)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    path = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, reader, arch, hp, model)
        written, quantized = _add_tensors(writer, gguf_tensors(sd, arch, sizes, names), want_type, reader, info)
        _file_type(writer, dtype, reader)
        if quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        for f in writer.fout or ():  # a full disk shows at the latest here
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        _check_complete(tmp, path, len(written) + len(info.copied))

    try:
        atomic_write(path, write)
    except ModelFoldError:
        raise
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e}; nothing was written there") from None
    return info
