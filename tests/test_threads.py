"""Same seed, same result with 1, 2 or 8 torch threads (BLAS splits sums by thread count).

The thread count is changed inside the process (``torch.set_num_threads`` also sets BLAS's pool);
the matrices are large enough that BLAS splits the work.
"""

from __future__ import annotations

import pytest
import torch

import modelfold
from modelfold import cluster
from modelfold.cluster import kmeans

THREADS = (1, 2, 8)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _each(fn):
    out = []
    for t in THREADS:
        torch.set_num_threads(t)
        out.append(fn())
    return out


def _features(seed: int, n: int = 320, d: int = 300) -> torch.Tensor:
    """Wide features (PCA path) with near-duplicate rows: many close decisions."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n // 2, d, generator=g) * torch.rand(1, d, generator=g)
    return torch.cat([base, base + 1e-3 * torch.randn(n // 2, d, generator=g)])[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("candidates,projected", [(False, False), (True, False), (False, True), (True, True)])
def test_kmeans_bit_identical_across_thread_counts(candidates: bool, projected: bool, monkeypatch) -> None:
    if candidates:  # the candidate-cluster refinement used for LLM-sized layers
        monkeypatch.setattr(cluster, "FULL_SPACE_ENTRIES", 1000)
    if projected:  # refinement in the projected space (layers too large for full-space products)
        monkeypatch.setattr(cluster, "REFINE_MACS", 1000)
    x = _features(0)
    runs = _each(lambda: kmeans(x, 200, seed=5))
    for r in runs[1:]:
        assert torch.equal(r.labels, runs[0].labels)
        assert r.inertia == runs[0].inertia and r.iterations == runs[0].iterations
    assert torch.bincount(runs[0].labels, minlength=200).min() >= 1


def test_projection_bit_identical_across_thread_counts() -> None:
    x = _features(1)
    runs = _each(lambda: cluster.project(x, 128, seed=2))
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_cnn_fold_bit_identical_across_thread_counts() -> None:
    from tests.nets import VGGish, randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(VGGish(w=16).eval())
    x = torch.randn(2, 3, 16, 16)
    runs = _each(lambda: modelfold.fold(model, x, ratio=0.4, seed=1).state_dict())
    for sd in runs[1:]:
        assert sd.keys() == runs[0].keys()
        assert all(torch.equal(sd[k], runs[0][k]) for k in sd)


def test_transformers_fold_bit_identical_across_thread_counts() -> None:
    from tests.hf.hf_models import make_model

    model = make_model("llama", layers=1, inter=256)
    runs = _each(lambda: modelfold.fold(model, ratio=0.3, seed=2).state_dict())
    for sd in runs[1:]:
        assert all(torch.equal(sd[k], runs[0][k]) for k in sd)
