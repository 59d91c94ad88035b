"""Command line: ``modelfold fold`` / ``modelfold prune`` / ``modelfold inspect`` / ``modelfold eval``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import api, io
from ..errors import CalibrationError, CheckpointError, InvalidRatioError, ModelFoldError
from .options import ray_options, repair_options
from .parser import build_parser


def _hf(spec: str) -> bool:
    from ..hf.validate import is_hf_spec

    return is_hf_spec(spec)


def _run_hf(args: argparse.Namespace) -> int:
    from .. import hf

    cnn_only = (args.data, args.ar_rho, args.dir_batch, args.dir_iters) if args.command == "fold" else (
        (args.merge,) if args.command == "prune" else ())
    if args.command == "compress" and args.calibration is None:
        args.calibration = "self"
    if any(v is not None for v in cnn_only):
        raise ModelFoldError("--ar-rho/--dir-batch/--dir-iters/--data/--merge apply to CNNs, not Hugging Face models")
    from ..hf.validate import check_foldable

    check_foldable(args.model)  # config, family, weights / GGUF architecture: fail before loading anything
    if _use_stream(args):
        return _run_stream(args)
    if args.executor != "local":
        raise ModelFoldError(f"--executor {args.executor} folds a safetensors directory layer by layer; "
                             f"{args.model} is folded in memory (drop --stream never, or re-save it as safetensors)")
    model = hf.load_any(args.model)
    kw = {"targets": args.targets, "seed": args.seed, "return_report": True, "sparsity": args.sparsity,
          "skip_first": args.skip_first, "skip_last": args.skip_last, "round_to": _gguf_round_to(args),
          "verify": args.verify}
    tok = _tokenizer(hf, args.model)
    if args.calibration is not None:
        kw.update(calibration=_calibration(args.calibration, tok), tokenizer=tok, n_calib=args.n_calib,
                  calib_len=args.calib_len, progress=True)
    if args.command == "compress":
        kw.update(method=args.method, score=args.score, budget=args.budget, compensate=args.compensate,
                  lam=args.lam)
        out, report = api.compress(model, ratio=args.ratio, device=args.device, **kw)
    elif args.command == "fold":
        out, report = api.fold(model, ratio=args.ratio, repair=args.repair, device=args.device, **kw)
    else:
        out, report = api.prune(model, ratio=args.ratio, norm=args.norm, **kw)
    print(report)
    if args.out.endswith(".gguf"):
        from ..hf.io import find_gguf

        source = None if hf.is_hf_dir(args.model) else find_gguf(Path(args.model))
        print(hf.save_gguf(out, args.out, dtype=args.gguf_type, source=source, progress=True, verify=args.verify))
        return 0
    hf.save(out, args.out, tokenizer=tok, verify=args.verify)
    print(f"saved to {args.out}")
    return 0


def _gguf_round_to(args: argparse.Namespace) -> int | None:
    """``--round-to``, or for a quantized ``.gguf`` output the type's block (32): widths llama.cpp stores
    without padding. An explicit ``--round-to`` (1: exact widths, zero-padded by the writer) wins."""
    if args.round_to is not None or not args.out.endswith(".gguf"):
        return args.round_to
    from ..hf.gguf.layers import ROUND_TO

    block = ROUND_TO.get(args.gguf_type, 1)
    if block > 1:
        print(f"modelfold: --gguf-type {args.gguf_type} stores rows in blocks of {block} values: kept widths are "
              f"multiples of {block} (--round-to 1 keeps exact widths; the writer then pads with zeros)")
        return block
    return None


def _calibration(src: str, tokenizer: object) -> object:
    """'self', the texts of a .txt file, or a LongTensor of token ids from a .pt file."""
    if src == "self":
        return src
    path = Path(src)
    if not path.is_file():
        raise CalibrationError(f"--calibration {src}: no such file; give 'self', a .txt file or a .pt tensor of ids")
    if path.stat().st_size == 0:
        raise CalibrationError(f"--calibration {src} is an empty file; give a .txt file of text, a .pt tensor of "
                               "token ids saved with torch.save(ids, path), or 'self'")
    if path.suffix in (".pt", ".pth"):
        try:
            ids = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            why = next((line.strip() for line in str(e).splitlines() if line.strip()), "").split(". ")[0]
            raise CalibrationError(f"--calibration {src} is not a readable torch tensor file ({type(e).__name__}: "
                                   f"{why[:120]}); save the token ids with torch.save(ids, path), a LongTensor "
                                   "(n, L)") from None
        return ids
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise CalibrationError(f"--calibration {src} is a binary file, not UTF-8 text; give a .txt file of text, "
                               "or token ids as a .pt tensor")
    texts = [t for t in text.split("\n\n") if t.strip()]
    if not texts:
        raise CalibrationError(f"--calibration {src} holds no text (only blank lines); give a .txt file with "
                               "enough text for the calibration sequences, or 'self'")
    if tokenizer is None:
        raise CalibrationError(f"--calibration {src}: text calibration needs the model's tokenizer, and none was "
                               "found beside the model; copy its tokenizer files (tokenizer.json, "
                               "tokenizer_config.json, ...) next to it, or pass token ids as a .pt tensor instead")
    return texts


def _use_stream(args: argparse.Namespace) -> bool:
    """Layer by layer unless asked otherwise, whenever the input is a safetensors directory."""
    from ..hf import is_hf_dir
    from ..hf.checkpoint import checkpoint_bytes

    if args.stream == "never":
        return False
    if args.out.endswith(".gguf"):
        if args.stream == "always":
            raise ModelFoldError("--stream always writes a transformers directory; a .gguf output is written "
                                 "from the model in memory (use --stream auto or never)")
        return False
    if not is_hf_dir(args.model) or checkpoint_bytes(args.model) == 0:
        if args.stream == "always":
            raise _not_streamable(args.model)
        return False
    return True


def _not_streamable(model: str) -> ModelFoldError:
    return ModelFoldError(f"--stream always needs a transformers directory with safetensors weights; {model} is "
                          "not one (re-save it with save_pretrained, or use --stream never)")


def _run_stream(args: argparse.Namespace) -> int:
    from ..hf.checkpoint import fold_checkpoint, prune_checkpoint

    kw = {"targets": args.targets, "max_shard_size": args.max_shard_size, "progress": True,
          "sparsity": args.sparsity, "skip_first": args.skip_first, "skip_last": args.skip_last,
          "verify": args.verify}
    if args.calibration is not None:  # calibrated, layer by layer (the activations stream along)
        from .. import hf
        from ..hf.checkpoint import compress_checkpoint

        if args.executor != "local":
            raise ModelFoldError("calibrated compression runs its layers in order (the calibration activations "
                                 "flow from layer to layer); drop --executor ray")
        tok = _tokenizer(hf, args.model)
        method = {"compress": getattr(args, "method", "select"), "fold": "fold", "prune": "select"}[args.command]
        extra = {"score": args.score, "budget": args.budget, "compensate": args.compensate, "lam": args.lam} \
            if args.command == "compress" else {}
        report = compress_checkpoint(args.model, args.out, ratio=args.ratio, seed=args.seed, method=method,
                                     calibration=_calibration(args.calibration, tok), tokenizer=tok,
                                     n_calib=args.n_calib, calib_len=args.calib_len, round_to=args.round_to,
                                     device=getattr(args, "device", None), **extra, **kw)
        print(report)
        print(f"saved to {args.out} (compressed layer by layer; reload with modelfold.load_pretrained)")
        return 0
    kw.update(executor=args.executor, ray_address=args.ray_address, ray_options=ray_options(args),
              round_to=args.round_to)
    if args.command == "fold":
        report = fold_checkpoint(args.model, args.out, ratio=args.ratio, repair=args.repair, seed=args.seed,
                                 device=args.device, **kw)
    else:
        report = prune_checkpoint(args.model, args.out, ratio=args.ratio, norm=args.norm, **kw)
    print(report)
    print(f"saved to {args.out} (folded layer by layer; reload with modelfold.load_pretrained or, for "
          "uniform folds, transformers' from_pretrained)")
    return 0


def _tokenizer(hf: object, path: str) -> object:
    """The model's tokenizer if one can be loaded, so the output folder is complete."""
    try:
        return hf.load_tokenizer(path)
    except Exception:  # noqa: BLE001 - a model without a tokenizer still folds
        return None


