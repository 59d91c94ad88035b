"""The ``modelfold`` command line's parser: commands, options and help."""

from __future__ import annotations

import argparse

from .. import api
from ..traced.repair.ar import RHO_MODES
from .options import add_checkpoint_options, add_device_option, add_width_options, input_shape

EPILOG = """\
MODEL is one of:
  a modelfold zoo name        resnet18_fmnist, vgg11_bn_fmnist (trained on Fashion-MNIST, shipped)
  a torchvision model name    e.g. resnet50 --weights resnet50.pth (state_dict file)
  a torch.save'd full model   e.g. my_model.pt
  package.module:factory      a callable returning the nn.Module (weights via --weights)
  a Hugging Face model dir    config.json + weights (or a .gguf file); --targets selects what folds

examples:
  modelfold fold resnet18_fmnist --ratio 0.5 --repair ar --out folded.pt
  modelfold fold resnet18_fmnist --ratio 0.3 --repair data --data fmnist --out folded_r.pt   (Fold-R)
  modelfold fold resnet50 --weights resnet50.pth --sparsity 0.5 --ignore layer4 --out r50.pt
  modelfold prune mobilenet_v2 --ratio 0.3 --norm 1 --round-to 8 --out pruned.pt   (widths: multiples of 8)
  modelfold inspect densenet121
  modelfold fold path/to/hf_model --ratio 0.3 --targets mlp --out folded_dir
  modelfold fold model.gguf --ratio 0.3 --out folded.gguf --gguf-type q8_0   (GGUF in, GGUF out)
  modelfold fold path/to/big_hf_model --ratio 0.3 --stream always --out folded_dir   (layer by layer)
  modelfold fold /shared/hf_model --ratio 0.3 --executor ray --ray-address HEAD:6379 --out /shared/folded
  modelfold eval folded_dir --compare path/to/hf_model          (perplexity / cosine / top-1, side by side)
Reload a CNN result with torch.load(path, weights_only=False).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``modelfold`` argument parser (fold, prune, compress, inspect, eval)."""
    p = argparse.ArgumentParser(prog="modelfold", description="Compress a trained network by model folding "
                                "(k-means channel clustering + merging), without data or fine-tuning.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("fold", "fold a model (Fold-Naive/AR/DIR/R)"),
                           ("prune", "structured magnitude pruning baseline (SP-L1/SP-L2)"),
                           ("compress", "best calibrated compression without user data (HF models: activation-"
                                        "aware selection + least-squares refit, automatic per-layer budget)")):
        sp = sub.add_parser(name, help=helptext, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        amount = sp.add_mutually_exclusive_group(required=True)
        amount.add_argument("--ratio", type=float, help="fraction of channels removed in every foldable group")
        amount.add_argument("--sparsity", type=float, help="fraction of parameters to remove (ratio is solved)")
        sp.add_argument("--out", required=True, help="output file (CNN: torch.save'd module) or dir (HF)")
        sp.add_argument("--strict", action="store_true", help="fail instead of keeping unsupported groups intact")
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--targets", default="mlp", help="HF models only: mlp, attention or all (default mlp)")
        sp.add_argument("--skip-first", type=int, default=0, metavar="N",
                        help="HF models only: keep the first N layers intact (e.g. the paper's recipe: 5)")
        sp.add_argument("--skip-last", type=int, default=0, metavar="N",
                        help="HF models only: keep the last N layers intact (e.g. the paper's recipe: 4)")
        add_checkpoint_options(sp)
        add_width_options(sp)
        sp.add_argument("--calibration", default="self" if name == "compress" else None, metavar="SRC",
                        help="calibration data: 'self' (the model makes it: sampled text for causal LMs, random "
                             "vocabulary words for encoders), a .txt file of text, or a .pt tensor of token ids "
                             "(n, L); CNNs: 'self' (DeepInversion images), a .pt/.pth/.npy file of inputs or "
                             "'fmnist'. fold/prune: enables calibrated compression; compress: default self")
        sp.add_argument("--n-calib", type=int, default=None, metavar="N",
                        help="calibration sequences (default 8 for causal LMs, 128 for encoders)")
        sp.add_argument("--calib-len", type=int, default=None, metavar="L",
                        help="tokens per calibration sequence (default 512 for causal LMs, 32 for encoders)")
        _method_options(sp, name)

    sp = sub.add_parser("inspect", help="list the channel groups of a model and how they are coupled")
    _common(sp)
    sp.add_argument("-v", "--verbose", action="store_true", help="list every slice of every group")
    from .eval import add_parser as add_eval

    add_eval(sub)
    return p


def _common(sp: argparse.ArgumentParser) -> None:
    """Options every command has: the model and what to keep."""
    sp.add_argument("model", metavar="MODEL", help="model to load (see 'modelfold --help')")
    sp.add_argument("--weights", help="state_dict file (.pt/.pth/.safetensors) to load into MODEL")
    sp.add_argument("--input-shape", type=input_shape, help="example input shape, e.g. 1,3,224,224 "
                    "(default: 1,3,224,224 for torchvision, 1,1,32,32 for the zoo)")
    sp.add_argument("--ignore", nargs="*", default=[], metavar="MODULE",
                    help="module names (from model.named_modules()) to keep intact")
    sp.add_argument("--keep-outputs", nargs="*", default=[], metavar="MODULE",
                    help="module names whose output channels (and the groups coupled to them, e.g. a "
                    "residual stream) are kept; their input channels may still fold")


def _method_options(sp: argparse.ArgumentParser, name: str) -> None:
    """The options of one command among fold, prune and compress."""
    sp.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the checks before trusting the result: the CNN coupling check and the one forward "
                         "every result runs before it is written (default: both run)")
    if name in ("fold", "compress"):
        add_device_option(sp, name)
    if name == "compress":
        sp.add_argument("--method", choices=("select", "fold"), default="select",
                        help="select (default: keep the neurons/heads with the highest score) or fold "
                             "(k-means on activation features, merge)")
        sp.add_argument("--score", choices=("act", "wanda", "flap", "magnitude", "obs"), default="act",
                        help="selection score (default act: activation norm x consumer column norm; obs: "
                             "greedy structured OBS, transformers only)")
        sp.add_argument("--budget", choices=("auto", "uniform"), default="auto",
                        help="with --sparsity: per-layer ratios by measured sensitivity (auto, default) or "
                             "one ratio for every layer")
        sp.add_argument("--compensate", choices=("ls", "bias", "none"), default="ls",
                        help="repair after selection: ls (default: least-squares refit of the consumers, its "
                             "ridge chosen on held-out calibration sequences), bias (the removed neurons' mean "
                             "output into the consumer's bias, as FLAP; transformers only) or none")
        sp.add_argument("--lam", type=_lam, default="auto",
                        help="ridge of the least-squares refit, relative to the mean diagonal of the Gram matrix "
                             "(default auto: chosen per consumer on held-out calibration sequences; "
                             "transformers only)")
    if name == "fold":
        sp.add_argument("--repair", default="none", choices=api.REPAIRS,
                        help="none = Fold-Naive, ar = Fold-AR, dir = Fold-DIR (data-free), "
                             "data = Fold-R (needs --data)")
        sp.add_argument("--data", metavar="FILE",
                        help="Fold-R inputs: a .pt/.pth tensor (N, ...), a .npy array, or 'fmnist' (the "
                             "Fashion-MNIST training images, for the zoo models); the first 1024 are used")
        sp.add_argument("--ar-rho", choices=RHO_MODES, default=None,
                        help="Fold-AR: weights that estimate each cluster's channel correlation "
                             "(default pooled; see docs/repair.md)")
        sp.add_argument("--dir-batch", type=int, default=None,
                        help="Fold-DIR: number of synthetic images (default 128)")
        sp.add_argument("--dir-iters", type=int, default=None,
                        help="Fold-DIR: DeepInversion optimization steps (default 100)")
    else:
        sp.add_argument("--norm", type=int, default=2, choices=(1, 2), help="L1 or L2 row norm (default 2)")
    if name == "prune":
        sp.add_argument("--merge", choices=("neuron",), default=None,
                        help="CNNs: neuron = Neuron Merging (Kim et al. 2020, data-free): pruned channels' "
                             "consumer columns go to their most similar kept channel")


def _lam(text: str) -> str | float:
    """``--lam``: "auto" or a ridge >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}")
    return value
