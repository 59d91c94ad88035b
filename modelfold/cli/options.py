"""Argument definitions and checks of ``modelfold fold/prune/compress`` that ``cli.py`` shares: layer-by-layer
(stream, shards, Ray) and output options of Hugging Face checkpoints, hardware-friendly widths, input
shapes and repair options."""

from __future__ import annotations

import argparse

from .. import io
from ..errors import ModelFoldError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # = modelfold.hf.gguf.TYPES


def add_width_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--round-to", type=int, default=None, metavar="N",
                    help="hardware-friendly widths: every reduced group / MLP keeps a multiple of N channels "
                         "(e.g. 8, 16, 64; nearest multiple, never above the original width; groups narrower "
                         "than N stay whole). Default: 32 for a quantized --gguf-type with --out FILE.gguf (its block), else 1")


def add_device_option(sp: argparse.ArgumentParser, command: str) -> None:
    what = ("k-means and DeepInversion run (with --calibration on a Hugging Face model in memory: the whole "
            "calibrated compression); the model is read and written on the CPU" if command == "fold" else
            "calibration sampling, forward passes and least squares run (Hugging Face models in memory; a copy "
            "of the model goes there)")
    sp.add_argument("--device", default=None,
                    help=f"where {what}: cpu (default), cuda, cuda:N, or auto (a GPU if there is one)")


def add_checkpoint_options(sp: argparse.ArgumentParser) -> None:
    """HF directories: layer by layer, shard size, Ray; and the GGUF output type."""
    sp.add_argument("--stream", choices=("auto", "always", "never"), default="auto",
                    help="HF directories: fold layer by layer from the safetensors shards (same result, "
                         "memory of one layer, so checkpoints larger than RAM fold). auto (default): "
                         "whenever the directory holds safetensors; never: load the whole model")
    sp.add_argument("--gguf-type", default="f16", choices=(*GGUF_TYPES, "source"),
                    help="--out FILE.gguf only: tensor type of the matrices (default f16; source: the input "
                         "GGUF's types where they can be written)")
    sp.add_argument("--max-shard-size", default="2GB",
                    help="HF directories, layer by layer: output shard size limit (default 2GB)")
    sp.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="HF directories, layer by layer: local (this process, default) or ray (one Ray "
                         "task per layer on a cluster; see docs/distributed.md)")
    sp.add_argument("--ray-address", metavar="ADDR", default=None,
                    help="with --executor ray: the cluster to join, e.g. 10.0.0.1:6379 (default: the one "
                         "RAY_ADDRESS names, else a new local one)")
    sp.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                    help="with --executor ray: cores (and torch threads) per layer task (default 1)")
    sp.add_argument("--ray-memory", default=None, metavar="SIZE",
                    help="with --executor ray: memory each layer task reserves, e.g. 10GB, so a node runs "
                         "no more tasks than fit (see docs/distributed.md for per-layer figures)")


def ray_options(args: argparse.Namespace) -> dict | None:
    """Ray task options from --ray-cpus/--ray-memory (refused without --executor ray)."""
    from ..hf.checkpoint import parse_size

    opts: dict = {}
    if args.ray_cpus is not None:
        if args.ray_cpus < 1:
            raise ModelFoldError(f"--ray-cpus {args.ray_cpus}: give at least 1 core per task")
        opts["num_cpus"] = args.ray_cpus
    if args.ray_memory is not None:
        try:
            opts["memory"] = parse_size(args.ray_memory)
        except ValueError:
            raise ModelFoldError(f"--ray-memory {args.ray_memory!r} is not a size; write e.g. 10GB") from None
    if opts and args.executor != "ray":
        raise ModelFoldError("--ray-cpus/--ray-memory apply to --executor ray")
    return opts or None


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape`` values: ``1,3,224,224`` or ``1x3x224x224``."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write e.g. 1,3,224,224") from e
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; all sizes must be positive")
    return shape


def repair_options(args: argparse.Namespace) -> dict:
    """fold() keywords for the repair options given on the command line; refuses mismatched ones."""
    opts: dict = {}
    if args.repair == "data" and args.data is None:
        raise ModelFoldError("--repair data (Fold-R) needs --data FILE: a .pt/.pth tensor of inputs, a .npy "
                             "array, or 'fmnist'; or use a data-free repair (--repair ar or dir)")
    if args.data is not None:
        if args.repair != "data":
            raise ModelFoldError(f"--data applies to --repair data, not --repair {args.repair}")
        opts["data"] = io.load_inputs(args.data)
    if args.ar_rho is not None:
        if args.repair != "ar":
            raise ModelFoldError(f"--ar-rho applies to --repair ar, not --repair {args.repair}")
        opts["repair_kwargs"] = {"ar_rho": args.ar_rho}
    if args.dir_batch is not None or args.dir_iters is not None:
        if args.repair != "dir":
            raise ModelFoldError(f"--dir-batch/--dir-iters apply to --repair dir, not --repair {args.repair}")
        opts.update(dir_batch=args.dir_batch, dir_iters=args.dir_iters)
    return opts
