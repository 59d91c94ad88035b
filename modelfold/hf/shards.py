"""Alias of :mod:`modelfold.hf.checkpoint.shards`; kept for one release."""

from .checkpoint.shards import INDEX, WEIGHT_SUFFIXES, ShardReader, ShardWriter, finalize, parse_size

__all__ = ["INDEX", "WEIGHT_SUFFIXES", "ShardReader", "ShardWriter", "finalize", "parse_size"]