def _inspect_hf(args: argparse.Namespace) -> int:
    """Layers, widths, heads and reachable sparsity of a transformers directory (no weights read)."""
    from ..hf.checkpoint import skeleton
    from ..hf.model import adapter_of
    from ..hf.sizing import summary
    from ..hf.validate import check_foldable

    check_foldable(args.model, weights=False)  # inspect reads shapes from config.json only
    if args.model.endswith(".gguf"):
        from ..hf import load_any

        model = load_any(args.model)
    else:
        model = skeleton(Path(args.model))
    print(summary(model, adapter_of(model)))
    return 0


def _run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if args.command == "eval":
        from .eval import run as run_eval

        return run_eval(args)
    if args.command == "inspect" and _hf(args.model):
        return _inspect_hf(args)
    if args.command != "inspect" and _hf(args.model):
        return _run_hf(args)
    if args.command != "inspect":  # options that only Hugging Face checkpoints take
        if args.out.endswith(".gguf"):
            raise ModelFoldError("a .gguf output is written for transformers causal LMs (a Hugging Face directory "
                                 "or .gguf input); save this model to a .pt file")
        if args.skip_first or args.skip_last:
            raise ModelFoldError("--skip-first/--skip-last apply to Hugging Face models; for a CNN keep layers "
                                 "with --ignore")
        if args.stream == "always":
            raise _not_streamable(args.model)
        if args.executor != "local" or args.ray_address or args.ray_cpus or args.ray_memory:
            raise ModelFoldError("--executor/--ray-* options apply to Hugging Face checkpoint directories")
    model = io.load_model(args.model, args.weights)
    shape = args.input_shape or io.default_input_shape(args.model)
    if shape is None:
        raise ModelFoldError(f"cannot guess an input shape for {args.model}; pass --input-shape, e.g. 1,3,224,224")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if args.command == "inspect":
        groups = api.channel_groups(model, x, ignore=args.ignore, keep_outputs=args.keep_outputs)
        for g in groups:
            print(g if args.verbose else f"{g.root:<40} {g.size:>5} ch  {len(g.slices):>3} slices  "
                  f"{'foldable' if g.foldable else 'kept: ' + g.reason}")
        print(f"{sum(g.foldable for g in groups)} of {len(groups)} groups foldable")
        return 0
    if args.n_calib is not None or args.calib_len is not None:
        raise ModelFoldError("--n-calib/--calib-len apply to Hugging Face models; a CNN takes --calibration self "
                             "or a file of inputs")
    repair_opts = repair_options(args) if args.command == "fold" else {}
    common = {"ratio": args.ratio, "sparsity": args.sparsity, "ignore": args.ignore,
              "keep_outputs": args.keep_outputs, "strict": args.strict,
              "seed": args.seed, "progress": True, "return_report": True, "round_to": args.round_to,
              "verify": args.verify}
    if args.calibration is not None:
        common["calibration"] = args.calibration if args.calibration == "self" else io.load_inputs(args.calibration)
    if args.command == "compress":
        if args.score in ("wanda", "flap", "obs"):
            raise ModelFoldError(f"--score {args.score} is for Hugging Face models; CNNs take act or magnitude")
        if args.device not in (None, "cpu"):
            raise ModelFoldError("calibrated CNN compression runs on the CPU; drop --device")
        if args.compensate == "bias":
            raise ModelFoldError("--compensate bias is for Hugging Face models; CNNs take ls or none")
        if args.lam != "auto":
            raise ModelFoldError("--lam is for Hugging Face models (CNN refits use their own fixed ridge); drop it")
        opts = {"budget": args.budget, "compensate": args.compensate == "ls"}
        if args.method == "fold":
            out, report = api.fold(model, x, **common, calibration_kwargs=opts)
        else:
            opts["selection"] = "activation" if args.score == "act" else "magnitude"
            out, report = api.prune(model, x, **common, calibration_kwargs=opts)
    elif args.command == "fold":
        data = repair_opts.get("data")
        if data is not None and tuple(data.shape[1:]) != tuple(x.shape[1:]):
            raise ModelFoldError(f"--data inputs have shape {tuple(data.shape[1:])} per sample but the model's "
                                 f"input is {tuple(x.shape[1:])}; pass matching inputs or --input-shape")
        out, report = api.fold(model, x, repair=args.repair, device=args.device, **common, **repair_opts)
    else:
        out, report = api.prune(model, x, norm=args.norm, merge=args.merge, **common)
    io.save_model(out, args.out)
    print(report)
    print(_stage_table(model, out))
    print(f"saved to {args.out} (reload with torch.load(path, weights_only=False))")
    return 0


