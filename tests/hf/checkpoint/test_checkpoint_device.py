"""device= for layer-by-layer calibrated compression: on the CPU the same code path, bit for bit.

No GPU here: the oracles are device="cpu" against the default, a refused "cuda", and a run with torch's
default device set to ``meta`` (a tensor created without naming its device lands there and the first
mix with real tensors fails; a device-clean run gives exactly the normal bytes).
"""

import pytest
import torch
from hf_models import make_model
from safetensors.torch import load_file

from modelfold.device import DeviceError
from modelfold.hf.calib.blocks import BlockInputs
from modelfold.hf.checkpoint import compress_checkpoint
from modelfold.hf.checkpoint.calibrated import inputs_to


def tensors(d):
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _ids():
    return torch.randint(3, 61, (5, 18), generator=torch.Generator().manual_seed(4))


def same(a, b):
    assert set(a) == set(b)
    return [k for k in a if not (b[k].device.type == "cpu" and torch.equal(a[k], b[k]))]


KW = [{"sparsity": 0.2, "targets": "all"}, {"sparsity": 0.25, "targets": "all", "score": "obs", "feedback": True},
      {"ratio": 0.3, "method": "fold", "budget": "uniform"}]


@pytest.mark.parametrize("kw", KW, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_device_cpu_is_bit_identical_to_the_default(kw, tmp_path):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src, max_shard_size="20KB")
    ref = compress_checkpoint(src, tmp_path / "ref", calibration=_ids(), progress=False, **kw)
    got = compress_checkpoint(src, tmp_path / "cpu", calibration=_ids(), progress=False, device="cpu", **kw)
    assert ref.param_sparsity > 0.05
    assert same(tensors(tmp_path / "ref"), tensors(tmp_path / "cpu")) == []
    assert ref.repair_info["plan"] == got.repair_info["plan"]


@pytest.mark.parametrize("family,kw", [("llama", {"sparsity": 0.2, "targets": "all"}),
                                       ("qwen2", {"ratio": 0.3, "budget": "uniform"})])
def test_no_tensor_is_created_on_the_default_device(family, kw, tmp_path):
    src = tmp_path / "src"
    make_model(family).save_pretrained(src, max_shard_size="20KB")
    compress_checkpoint(src, tmp_path / "ref", calibration=_ids(), progress=False, **kw)
    ids = _ids()
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        compress_checkpoint(src, tmp_path / "meta", calibration=ids, progress=False, device="cpu", **kw)
    finally:
        torch.set_default_device(before)
    assert same(tensors(tmp_path / "ref"), tensors(tmp_path / "meta")) == []


def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    with pytest.raises(DeviceError, match="cuda"):
        compress_checkpoint(src, tmp_path / "out", ratio=0.3, calibration=_ids(), progress=False, device="cuda")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_inputs_to_moves_every_tensor_and_keeps_the_structure():
    x = torch.ones(2, 3)
    kw = {"position_embeddings": (torch.zeros(3), torch.ones(3)), "mask": None, "__args__": [torch.ones(1)], "n": 4}
    got = inputs_to(BlockInputs([x], [kw]), torch.device("meta"))
    assert got.xs[0].device.type == "meta" and got.xs[0].shape == (2, 3)
    k = got.kwargs[0]
    assert isinstance(k["position_embeddings"], tuple) and all(t.device.type == "meta" for t in k["position_embeddings"])
    assert k["mask"] is None and k["n"] == 4 and k["__args__"][0].device.type == "meta"
    assert x.device.type == "cpu" and kw["position_embeddings"][0].device.type == "cpu"  # the originals untouched


def test_the_sampling_model_is_freed_before_the_front_is_built(tmp_path, monkeypatch):
    """Self-calibration loads the whole model to sample; the front must not coexist with it (peak memory)."""
    import weakref

    import modelfold.hf.checkpoint.calibrated as cc

    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    alive = []
    full, front = cc._full_model, cc._front

    def spy_full(path):
        m = full(path)
        alive.append(weakref.ref(m))
        return m

    def spy_front(ctx):
        assert alive and alive[0]() is None, "the whole model is still alive when the front is built"
        return front(ctx)

    monkeypatch.setattr(cc, "_full_model", spy_full)
    monkeypatch.setattr(cc, "_front", spy_front)
    rep = compress_checkpoint(src, tmp_path / "out", ratio=0.3, n_calib=2, calib_len=12, progress=False)
    assert rep.repair_info["source"] == "sampled" and len(alive) == 1
