"""Alias of :mod:`modelfold.hf.checkpoint` (the layer-by-layer paths moved there); kept for one release."""

from .checkpoint.run import EXECUTORS, fold_checkpoint, prune_checkpoint
from .checkpoint.shards import ShardReader, ShardWriter, parse_size
from .checkpoint.source import Source, checkpoint_bytes, open_source, skeleton

__all__ = ["EXECUTORS", "ShardReader", "ShardWriter", "Source", "checkpoint_bytes", "fold_checkpoint",
           "open_source", "parse_size", "prune_checkpoint", "skeleton"]
