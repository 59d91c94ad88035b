"""modelfold: data-free compression of trained networks by model folding."""

from . import errors, io
from .api import REPAIRS, channel_groups, fold, prune
from .cluster import kmeans
from .groups import ChannelGroup, Slice
from .report import FoldReport, GroupReport

__all__ = ["REPAIRS", "ChannelGroup", "FoldReport", "GroupReport", "Slice", "channel_groups", "errors", "io",
           "fold", "kmeans", "prune"]
__version__ = "0.1.0"
