"""Bad input on the calibrated and GGUF paths, through the CLI and the API (issue 17, part 5).

Every case must end in a modelfold error (a ModelFoldError subclass; the CLI: exit code 2 and one
line ``modelfold: error: ...``, no traceback) whose message names the problem and the way out;
nothing may appear at the output path or beside it (no partial file, no temporary debris) and every
input file must keep its bytes. A full disk is a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored)
set in a subprocess: no root, no tmpfs.

``scripts/bad_input_table.py`` runs the same table and prints what each case got (docs/errors.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
for _p in (HERE / "hf", HERE / "evaluate"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

import modelfold  # noqa: E402
import modelfold.errors as errors  # noqa: E402
import modelfold.hf as mh  # noqa: E402
from modelfold.errors import (  # noqa: E402
    CalibrationError,
    CheckpointError,
    InvalidRatioError,
    InvalidWeightsError,
    ModelFoldError,
)

CALIB = ("--n-calib", "2", "--calib-len", "8")  # 'self' calibration kept tiny


# --------------------------------------------------------------------------------------------- inputs
def build_assets(root: Path) -> Path:
    """The pristine inputs every case copies from: tiny random models, a GGUF file, token ids."""
    from hf_models import make_model
    from tiny import byte_tokenizer, tiny_llama

    import modelfold.hf as hf

    root.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stderr(io.StringIO()):
        llama = make_model("llama", layers=2)
        llama.save_pretrained(root / "llama")  # no tokenizer
        tiny_llama().save_pretrained(root / "llama_tok")
        byte_tokenizer().save_pretrained(root / "llama_tok")
        make_model("bert", layers=2).save_pretrained(root / "bert")  # an encoder without its tokenizer
        hf.save_gguf(llama, root / "llama.gguf", dtype="f32")
    torch.save(torch.randint(3, 58, (2, 8), generator=torch.Generator().manual_seed(0)), root / "ids.pt")
    from nets import VGGish, randomize_bn

    torch.manual_seed(0)
    torch.save(randomize_bn(VGGish(4)).eval(), root / "cnn.pt")  # a CNN: compress = calibrated selection
    torch.save(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)), root / "x.pt")
    return root


def _copy(assets: Path, work: Path, *names: str) -> None:
    for n in names:
        src = assets / n
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / n)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _poison(d: Path, value: float) -> None:
    """One NaN/Inf in layer 0's MLP of the safetensors file in ``d``."""
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = value
    save_file(sd, str(f), metadata={"format": "pt"})


def _poisoned_model(work: Path, value: float = float("nan")) -> torch.nn.Module:
    m = mh.load_any(work / "llama")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = value
    return m


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    what: str  # the bad input, for the table
    surface: str  # "cli" or "api"
    inputs: tuple[str, ...]  # copied from the assets into the case's folder
    run: Callable[[Path], Any]  # cli: work -> argv; api: work -> result (expected to raise)
    expect: type[ModelFoldError]
    needles: tuple[str, ...]  # the problem and the way out, in the message
    prepare: Callable[[Path], None] | None = None  # breaks the copied inputs
    disk_limit: int | None = None  # bytes: the largest file this process may write
    resumable: str | None = None  # a resume folder a layer-by-layer run may keep (named in the message)
    marks: tuple = ()


def _ids(work: Path) -> torch.Tensor:
    return torch.load(work / "ids.pt")


def _files(name: str, data: bytes) -> Callable[[Path], None]:
    def prep(w: Path) -> None:
        (w / name).write_bytes(data)
    return prep


