"""Fold-DIR: DeepInversion inputs match the BN statistics; caching; use inside fold()."""

from __future__ import annotations

import pytest
import torch
from repair_helpers import TinyCNN, accuracy, tiny_task, train

import modelfold
from modelfold.errors import InputShapeError
from modelfold.traced.repair import RepairError
from modelfold.traced.repair import dir as dir_mod
from modelfold.traced.repair.dir import DIRSettings, synthetic_batch

SETTINGS = DIRSettings(batch=64, iters=80, lr=0.2, seed=0)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return train(TinyCNN(16))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A module-wide DIR cache, so fold(repair="dir") below reuses the batch synthesized first."""
    path = tmp_path_factory.mktemp("mfcache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELFOLD_CACHE", str(path))
    yield path
    mp.undo()


def _bn_gaps(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per BN layer: mean |batch mean - running mean| + |batch var - running var|."""
    gaps = []

    def hook(m, inp):
        y = inp[0]
        gaps.append(float((y.mean((0, 2, 3)) - m.running_mean).abs().mean()
                          + (y.var((0, 2, 3), unbiased=False) - m.running_var).abs().mean()))

    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return gaps


def test_deepinversion_matches_bn_statistics(trained, cache):
    x = synthetic_batch(trained, (1, 8, 8), SETTINGS)
    (entry,) = (cache / "dir").glob("*.pt")
    history = torch.load(entry, weights_only=True)["bn_loss"].tolist()
    assert x.shape == (64, 1, 8, 8)
    assert history[-1] < 0.2 * history[0]
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for g_syn, g_noise in zip(_bn_gaps(trained, x), _bn_gaps(trained, noise), strict=True):
        assert g_syn < 0.5 * g_noise
    # the class term makes the batch class-balanced for the teacher
    pred = trained(x).argmax(1)
    assert torch.bincount(pred, minlength=4).min() >= 8


def test_synthetic_batch_is_cached_per_model_and_settings(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    s = DIRSettings(batch=8, iters=3)
    info: dict = {}
    a = synthetic_batch(trained, (1, 8, 8), s, info=info)
    assert info["source"] == "synthesized"
    assert len(list((tmp_path / "dir").glob("*.pt"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(dir_mod, "synthesize", boom)
    assert torch.equal(synthetic_batch(trained, (1, 8, 8), s, info=info), a)
    assert info["source"] == "cache"
    with pytest.raises(AssertionError, match="cache miss"):  # other settings -> other entry
        synthetic_batch(trained, (1, 8, 8), DIRSettings(batch=8, iters=4))
    other = TinyCNN(16).eval()
    with pytest.raises(AssertionError, match="cache miss"):  # other weights -> other entry
        synthetic_batch(other, (1, 8, 8), s)


def test_fold_dir_restores_bn_statistics(trained, cache, monkeypatch):
    x, y = tiny_task(1000, seed=11)
    monkeypatch.setattr(dir_mod, "synthesize", None)  # must come from the cache (same settings)
    folded, rep = modelfold.fold(trained, x[:1], ratio=0.5, repair="dir", dir_batch=SETTINGS.batch,
                                 dir_iters=SETTINGS.iters, dir_lr=SETTINGS.lr, return_report=True)
    naive = modelfold.fold(trained, x[:1], ratio=0.5, repair="none")
    assert rep.repair == "dir"
    assert rep.repair_info["dir_batch"] == "cache" and rep.repair_info["bn_reset"] > 0
    assert "dir_batch=cache" in str(rep)
    # the folded model's BN statistics changed from the merged averages (they were re-estimated)
    bn_d = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_n = [m for m in naive.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.allclose(a.running_var, b.running_var) for a, b in zip(bn_d, bn_n, strict=True))
    assert accuracy(folded, x, y) >= accuracy(naive, x, y) - 0.02


def test_fold_dir_bad_inputs(trained):
    with pytest.raises(InputShapeError):
        modelfold.fold(trained, (torch.randn(1, 1, 8, 8),), ratio=0.5, repair="dir")
    with pytest.raises(RepairError, match="positive"):
        modelfold.fold(trained, torch.randn(1, 1, 8, 8), ratio=0.5, repair="dir", dir_iters=-1)
