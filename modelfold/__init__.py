"""modelfold: data-free compression of trained networks by model folding."""

from . import errors, io
from .api import REPAIRS, channel_groups, compress, fold, prune
from .cluster import kmeans
from .export import export_onnx
from .report import FoldReport, GroupReport
from .traced.groups import ChannelGroup, Slice

__all__ = ["REPAIRS", "ChannelGroup", "FoldReport", "GroupReport", "Slice", "channel_groups", "compress", "errors", "io",
           "export_onnx", "fold", "kmeans", "prune"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing transformers is slow and optional
    if name in ("load_pretrained", "fold_checkpoint", "prune_checkpoint"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'modelfold' has no attribute {name!r}")
