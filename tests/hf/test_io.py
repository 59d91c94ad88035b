"""save -> reload: vanilla from_pretrained for uniform folds, modelfold loader for per-layer sizes."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, inputs, make_model, out

import modelfold
import modelfold.hf as mh
from modelfold.errors import CheckpointError


def _vanilla(path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_fold_reloads_with_vanilla_from_pretrained(family, tmp_path):
    m = make_model(family)
    targets = "mlp" if family == "bert" else "all"
    f = modelfold.fold(m, ratio=0.5, targets=targets)
    mh.save(f, tmp_path / "out")
    assert mh.is_hf_dir(tmp_path / "out")
    g = _vanilla(tmp_path / "out")
    x = inputs()
    assert torch.allclose(out(g, x), out(f, x), atol=1e-5, rtol=0)
    assert not hasattr(g.config, "modelfold_layers")


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_plan_reloads_with_modelfold_loader(family, tmp_path):
    m = make_model(family)
    f = modelfold.fold(m, ratio={0: 0.25, 2: {"mlp": 0.5, "attention": 0.5}})
    mh.save(f, tmp_path / "out")
    g = mh.load_pretrained(tmp_path / "out")
    x = inputs()
    assert torch.allclose(out(g, x), out(f, x), atol=1e-5, rtol=0)
    assert type(g) is type(f)
    with pytest.raises(Exception, match="mismatch|size"):  # vanilla refuses instead of loading garbage
        _vanilla(tmp_path / "out")
    h = mh.load_any(tmp_path / "out")
    assert torch.equal(out(h, x), out(g, x))


def test_bert_head_fold_needs_modelfold_loader(tmp_path):
    m = make_model("bert")
    f = modelfold.fold(m, ratio=0.5, targets="all")
    mh.save(f, tmp_path / "out")
    assert f.config.num_attention_heads == 4  # BertConfig cannot express 2 heads of size 8
    g = mh.load_pretrained(tmp_path / "out")
    assert torch.allclose(out(g, inputs()), out(f, inputs()), atol=1e-5, rtol=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    m = make_model("llama")
    dest = tmp_path / "out"
    mh.save(m, dest)
    good = sorted(p.name for p in dest.iterdir())
    f = modelfold.fold(m, ratio=0.5)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(f), "save_pretrained", boom)
    with pytest.raises(CheckpointError, match="unchanged"):
        mh.save(f, dest)
    assert sorted(p.name for p in dest.iterdir()) == good
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers
    g = mh.load_pretrained(dest)
    assert torch.allclose(out(g, inputs()), out(m, inputs()), atol=1e-5, rtol=0)


def test_save_refuses_the_directory_the_model_came_from(tmp_path):
    src = tmp_path / "orig"
    mh.save(make_model("llama"), src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    m = mh.load_pretrained(src)
    f = modelfold.fold(m, ratio=0.5)
    with pytest.raises(CheckpointError, match="loaded from"):
        mh.save(f, src)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["orig"]
    mh.save(f, tmp_path / "small")  # anywhere else is fine
    assert mh.is_hf_dir(tmp_path / "small")


def test_load_errors(tmp_path):
    assert not mh.is_hf_dir(tmp_path)
    with pytest.raises(CheckpointError):
        mh.load_any(tmp_path)
    with pytest.raises(CheckpointError):
        mh.load_pretrained(tmp_path / "missing")
