"""ShardWriter: each tensor's bytes written once behind reserved header room; a header that outgrows it still works."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from modelfold.hf.checkpoint import shards
from modelfold.hf.checkpoint.shards import ShardWriter


def _tensors(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(3 + i % 4, 5, generator=g).to(torch.bfloat16)
            for i in range(n)}


def test_expected_tensors_are_written_once_and_read_back(tmp_path, monkeypatch):
    ts = _tensors(torch.Generator().manual_seed(0), 40)

    def no_copy(*a, **k):
        raise AssertionError("a shard was rewritten")

    monkeypatch.setattr(shutil, "copyfileobj", no_copy)
    w = ShardWriter(tmp_path, 200, expected={k: v.shape for k, v in ts.items()})
    for k, v in ts.items():  # smaller tensors than announced are fine too (folding only shrinks)
        w.add(k, v[:2] if k.endswith("7.mlp.up_proj.weight") else v)
    w.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and not list(tmp_path.glob("*.tmp"))
    got = {}
    for f in files:
        got.update(load_file(str(f)))
        header = int.from_bytes(f.read_bytes()[:8], "little")
        assert header % 8 == 0  # tensor data stays 8-byte aligned
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert torch.equal(got[k], v[:2] if k.endswith("7.mlp.up_proj.weight") else v), k


def test_header_larger_than_reserved_is_rewritten_once_correctly(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_UNKNOWN_RESERVE", 16)  # far too little room for the header below
    ts = _tensors(torch.Generator().manual_seed(1), 12)
    ts["unexpected." + "x" * 300] = torch.arange(7)
    w = ShardWriter(tmp_path, 10**6)
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(ts) and all(torch.equal(got[k], ts[k]) for k in ts)
    assert not list(tmp_path.glob("*.tmp"))


def test_unsupported_dtype_is_refused(tmp_path):
    from modelfold.errors import CheckpointError

    w = ShardWriter(tmp_path, 100)
    with pytest.raises(CheckpointError, match="dtype"):
        w.add("c", torch.zeros(2, dtype=torch.complex64))
    w.abort()
