"""IFM baseline: greedy pair merging yields k clusters, merges most similar first, exact on duplicates."""

from __future__ import annotations

import pytest
import torch
from nets import MLP, ResNetish, VGGish, double, randomize_bn

from modelfold.report import count_params
from modelfold.traced.baselines import ifm, ifm_labels


def test_ifm_labels_give_k_dense_clusters():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 17, 40):
        labels = ifm_labels(x, k)
        assert labels.shape == (40,)
        assert sorted(labels.unique().tolist()) == list(range(k))
    with pytest.raises(ValueError):
        ifm_labels(x, 0)


def test_ifm_merges_the_most_similar_pair_first():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.05], [-1.0, 0.2]])
    labels = ifm_labels(x, 3)
    assert labels[0] == labels[2] and len({int(labels[1]), int(labels[3]), int(labels[0])}) == 3


def test_ifm_uses_size_weighted_centroids():
    # a, a, b: after merging the two a's, the centroid is still a, so c (close to a) joins it
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.8, 0.6])
    labels = ifm_labels(torch.stack([a, a, b, c]), 2)
    assert labels[0] == labels[1] == labels[3] != labels[2]


@pytest.mark.parametrize("make,shape", [(ResNetish, (3, 16, 16)), (VGGish, (3, 16, 16)), (MLP, (12,))])
def test_ifm_is_exact_on_duplicated_networks(make, shape):
    small = randomize_bn(make(4), 1).eval()
    big = double(small, make(8)).eval()
    x = torch.randn(4, *shape)
    out, report = ifm(big, x[:1], ratio=0.5, return_report=True)
    assert report.method == "ifm"
    assert count_params(out) == count_params(small)
    assert torch.allclose(out(x), small(x), atol=1e-4)
