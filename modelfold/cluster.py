"""k-means clustering of channel feature vectors, written in torch.

k-means++ seeding, Lloyd iterations, several restarts keeping the lowest inertia,
deterministic for a given seed, no empty clusters. Works on CPU or CUDA tensors.

Wide feature matrices (``d > max_dim``) are first projected onto their top ``max_dim``
principal directions (randomized PCA, seeded). A projection keeps exact duplicates exact,
and makes Lloyd iterations cost ``n * max_dim * k`` instead of ``n * d * k`` (VGG's
classifier groups have d ~ 30k). The reported inertia is always measured on the
original, unprojected features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """Cluster assignment of n points into k clusters."""

    labels: torch.Tensor  # (n,) int64 in [0, k)
    inertia: float  # sum of squared distances to cluster means, original feature space
    relative_error: float  # inertia / sum of squared norms (0 = lossless)
    iterations: int


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, k) between rows of x and rows of c."""
    d = x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding; returns indices of the k initial centers."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen, device="cpu"))
    idx = [first]
    mind = _sq_dists(x, x_sq, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(mind.sum())
        if total <= 0.0:
            # Fewer distinct points than k: take not-yet-chosen points in order.
            chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
            chosen[torch.tensor(idx, device=x.device)] = True
            rest = torch.nonzero(~chosen).squeeze(1)[: k - len(idx)].tolist()
            idx.extend(rest)
            break
        u = float(torch.rand((), generator=gen)) * total
        cum = torch.cumsum(mind.double(), 0)
        nxt = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device))), n - 1)
        idx.append(nxt)
        mind = torch.minimum(mind, _sq_dists(x, x_sq, x[nxt : nxt + 1]).squeeze(1))
    return torch.tensor(idx, device=x.device, dtype=torch.long)


ASSIGN_BLOCK = 1 << 26  # distance entries (256 MB of float32) above which assignment runs in row blocks


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center of every row and its squared distance.

    Small problems compute the whole (n, k) distance matrix at once; beyond ``ASSIGN_BLOCK`` entries
    (LLM-sized layers: 14k neurons x 10k clusters is 575 MB per temporary) it is done in row blocks,
    so memory stays near ``ASSIGN_BLOCK`` entries whatever n and k.
    """
    n, k = x.shape[0], centers.shape[0]
    if n * k <= ASSIGN_BLOCK:
        dist = _sq_dists(x, x_sq, centers)
        labels = dist.argmin(1)
        return labels, dist.gather(1, labels[:, None]).squeeze(1)
    rows = max(1, ASSIGN_BLOCK // k)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    own = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        dist = _sq_dists(x[sl], x_sq[sl], centers)
        labels[sl] = dist.argmin(1)
        own[sl] = dist.gather(1, labels[sl, None]).squeeze(1)
    return labels, own


def _fill_empty(labels: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster the point farthest from its current center (``own``: its distance)."""
    counts = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(counts == 0).squeeze(1).tolist()
    if not empty:
        return labels
    labels = labels.clone()
    own = own.clone()
    for c in empty:
        counts = torch.bincount(labels, minlength=k)
        movable = counts[labels] > 1
        cand = torch.where(movable, own, torch.full_like(own, -1.0))
        p = int(torch.argmax(cand))
        labels[p] = c
        own[p] = -1.0
    return labels


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


_CHUNK = 1024  # rows per chunk: temporaries stay ~chunk x d instead of n x d (large LLM layers)


def _sum_sq(x: torch.Tensor) -> float:
    """Sum of squares: float32 per row, float64 across rows (chunked over rows)."""
    return float(sum(float((c * c).sum(1).double().sum()) for c in x.split(_CHUNK)))


def inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Sum of squared distances of the rows of x to their cluster means."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).double()
    total = _sum_sq(x)
    between = sum(float((c.double().pow(2).sum(1) / n).sum()) for c, n in zip(sums.split(_CHUNK),
                                                                              counts.split(_CHUNK), strict=True))
    return max(0.0, total - between)


def project(x: torch.Tensor, max_dim: int, seed: int = 0) -> torch.Tensor:
    """Coordinates of the rows of x in their top ``max_dim`` principal directions.

    Randomized PCA (one power iteration); a no-op when x is already narrow.
    """
    n, d = x.shape
    if d <= max_dim or n <= max_dim:
        return x
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = min(max_dim + 8, n, d)
    xc = x - x.mean(0, keepdim=True)
    omega = torch.randn(d, q, generator=gen).to(x)
    y = xc @ omega
    y = xc @ (xc.T @ y)
    basis, _ = torch.linalg.qr(y)
    b = basis.T @ xc  # (q, d): coordinates of x in the sketch basis; b = U S V^T
    evals, evecs = torch.linalg.eigh((b @ b.T).double())  # U and S^2, ascending
    top = evecs[:, -max_dim:].flip(1)
    sv = evals[-max_dim:].flip(0).clamp_min(0).sqrt()
    return basis @ (top * sv).to(x)  # = xc V, the principal-component scores


def kmeans(
    features: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 50,
    max_dim: int = 128,
) -> KMeansResult:
    """Cluster the rows of ``features`` (n, d) into ``k`` non-empty clusters.

    Returns the labelling with the lowest inertia over ``n_init`` k-means++ restarts.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    orig = features.detach().to(torch.float32)
    total_sq = _sum_sq(orig)
    if k == n:
        labels = torch.arange(n, device=orig.device)
        return KMeansResult(labels, 0.0, 0.0, 0)
    x = project(orig, max_dim, seed)
    x_sq = (x * x).sum(1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best: tuple[float, torch.Tensor, int] | None = None
    for _ in range(max(1, n_init)):
        centers = x[_kmeans_pp(x, x_sq, k, gen)]
        labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
        it = 0
        while it < max_iter:
            it += 1
            new = _fill_empty(*_assign(x, x_sq, centers), k)
            if torch.equal(new, labels):
                break
            labels = new
            centers = _means(x, labels, k)
        score = float(((x - _means(x, labels, k)[labels]) ** 2).sum())
        if best is None or score < best[0] - 1e-12 * max(1.0, abs(best[0])):
            best = (score, labels, it)
    assert best is not None
    labels = best[1]
    err = inertia(orig, labels, k)
    rel = err / total_sq if total_sq > 0 else 0.0
    return KMeansResult(labels, err, rel, best[2])
