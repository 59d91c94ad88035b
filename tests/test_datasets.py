"""Fashion-MNIST loading (skipped when the Debian package dataset-fashion-mnist is absent)."""

from __future__ import annotations

import pytest
import torch

from modelfold import datasets


def _have_fmnist() -> bool:
    try:
        datasets.fashion_mnist_dir()
    except FileNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(
    not _have_fmnist(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    class _Empty:
        stdout = ""

    monkeypatch.setattr(datasets.subprocess, "run", lambda *a, **k: _Empty())
    monkeypatch.setattr(datasets, "_DEFAULT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist_dir()


@needs_fmnist
def test_shapes_and_dtypes() -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        x, y = datasets.fashion_mnist(split)
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.bincount(y).tolist() == [n // 10] * 10


@needs_fmnist
def test_normalization_and_padding() -> None:
    x, _ = datasets.fashion_mnist("train")
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-3
    background = -datasets.FMNIST_MEAN / datasets.FMNIST_STD
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :, :2].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))


@needs_fmnist
def test_cached() -> None:
    assert datasets.fashion_mnist("test")[0] is datasets.fashion_mnist("test")[0]


@needs_fmnist
def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        datasets.fashion_mnist("val")


@needs_fmnist
def test_loader_limit_and_seeded_shuffle() -> None:
    def first_labels(seed: int) -> torch.Tensor:
        loader = datasets.fashion_mnist_loader("test", batch_size=64, shuffle=True, seed=seed, limit=300)
        return next(iter(loader))[1]

    loader = datasets.fashion_mnist_loader("test", batch_size=128, shuffle=False, limit=300)
    assert len(loader.dataset) == 300
    assert [len(b[0]) for b in loader] == [128, 128, 44]
    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))