def _stage_table(before: torch.nn.Module, after: torch.nn.Module) -> str:
    """Widths of every conv/linear layer, before -> after."""
    rows = ["  layer                                    out before -> after"]
    mods = dict(after.named_modules())
    for name, m in before.named_modules():
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        new = mods.get(name)
        if width is None or new is None:
            continue
        w2 = getattr(new, "out_channels", getattr(new, "out_features", None))
        if w2 != width:
            rows.append(f"  {name:<40} {width:>10} -> {w2}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modelfold`` command."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ModelFoldError, ValueError, TypeError) as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"modelfold: error: {message}", file=sys.stderr)
        return 2


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or written, a sparsity outside (0, 1) and an output that would
    overwrite or sit inside an input (the model, --weights, --calibration, --data)."""
    sparsity = getattr(args, "sparsity", None)
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise InvalidRatioError(f"--sparsity {sparsity} is outside (0, 1): it is the fraction of parameters "
                                "removed, e.g. --sparsity 0.3 removes 30%")
    out = getattr(args, "out", None)
    if out is None:
        return
    dst = Path(out).resolve()
    for name, spec in (("the input model", args.model), ("--weights", getattr(args, "weights", None)),
                       ("--calibration", getattr(args, "calibration", None)), ("--data", getattr(args, "data", None))):
        if spec is None or not Path(spec).exists():
            continue
        src = Path(spec).resolve()
        if dst == src or src in dst.parents:
            raise CheckpointError(f"--out {out} would write into {name} {spec}; inputs are never modified: "
                                  "choose an output path outside it")
        if dst in src.parents:
            raise CheckpointError(f"--out {out} contains {name} {spec} and would be replaced as a whole; choose "
                                  "an output path that does not contain the input")

