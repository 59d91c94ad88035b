"""Layer-by-layer calibrated compression equals the in-memory result, bit for bit."""

import pytest
import torch
from hf_models import make_model
from safetensors.torch import load_file

import modelfold.hf as mh
from modelfold.hf.calib.compress import compress_model
from modelfold.hf.checkpoint import compress_checkpoint


def tensors(d):
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _ids():
    return torch.randint(3, 61, (5, 18), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("family,kw", [
    ("llama", {"sparsity": 0.2, "targets": "all"}),  # automatic budget: a measuring pass first
    ("qwen2", {"ratio": 0.3, "method": "fold", "targets": "mlp"}),
    ("bert", {"ratio": 0.4, "targets": "all", "budget": "uniform"}),
    ("llama", {"sparsity": 0.25, "targets": "all", "score": "obs", "feedback": True}),  # two streams carried
])
def test_streamed_equals_in_memory(family, kw, tmp_path):
    src = tmp_path / "src"
    make_model(family).save_pretrained(src, max_shard_size="20KB")
    rep = compress_checkpoint(src, tmp_path / "st", calibration=_ids(), max_shard_size="30KB", progress=False, **kw)
    mem = compress_model(mh.load_any(src), calibration=_ids(), **kw)
    mh.save(mem, tmp_path / "mem")
    got, want = tensors(tmp_path / "st"), tensors(tmp_path / "mem")
    assert set(got) <= set(want)
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    again = mh.load_pretrained(tmp_path / "st")
    assert again.config.to_dict().get("modelfold_layers") == mem.config.to_dict().get("modelfold_layers")
    assert rep.param_sparsity > 0.05


def test_streamed_self_calibration_uses_the_cached_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_model("mistral").save_pretrained(src)
    rep = compress_checkpoint(src, tmp_path / "a", ratio=0.3, n_calib=2, calib_len=12, progress=False)
    assert rep.repair_info["source"] == "sampled"
    rep2 = compress_checkpoint(src, tmp_path / "b", ratio=0.3, n_calib=2, calib_len=12, progress=False)
    assert rep2.repair_info["source"] == "cache"
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    mem = compress_model(mh.load_any(src), ratio=0.3, n_calib=2, calib_len=12)
    mh.save(mem, tmp_path / "mem")
    want = tensors(tmp_path / "mem")
    assert all(torch.equal(a[k], want[k]) for k in a)