CASES: list[Case] = [
    # -- missing or truncated files
    Case("gguf-missing-cli", "missing .gguf", "cli", (),
         lambda w: ["compress", str(w / "nope.gguf"), "--ratio", "0.3", "--out", str(w / "out.gguf")],
         CheckpointError, ("does not exist", "check the path")),
    Case("gguf-missing-api", "missing .gguf: `load_any`", "api", (),
         lambda w: mh.load_any(w / "nope.gguf"), CheckpointError, ("does not exist", "check the path")),
    Case("gguf-truncated-cli", "truncated .gguf", "cli", ("llama.gguf", "ids.pt"),
         lambda w: ["compress", str(w / "llama.gguf"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out.gguf")],
         CheckpointError, ("not a readable GGUF", "download it again"),
         prepare=lambda w: _truncate(w / "llama.gguf")),
    Case("gguf-truncated-api", "truncated .gguf: `load_any`", "api", ("llama.gguf",),
         lambda w: mh.load_any(w / "llama.gguf"), CheckpointError, ("not a readable GGUF", "download it again"),
         prepare=lambda w: _truncate(w / "llama.gguf")),
    Case("gguf-truncated-source-api", "truncated .gguf as `save_gguf(source=)`", "api", ("llama", "llama.gguf"),
         lambda w: mh.save_gguf(mh.load_any(w / "llama"), w / "out.gguf", source=w / "llama.gguf"),
         CheckpointError, ("cannot read the source GGUF", "pass the intact"),
         prepare=lambda w: _truncate(w / "llama.gguf")),
    Case("st-missing-cli", "missing .safetensors", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out")],
         CheckpointError, ("no weights", "Copy the weight files"),
         prepare=lambda w: (w / "llama" / "model.safetensors").unlink()),
    Case("st-missing-api", "missing .safetensors: `compress_checkpoint`", "api", ("llama", "ids.pt"),
         lambda w: _compress_checkpoint(w, w / "llama", w / "out", ratio=0.3),
         CheckpointError, ("no weights", "Copy the weight files"),
         prepare=lambda w: (w / "llama" / "model.safetensors").unlink()),
    Case("st-truncated-cli", "truncated .safetensors (layer by layer)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out")],
         CheckpointError, ("not a readable safetensors file", "download it again"),
         prepare=lambda w: _truncate(w / "llama" / "model.safetensors")),
    Case("st-truncated-memory-cli", "truncated .safetensors (`--stream never`)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--stream", "never", "--out", str(w / "out")],
         CheckpointError, ("not a readable safetensors file", "download it again"),
         prepare=lambda w: _truncate(w / "llama" / "model.safetensors")),
    Case("st-truncated-api", "truncated .safetensors: `load_any`", "api", ("llama",),
         lambda w: mh.load_any(w / "llama"), CheckpointError, ("not a readable safetensors file", "download it"),
         prepare=lambda w: _truncate(w / "llama" / "model.safetensors")),
    Case("st-truncated-ckpt-api", "truncated .safetensors: `compress_checkpoint`", "api", ("llama", "ids.pt"),
         lambda w: _compress_checkpoint(w, w / "llama", w / "out", ratio=0.3),
         CheckpointError, ("not a readable safetensors file", "download it again"),
         prepare=lambda w: _truncate(w / "llama" / "model.safetensors")),
    # -- NaN / Inf weights
    Case("nan-stream-self-cli", "NaN weight, `--calibration self` (layer by layer)", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", *CALIB, "--out", str(w / "out")],
         InvalidWeightsError, ("NaN or Inf", "Repair or reload"), prepare=lambda w: _poison(w / "llama", float("nan"))),
    Case("inf-stream-ids-cli", "Inf weight, token-id calibration (layer by layer)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out")],
         InvalidWeightsError, ("NaN or Inf", "Repair or re-export"),
         prepare=lambda w: _poison(w / "llama", float("inf"))),
    Case("nan-memory-cli", "NaN weight (`--stream never`)", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", *CALIB, "--stream", "never",
                    "--out", str(w / "out")],
         InvalidWeightsError, ("NaN or Inf", "Repair or reload"), prepare=lambda w: _poison(w / "llama", float("nan"))),
    Case("inf-gguf-out-cli", "Inf weight, `--out x.gguf`", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out.gguf")],
         InvalidWeightsError, ("NaN or Inf", "Repair or reload"), prepare=lambda w: _poison(w / "llama", float("inf"))),
    Case("nan-compress-api", "NaN weight: `modelfold.compress`", "api", ("llama", "ids.pt"),
         lambda w: modelfold.compress(_poisoned_model(w), ratio=0.3, calibration=_ids(w)),
         InvalidWeightsError, ("NaN or Inf", "Repair or reload")),
    Case("nan-save-gguf-api", "NaN weight: `save_gguf`", "api", ("llama",),
         lambda w: mh.save_gguf(_poisoned_model(w), w / "out.gguf"), InvalidWeightsError,
         ("NaN or Inf", "Reload or repair")),
    Case("inf-save-gguf-api", "Inf weight: `save_gguf`", "api", ("llama",),
         lambda w: mh.save_gguf(_poisoned_model(w, float("inf")), w / "out.gguf"), InvalidWeightsError,
         ("NaN or Inf", "Reload or repair")),
    # -- sparsity
    *[Case(f"sparsity-{s}-cli", f"`--sparsity {s}`", "cli", ("llama", "ids.pt"),
           lambda w, s=s: ["compress", str(w / "llama"), "--sparsity", s, "--calibration", str(w / "ids.pt"),
                           "--out", str(w / "out")],
           InvalidRatioError, ("outside (0, 1)", "e.g. --sparsity 0.3")) for s in ("0", "1", "-0.2", "nan")],
    Case("sparsity-unreachable-cli", "`--sparsity 0.97` (more than reachable)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--sparsity", "0.97", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out")],
         InvalidRatioError, ("sparsity=0.970", "nearest reachable sparsity is")),
    Case("sparsity-unreachable-gguf-cli", "`--sparsity 0.97`, GGUF in and out", "cli", ("llama.gguf", "ids.pt"),
         lambda w: ["compress", str(w / "llama.gguf"), "--sparsity", "0.97", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out.gguf")],
         InvalidRatioError, ("sparsity=0.970", "nearest reachable sparsity is")),
    *[Case(f"sparsity-{s}-api", f"`compress(sparsity={s})`", "api", ("llama", "ids.pt"),
           lambda w, s=s: modelfold.compress(mh.load_any(w / "llama"), sparsity=s, calibration=_ids(w)),
           InvalidRatioError, ("sparsity=", "(0, 1)")) for s in (0.0, 1.0, -0.2)],
    Case("sparsity-0-uniform-api", "`compress(sparsity=0, budget='uniform')`", "api", ("llama", "ids.pt"),
         lambda w: modelfold.compress(mh.load_any(w / "llama"), sparsity=0.0, budget="uniform", calibration=_ids(w)),
         InvalidRatioError, ("sparsity=", "(0, 1)")),
    Case("sparsity-unreachable-api", "`compress(sparsity=0.97)`", "api", ("llama", "ids.pt"),
         lambda w: modelfold.compress(mh.load_any(w / "llama"), sparsity=0.97, calibration=_ids(w)),
         InvalidRatioError, ("sparsity=0.970", "nearest reachable sparsity is")),
    Case("sparsity-unreachable-uniform-api", "`compress(sparsity=0.97, budget='uniform')`", "api", ("llama", "ids.pt"),
         lambda w: modelfold.compress(mh.load_any(w / "llama"), sparsity=0.97, budget="uniform", calibration=_ids(w)),
         InvalidRatioError, ("sparsity=0.970", "nearest reachable sparsity is")),
    Case("sparsity-1-ckpt-api", "`compress_checkpoint(sparsity=1)`", "api", ("llama", "ids.pt"),
         lambda w: _compress_checkpoint(w, w / "llama", w / "out", sparsity=1.0),
         InvalidRatioError, ("sparsity=", "(0, 1)")),
    Case("sparsity-unreachable-ckpt-api", "`compress_checkpoint(sparsity=0.97)`", "api", ("llama", "ids.pt"),
         lambda w: _compress_checkpoint(w, w / "llama", w / "out", sparsity=0.97),
         InvalidRatioError, ("sparsity=0.970", "nearest reachable sparsity is")),
    # -- calibration files
    Case("calib-empty-txt-cli", "empty `--calibration x.txt`", "cli", ("llama_tok",),
         lambda w: ["compress", str(w / "llama_tok"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out")],
         CalibrationError, ("empty file", "give a .txt file"), prepare=_files("c.txt", b"")),
    Case("calib-blank-txt-cli", "`--calibration x.txt` of blank lines", "cli", ("llama_tok",),
         lambda w: ["compress", str(w / "llama_tok"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out")],
         CalibrationError, ("holds no text", "give a .txt file"), prepare=_files("c.txt", b"\n\n  \n\n")),
    Case("calib-binary-txt-cli", "binary `--calibration x.txt` (not UTF-8)", "cli", ("llama_tok",),
         lambda w: ["compress", str(w / "llama_tok"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out")],
         CalibrationError, ("binary file", "give a .txt file"), prepare=_files("c.txt", bytes(range(256)) * 8)),
    Case("calib-nul-txt-cli", "binary `--calibration x.txt` (NUL bytes, valid UTF-8)", "cli", ("llama_tok",),
         lambda w: ["compress", str(w / "llama_tok"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out")],
         CalibrationError, ("binary file", "give a .txt file"), prepare=_files("c.txt", b"\x00" * 2048)),
    Case("calib-empty-pt-cli", "empty `--calibration x.pt`", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "c.pt"),
                    "--out", str(w / "out")],
         CalibrationError, ("empty file", "torch.save(ids, path)"), prepare=_files("c.pt", b"")),
    Case("calib-binary-pt-cli", "binary `--calibration x.pt` (not a tensor file)", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "c.pt"),
                    "--out", str(w / "out.gguf")],
         CalibrationError, ("not a readable torch tensor file", "torch.save(ids, path)"),
         prepare=_files("c.pt", bytes(range(256)) * 8)),
    Case("calib-empty-list-api", "`compress(calibration=[])`", "api", ("llama",),
         lambda w: modelfold.compress(mh.load_any(w / "llama"), ratio=0.3, calibration=[]),
         CalibrationError, ("empty list", "give texts")),
    # -- tokenizer needed, none there
    Case("no-tokenizer-text-cli", "text `--calibration`, model without tokenizer", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out")],
         CalibrationError, ("needs the model's tokenizer", "copy its tokenizer files"),
         prepare=_files("c.txt", b"Some calibration text.\n\nMore of it.")),
    Case("no-tokenizer-gguf-text-cli", "text `--calibration`, GGUF without vocabulary", "cli", ("llama.gguf",),
         lambda w: ["compress", str(w / "llama.gguf"), "--ratio", "0.3", "--calibration", str(w / "c.txt"),
                    "--out", str(w / "out.gguf")],
         CalibrationError, ("needs the model's tokenizer", "pass token ids"),
         prepare=_files("c.txt", b"Some calibration text.\n\nMore of it.")),
    Case("no-tokenizer-encoder-cli", "encoder without tokenizer, `--calibration self`", "cli", ("bert",),
         lambda w: ["compress", str(w / "bert"), "--ratio", "0.3", "--out", str(w / "out")],
         CalibrationError, ("needs tokenizer", "the tokenizer files beside the model")),
    Case("no-tokenizer-encoder-api", "encoder without tokenizer: `compress(calibration='self')`", "api", ("bert",),
         lambda w: modelfold.compress(mh.load_any(w / "bert"), ratio=0.3),
         CalibrationError, ("needs tokenizer=", "pass token ids")),
    Case("no-tokenizer-text-api", "texts without `tokenizer=`: `compress`", "api", ("llama",),
         lambda w: modelfold.compress(mh.load_any(w / "llama"), ratio=0.3, calibration=["some text"]),
         CalibrationError, ("needs tokenizer=", "pass token ids")),
    Case("no-tokenizer-load-api", "`load_tokenizer` of a directory without one", "api", ("bert",),
         lambda w: mh.load_tokenizer(w / "bert"), CheckpointError, ("no usable tokenizer", "Copy the tokenizer")),
    # -- output inside the input
    Case("out-inside-input-cli", "`--out` inside the input directory (layer by layer)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "llama" / "out")],
         CheckpointError, ("would write into the input model", "outside it")),
    Case("out-inside-input-memory-cli", "`--out` inside the input directory (`--stream never`)", "cli",
         ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--stream", "never", "--out", str(w / "llama" / "out")],
         CheckpointError, ("would write into the input model", "outside it")),
    Case("out-is-input-cli", "`--out` = the input directory", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--stream", "never", "--out", str(w / "llama")],
         CheckpointError, ("would write into the input model", "outside it")),
    Case("out-gguf-inside-input-cli", "`--out x.gguf` inside the input directory", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "llama" / "out.gguf")],
         CheckpointError, ("would write into the input model", "outside it")),
    Case("out-gguf-is-input-cli", "`--out x.gguf` = the input .gguf", "cli", ("llama.gguf", "ids.pt"),
         lambda w: ["compress", str(w / "llama.gguf"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "llama.gguf")],
         CheckpointError, ("would write into the input model", "outside it")),
    Case("out-contains-input-cli", "`--out` = a model directory that contains the input", "cli", ("llama_tok",),
         lambda w: ["compress", str(w / "llama_tok" / "inner"), "--ratio", "0.3", "--calibration", "self",
                    *CALIB, "--out", str(w / "llama_tok")],
         CheckpointError, ("contains the input model", "does not contain the input"),
         prepare=lambda w: shutil.copytree(w / "llama_tok", w / "llama_tok" / "inner")),
    Case("out-is-source-api", "`save_gguf(path=source)`", "api", ("llama.gguf",),
         lambda w: mh.save_gguf(mh.load_any(w / "llama.gguf"), w / "llama.gguf", source=w / "llama.gguf"),
         CheckpointError, ("is the source GGUF", "write to another path")),
    Case("out-inside-input-ckpt-api", "`compress_checkpoint(dst` inside `src)`", "api", ("llama", "ids.pt"),
         lambda w: _compress_checkpoint(w, w / "llama", w / "llama" / "out", ratio=0.3),
         CheckpointError, ("must be outside the input", "choose another output")),
    # -- full disk (a file-size limit in a subprocess)
    Case("disk-full-memory-cli", "full disk, `--out DIR` (`--stream never`)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--stream", "never", "--out", str(w / "out")],
         CheckpointError, ("File too large", "check disk space"), disk_limit=16384),
    Case("disk-full-gguf-cli", "full disk, `--out x.gguf`", "cli", ("llama.gguf", "ids.pt"),
         lambda w: ["compress", str(w / "llama.gguf"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out.gguf")],
         CheckpointError, ("incomplete", "Free some space"), disk_limit=16384),
    Case("disk-full-self-cli", "full disk, `--calibration self` (cache and output)", "cli", ("llama",),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", *CALIB, "--stream", "never",
                    "--out", str(w / "out")],
         CheckpointError, ("File too large", "check disk space"), disk_limit=1024),
    Case("disk-full-stream-cli", "full disk, `--out DIR` (layer by layer)", "cli", ("llama", "ids.pt"),
         lambda w: ["compress", str(w / "llama"), "--ratio", "0.3", "--calibration", str(w / "ids.pt"),
                    "--out", str(w / "out")],
         CheckpointError, ("File too large", "check disk space", "rerun the same command to continue"),
         disk_limit=16384, resumable=".out.partial"),
]


def _cnn(work: Path, *args: str, model: str = "cnn.pt") -> list[str]:
    return ["compress", str(work / model), "--input-shape", "1,3,16,16", *args]


def _nan_cnn(work: Path) -> None:
    m = torch.load(work / "cnn.pt", weights_only=False)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("nan")
    torch.save(m, work / "cnn.pt")


CASES += [
    # -- the same on a CNN (calibrated selection with example inputs)
    Case("cnn-calib-empty-cli", "CNN: empty `--calibration x.pt`", "cli", ("cnn.pt",),
         lambda w: _cnn(w, "--ratio", "0.3", "--calibration", str(w / "c.pt"), "--out", str(w / "out.pt")),
         CheckpointError, ("is empty", "torch.save(x, path)"), prepare=_files("c.pt", b"")),
    Case("cnn-calib-binary-cli", "CNN: binary `--calibration x.npy`", "cli", ("cnn.pt",),
         lambda w: _cnn(w, "--ratio", "0.3", "--calibration", str(w / "c.npy"), "--out", str(w / "out.pt")),
         CheckpointError, ("cannot read data file", "a .npy array (np.save)"),
         prepare=_files("c.npy", bytes(range(256)) * 8)),
    Case("cnn-truncated-cli", "CNN: truncated model file", "cli", ("cnn.pt", "x.pt"),
         lambda w: _cnn(w, "--ratio", "0.3", "--calibration", str(w / "x.pt"), "--out", str(w / "out.pt")),
         CheckpointError, ("truncated, corrupt", "torch.save(model)"), prepare=lambda w: _truncate(w / "cnn.pt")),
    Case("cnn-nan-cli", "CNN: NaN weight", "cli", ("cnn.pt", "x.pt"),
         lambda w: _cnn(w, "--ratio", "0.3", "--calibration", str(w / "x.pt"), "--out", str(w / "out.pt")),
         InvalidWeightsError, ("NaN or Inf", "Repair or reload"), prepare=_nan_cnn),
    Case("cnn-sparsity-1-cli", "CNN: `--sparsity 1`", "cli", ("cnn.pt", "x.pt"),
         lambda w: _cnn(w, "--sparsity", "1", "--calibration", str(w / "x.pt"), "--out", str(w / "out.pt")),
         InvalidRatioError, ("outside (0, 1)", "e.g. --sparsity 0.3")),
    Case("cnn-sparsity-unreachable-cli", "CNN: `--sparsity 0.99` (more than reachable)", "cli", ("cnn.pt", "x.pt"),
         lambda w: _cnn(w, "--sparsity", "0.99", "--calibration", str(w / "x.pt"), "--out", str(w / "out.pt")),
         InvalidRatioError, ("sparsity=0.990", "nearest reachable sparsity is")),
    Case("cnn-out-is-input-cli", "CNN: `--out` = the input model file", "cli", ("cnn.pt",),
         lambda w: _cnn(w, "--ratio", "0.3", "--out", str(w / "cnn.pt")),
         CheckpointError, ("would write into the input model", "outside it")),
    Case("hf-compress-model-api", "`hf.compress_model(sparsity=-0.2)`", "api", ("llama", "ids.pt"),
         lambda w: mh.compress_model(mh.load_any(w / "llama"), sparsity=-0.2, calibration=_ids(w)),
         InvalidRatioError, ("sparsity=", "(0, 1)")),
]


def _compress_checkpoint(work: Path, src: Path, dst: Path, **kw: Any) -> Any:
    from modelfold.hf.checkpoint import compress_checkpoint

    return compress_checkpoint(src, dst, calibration=_ids(work), progress=False, **kw)


# ------------------------------------------------------------------------------------------ observing
@dataclass
class Observed:
    error: str  # the exception class (API) / the class the CLI reported, or "none"
    exit_code: int | None
    message: str
    one_line: bool
    traceback: bool
    created: list[str] = field(default_factory=list)  # paths that appeared in the case's folder
    changed: list[str] = field(default_factory=list)  # input files whose bytes changed or that vanished


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _run_cli(argv: list[str]) -> dict[str, Any]:
    """``modelfold.cli.main(argv)``: exit code, stderr, and the class of the error main reported (or of
    one that escaped it)."""
    from modelfold.cli import commands as cli

    seen: list[BaseException] = []
    run = cli._run

    def spy(args: Any) -> int:
        try:
            return run(args)
        except BaseException as e:
            seen.append(e)
            raise

    err = io.StringIO()
    cli._run = spy
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
                escaped = None
            except BaseException as e:  # noqa: BLE001 - recorded, the test fails on it
                code, escaped = None, f"{type(e).__name__}: {e}"
    finally:
        cli._run = run
    return {"code": code, "err": err.getvalue(), "cls": type(seen[-1]).__name__ if seen else None,
            "escaped": escaped}


_LIMITED = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
runs = json.loads(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_bad_input_sweep import _run_cli
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
out = []
for limit, argv in runs:  # one process for every case: torch and transformers are imported once
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        out.append(_run_cli(argv))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
sys.stdout.write("\\n" + json.dumps(out))
"""


def _cli_limited(runs: list[tuple[int, list[str]]], cache: Path) -> list[dict[str, Any]]:
    """``_run_cli`` for each (file-size limit, argv), in one subprocess."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MODELFOLD_CACHE": str(cache)}
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", _LIMITED, json.dumps(runs), str(HERE)],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    try:
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(got) == len(runs)
        return got
    except (ValueError, IndexError, AssertionError):
        return [{"code": None, "err": r.stderr[-3000:], "cls": None,
                 "escaped": f"the subprocess died (exit {r.returncode})"}] * len(runs)


def _start(case: Case, assets: Path, work: Path) -> dict[str, str]:
    """Fresh copies of the case's inputs in ``work`` (an empty folder), broken as the case says; their hashes."""
    _copy(assets, work, *case.inputs)
    if case.prepare is not None:
        case.prepare(work)
    return _snapshot(work)


def _finish(case: Case, work: Path, before: dict[str, str], got: dict[str, Any] | None) -> Observed:
    """What happened: the CLI's result ``got``, or (API) run the case now."""
    if case.surface == "cli":
        err = got["err"]
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("modelfold: error:")]
        message = errors[-1][len("modelfold: error:"):].strip() if errors else got["escaped"] or err[-1500:]
        obs = Observed(error=got["escaped"].split(":")[0] if got["escaped"] else got["cls"] or "none",
                       exit_code=got["code"], message=message, one_line=len(errors) == 1 and lines[-1] == errors[0],
                       traceback="Traceback" in err or got["escaped"] is not None)
    else:
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                case.run(work)
            obs = Observed("none", None, "", True, False)
        except Exception as e:  # noqa: BLE001 - recorded
            obs = Observed(type(e).__name__, None, " ".join(str(e).split()), True, False)
    after = _snapshot(work)
    obs.created = sorted(set(after) - set(before))
    obs.changed = sorted(k for k, v in before.items() if after.get(k) != v)
    return obs


def observe(case: Case, assets: Path, work: Path) -> Observed:
    """Run ``case`` (without a file-size limit) in ``work`` and record what happened."""
    before = _start(case, assets, work)
    return _finish(case, work, before, _run_cli(case.run(work)) if case.surface == "cli" else None)


def observe_limited(cases: list[Case], assets: Path, root: Path) -> dict[str, Observed]:
    """The cases with a file-size limit, each in ``root / case.id``, all in one subprocess."""
    works = {c.id: root / c.id for c in cases}
    before = {}
    for c in cases:
        works[c.id].mkdir(parents=True)
        before[c.id] = _start(c, assets, works[c.id])
    got = _cli_limited([(c.disk_limit, c.run(works[c.id])) for c in cases], root / "cache")
    return {c.id: _finish(c, works[c.id], before[c.id], g) for c, g in zip(cases, got, strict=True)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def limited(assets, tmp_path_factory) -> tuple[Path, dict[str, Observed]]:
    root = tmp_path_factory.mktemp("limited")
    return root, observe_limited([c for c in CASES if c.disk_limit is not None], assets, root)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))  # outside the case's folder
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, assets: Path, tmp_path: Path, request) -> None:
    if case.disk_limit is None:
        work, cache = tmp_path / "work", tmp_path / "cache"
        work.mkdir()
        obs = observe(case, assets, work)
    else:  # run with the others in one subprocess
        root, results = request.getfixturevalue("limited")
        work, cache, obs = root / case.id, root / "cache", results[case.id]
    assert obs.changed == [], f"input files changed: {obs.changed}"
    created = obs.created
    if case.resumable:  # issue 17 part 3: work done before a failure is kept to resume from, and said so
        assert str(work / case.resumable) in obs.message, obs.message
        created = [p for p in created if p != case.resumable and not p.startswith(case.resumable + "/")]
    assert created == [], f"written despite the error: {created}"
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")], "temporary files left in the cache"
    cls = getattr(errors, obs.error, None)
    assert isinstance(cls, type) and issubclass(cls, case.expect), f"{obs.error}: {obs.message}"
    for needle in case.needles:
        assert needle in obs.message, f"{needle!r} not in: {obs.message}"
    if case.surface == "cli":
        assert obs.exit_code == 2 and obs.one_line and not obs.traceback, obs.message


def test_the_sweep_leaves_the_good_inputs_usable(assets, tmp_path) -> None:
    """The same commands on the intact inputs succeed, so each case fails for its bad input alone."""
    from modelfold.cli import main

    work = tmp_path / "w"
    work.mkdir()
    _copy(assets, work, "llama", "llama.gguf", "ids.pt")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["compress", str(work / "llama"), "--ratio", "0.3", "--calibration", str(work / "ids.pt"),
                     "--out", str(work / "o")]) == 0
        assert main(["compress", str(work / "llama.gguf"), "--ratio", "0.3", "--calibration", str(work / "ids.pt"),
                     "--out", str(work / "o.gguf")]) == 0
    assert (work / "o" / "config.json").is_file() and (work / "o.gguf").stat().st_size > 0
