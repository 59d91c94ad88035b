"""Layer-by-layer compression of transformers checkpoints larger than RAM.

``source`` opens a checkpoint directory (meta skeleton + shard reader); ``layers`` runs the per-layer
loop; ``run`` is the entry point (``fold_checkpoint``, ``prune_checkpoint``); ``calibrated`` adds
calibration (``compress_checkpoint``); ``on_ray`` spreads the layers over Ray tasks; ``shards`` reads
and writes safetensors one tensor at a time; ``resume`` makes runs resumable after any death.
"""

from .calibrated import compress_checkpoint
from .run import fold_checkpoint, prune_checkpoint
from .shards import ShardReader, ShardWriter, parse_size
from .source import checkpoint_bytes, skeleton

__all__ = ["ShardReader", "ShardWriter", "checkpoint_bytes", "compress_checkpoint", "fold_checkpoint",
           "parse_size", "prune_checkpoint", "skeleton"]
