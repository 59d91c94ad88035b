"""k-means clustering of channel feature vectors, written in torch.

Pipeline (docs/kmeans.md): wide features are projected onto their top ``max_dim`` principal
directions (randomized PCA, seeded); ``n_init`` restarts of batched k-means++ seeding and Lloyd
iterations run there; the best restart is then refined in the *full* feature space by
Hartigan-style single-point moves (each point may move to one of its nearest clusters when that
lowers the inertia, cluster sizes taken into account), which reaches lower inertia than Lloyd alone.
Layers too large for full-space products (n*k*d above ``REFINE_MACS``, e.g. a 7B model's 11008-neuron
MLPs) are refined in the projected space instead; beyond ``FULL_SPACE_ENTRIES`` distances, each point
considers only its ``CANDIDATES`` nearest clusters and only the changed (point, cluster) pairs are
recomputed each round.

Reproducibility: every decision is taken on exact arithmetic. Features are scaled by a power of two
and rounded onto an integer grid small enough that all dot products, squared distances and sums of
points are integers below 2^53, so float64 computes them exactly whatever the summation order: the
same labels with any number of threads (BLAS splits sums by thread count) and on any device. The
PCA, which is not exact, runs on one thread. No empty clusters; inertia is of the original features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """Cluster assignment of n points into k clusters."""

    labels: torch.Tensor  # (n,) int64 in [0, k)
    inertia: float  # sum of squared distances to cluster means, original feature space
    relative_error: float  # inertia / sum of squared norms (0 = lossless)
    iterations: int


ASSIGN_BLOCK = 1 << 21  # distance entries (16 MB of float64) above which assignment runs in row blocks
CANDIDATES = 8  # nearest clusters (found in the projected space) a point may move to in the full space
FULL_SPACE_ENTRIES = 1 << 27  # up to this n*k (1 GiB of distances), moves consider every cluster, else CANDIDATES
REFINE_MACS = 1 << 36  # up to this n*k*d the moves are refined in the full space, beyond in the projected one
SMALL_MACS = 1 << 26  # below this n*k*dim, k-means runs on one thread
SEED_ROUNDS = 16  # k-means++ seeding picks its centers in this many batches (one distance product each)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed torch CPU work on one thread (for the steps that are not exact)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled by a power of two and rounded to integers (float64) for exact k-means arithmetic.

    With b bits per coordinate, |x.c| and ||x - c||^2 stay below 4 d 2^(2b) <= 2^53 and sums of n
    points below n 2^b, so float64 represents every partial sum exactly, in any order.
    """
    n, d = x.shape
    bits = min((51 - math.ceil(math.log2(max(d, 2)))) // 2, 52 - math.ceil(math.log2(max(n, 2))))
    m = float(x.abs().max())
    if m == 0.0:
        return torch.zeros(n, d, dtype=torch.float64, device=x.device)
    return torch.round(x.double() * 2.0 ** (bits - math.frexp(m)[1]))


def _total(v: torch.Tensor) -> float:
    """Sum of a 1-D float64 tensor in a fixed order (a sequential scan): the same with any thread count."""
    return float(torch.cumsum(v, 0)[-1]) if v.numel() else 0.0


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, k) between rows of x and rows of c (exact on grid values)."""
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor,
            top: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` nearest centers of every row (n, top) and their squared distances, in row blocks
    beyond ``ASSIGN_BLOCK`` distance entries (memory stays bounded whatever n and k). Ties go to the
    lower center index, so exact ties decide the same way everywhere."""
    n, k = x.shape[0], centers.shape[0]
    top = min(top, k)
    rows = max(1, ASSIGN_BLOCK // k)
    c_sq = (centers * centers).sum(1)
    labels = torch.empty(n, top, dtype=torch.long, device=x.device)
    own = torch.empty(n, top, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        # |c|^2 - 2 x.c: the row's |x|^2 does not change its order (integers: exact in any order)
        dist = torch.addmm(c_sq[None, :], x[sl], centers.T, alpha=-2.0)
        if top == 1:
            labels[sl] = dist.argmin(1, keepdim=True)
        else:  # stable sort: equal distances keep index order
            labels[sl] = torch.sort(dist, dim=1, stable=True).indices[:, :top]
        own[sl] = (dist.gather(1, labels[sl]) + x_sq[sl, None]).clamp_min_(0.0)
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


def _sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of each cluster (k, d). One thread: the parallel scatter is memory-bound and, on a
    busy machine, orders of magnitude slower than the serial one."""
    with _one_thread():
        return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means rounded back onto the grid (exact sums, correctly rounded division)."""
    sums = _sums(x, labels, k)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
    return torch.round(sums / counts[:, None])


def _seed(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Batched k-means++: centers drawn with probability ~ D^2 in ``SEED_ROUNDS`` batches.

    Each batch is drawn without replacement from the current D^2 distribution, then D^2 is updated
    with one distance product: a few products instead of k sequential passes over the data.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen, device="cpu"))
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen[first] = True
    mind = _sq_dists(x, x_sq, x[first:first + 1]).squeeze(1)
    picked = [torch.tensor([first], device=x.device)]
    have = 1
    per = max(1, math.ceil((k - 1) / SEED_ROUNDS))
    while have < k:
        b = min(per, k - have)
        w = torch.where(chosen, torch.zeros_like(mind), mind)
        if int((w > 0).sum()) < b:  # fewer distinct points left than centers: take unchosen ones in order
            w = torch.where(chosen, torch.zeros_like(mind), w + 1.0)
        # Gumbel-top-b on log weights = sampling b points without replacement proportionally to w.
        u = torch.rand(n, generator=gen, dtype=torch.float64, device="cpu").to(x.device)
        key = torch.log(w) - torch.log(-torch.log(u.clamp_min(1e-300)))
        new = torch.sort(key, descending=True, stable=True).indices[:b]
        chosen[new] = True
        picked.append(new)
        have += b
        mind = torch.minimum(mind, _assign(x, x_sq, x[new])[1].squeeze(1))
    return torch.cat(picked)


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, labels: torch.Tensor | None, centers: torch.Tensor | None,
           k: int, max_iter: int) -> tuple[torch.Tensor, int]:
    """Lloyd iterations from ``centers`` (or the means of ``labels``) until the labels repeat."""
    it = 0
    if centers is None:
        assert labels is not None
        centers = _means(x, labels, k)
    while it < max_iter:
        it += 1
        lab, own = _assign(x, x_sq, centers)
        new = _fill_empty(lab.squeeze(1), own.squeeze(1), k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = _means(x, labels, k)
    assert labels is not None
    return labels, it


def _cost(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Inertia on the grid (a deterministic float)."""
    r = x - _means(x, labels, k)[labels]
    return _total((r * r).sum(1))


def _pair_dists(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, c_sq: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared distances of the pairs (x[rows[i]], centers[cols[i]]), in blocks of pairs."""
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    step = max(1, ASSIGN_BLOCK // (4 * max(1, x.shape[1])))
    for start in range(0, rows.numel(), step):
        r, c = rows[start:start + step], cols[start:start + step]
        dot = (x[r] * centers[c]).sum(1)  # integers: exact in any order
        out[start:start + step] = (x_sq[r] - 2.0 * dot + c_sq[c]).clamp_min_(0.0)
    return out


def _join(dist: torch.Tensor, cols: torch.Tensor | None, labels: torch.Tensor,
          cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheapest cluster to join for each row (cost n_b/(n_b+1) |x-c_b|^2, own cluster excluded), and
    its cost. ``cols``: the cluster of each column (None: column j is cluster j). Ties: lowest column."""
    f = cnt / (cnt + 1.0)
    if cols is None:
        j = dist * f[None, :]
        j.scatter_(1, labels[:, None], math.inf)
        best = j.argmin(1, keepdim=True)
        return j.gather(1, best).squeeze(1), best.squeeze(1)
    j = torch.where(cols == labels[:, None], math.inf, dist * f[cols])
    best = j.argmin(1, keepdim=True)
    return j.gather(1, best).squeeze(1), cols.gather(1, best).squeeze(1)


def _hartigan(x: torch.Tensor, x_sq: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor | None, k: int,
              max_rounds: int = 200) -> tuple[torch.Tensor, int]:
    """Single-point moves to candidate clusters (all when ``cand`` is None) while they lower the inertia.

    Moving x from cluster a (size n_a) to b changes the inertia by n_b/(n_b+1) |x-c_b|^2 -
    n_a/(n_a-1) |x-c_a|^2 (Hartigan's rule). Each round applies, at once, the best move of every
    point whose gain is the largest among the moves touching its two clusters, so applied moves never
    share a cluster and their gains add up. Only the distances to clusters that changed are recomputed.
    """
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    sums = _sums(x, labels, k)
    cnt = torch.bincount(labels, minlength=k).to(x.dtype)
    centers = torch.round(sums / cnt.clamp_min(1)[:, None])
    c_sq = (centers * centers).sum(1)
    if cand is None:
        dist = _sq_dists(x, x_sq, centers)
    else:
        dist = _pair_dists(x, x_sq, centers, c_sq, rows.repeat_interleave(cand.shape[1]), cand.reshape(-1))
        dist = dist.view(cand.shape)
    labels = labels.clone()
    cost, dst = _join(dist, cand, labels, cnt)
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - reported
        n_a = cnt[labels]
        own = dist[rows, labels] if cand is None else (dist * (cand == labels[:, None])).sum(1)
        leave = torch.where(n_a > 1, n_a / (n_a - 1).clamp_min(1) * own, -math.inf)
        gain = leave - cost
        movers = torch.nonzero(gain > 1e-9 * own.clamp_min(1.0)).squeeze(1)
        if movers.numel() == 0:
            break
        g, a, b = gain[movers], labels[movers], dst[movers]
        top = torch.full((k,), -math.inf, dtype=x.dtype, device=x.device)
        top = top.scatter_reduce(0, a, g, "amax").scatter_reduce(0, b, g, "amax")
        ok = (g == top[a]) & (g == top[b])
        movers, a, b = movers[ok], a[ok], b[ok]
        first = torch.full((k,), n, dtype=torch.long, device=x.device)
        first = first.scatter_reduce(0, a, movers, "amin").scatter_reduce(0, b, movers, "amin")
        ok = (first[a] == movers) & (first[b] == movers)
        movers, a, b = movers[ok], a[ok], b[ok]
        labels[movers] = b
        one = torch.ones(movers.numel(), dtype=x.dtype, device=x.device)
        with _one_thread():
            sums.index_add_(0, a, -x[movers]).index_add_(0, b, x[movers])
            cnt.index_add_(0, a, -one).index_add_(0, b, one)
        changed = torch.sort(torch.cat([a, b])).values
        centers[changed] = torch.round(sums[changed] / cnt[changed, None])
        c_sq[changed] = (centers[changed] ** 2).sum(1)
        hit = torch.zeros(k, dtype=torch.bool, device=x.device)
        hit[changed] = True
        if cand is not None:  # only the (row, candidate) pairs whose cluster changed are recomputed
            pr, ps = torch.nonzero(hit[cand], as_tuple=True)
            redo, at = torch.unique(pr, return_inverse=True)
            col = torch.full((k,), -1, dtype=torch.long, device=x.device)
            col[changed] = torch.arange(changed.numel(), device=x.device)
            step = max(1, ASSIGN_BLOCK // changed.numel())  # rows per product: memory stays bounded
            for s0 in range(0, redo.numel(), step):  # a product beats gathering the pairs one by one
                sub = _sq_dists(x[redo[s0:s0 + step]], x_sq[redo[s0:s0 + step]], centers[changed])
                m = torch.nonzero((at >= s0) & (at < s0 + step)).squeeze(1)
                dist[pr[m], ps[m]] = sub[at[m] - s0, col[cand[pr[m], ps[m]]]]
            cost[redo], dst[redo] = _join(dist[redo], cand[redo], labels[redo], cnt)
            continue
        new = _sq_dists(x, x_sq, centers[changed])
        dist[:, changed] = new
        redo = hit[dst] | hit[labels]  # best choice got worse, or own cluster changed: whole row again
        full = torch.nonzero(redo).squeeze(1)
        cost[full], dst[full] = _join(dist[full], None, labels[full], cnt)
        keep = torch.nonzero(~redo).squeeze(1)  # own cluster unchanged: only the changed columns can win
        sub = new[keep] * (cnt[changed] / (cnt[changed] + 1.0))[None, :]
        i = sub.argmin(1, keepdim=True)
        v, c = sub.gather(1, i).squeeze(1), changed[i.squeeze(1)]
        take = (v < cost[keep]) | ((v == cost[keep]) & (c < dst[keep]))
        cost[keep[take]], dst[keep[take]] = v[take], c[take]
    return labels, rounds


_CHUNK = 1024  # rows per chunk: temporaries stay ~chunk x d instead of n x d (large LLM layers)


def _sum_sq(x: torch.Tensor) -> float:
    """Sum of squares in float64, rows reduced in a fixed order."""
    return sum(_total((c.double() ** 2).sum(1)) for c in x.split(_CHUNK))


def inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Sum of squared distances of the rows of x to their cluster means (float64, in row chunks)."""
    x = x.detach()
    parts = list(zip(x.split(_CHUNK), labels.split(_CHUNK), strict=True))
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    with _one_thread():
        for c, lab in parts:
            sums.index_add_(0, lab, c.double())
    means = sums.div_(torch.bincount(labels, minlength=k).clamp_min(1).double()[:, None])
    return sum(_total(((c.double() - means[lab]) ** 2).sum(1)) for c, lab in parts)


def project(x: torch.Tensor, max_dim: int, seed: int = 0) -> torch.Tensor:
    """Coordinates of the rows of x in their top ``max_dim`` principal directions.

    Randomized PCA (one power iteration), on one thread so that the result does not depend on the
    thread count; a no-op when x is already narrow.
    """
    n, d = x.shape
    if d <= max_dim or n <= max_dim:
        return x
    with _one_thread():
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = min(max_dim + 8, n, d)
        xc = x - x.mean(0, keepdim=True)
        omega = torch.randn(d, q, generator=gen, device="cpu").to(x)
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

    The best of ``n_init`` seeded restarts (in the projected space), refined in the full space (in the
    projected one for very large layers, see the module docstring).
    The labels depend only on the features, ``k``, ``seed``, ``n_init``, ``max_iter`` and ``max_dim``
    (not on the torch thread count).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
    n, d = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    with _one_thread():  # a parallel check of a small tensor waits on busy cores (measured 30 ms for 64 x 810)
        finite = bool(torch.isfinite(features).all())
    if not finite:
        raise ValueError("features contain NaN or Inf")
    if n * k * min(d, max_dim) <= SMALL_MACS:  # small products gain nothing from threads (and lose on busy CPUs)
        with _one_thread():
            return _kmeans(features, k, seed, n_init, max_iter, max_dim)
    return _kmeans(features, k, seed, n_init, max_iter, max_dim)


def _kmeans(features: torch.Tensor, k: int, seed: int, n_init: int, max_iter: int, max_dim: int) -> KMeansResult:
    n, d = features.shape
    orig = features.detach().to(torch.float32)
    total_sq = _sum_sq(orig)
    if k == n:
        return KMeansResult(torch.arange(n, device=orig.device), 0.0, 0.0, 0)
    projected = d > max_dim and n > max_dim
    low = _grid(project(orig, max_dim, seed) if projected else orig)
    low_sq = (low * low).sum(1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best: tuple[float, torch.Tensor, int] | None = None
    for _ in range(max(1, n_init)):
        labels, it = _lloyd(low, low_sq, None, low[_seed(low, low_sq, k, gen)], k, max_iter)
        score = _cost(low, labels, k)
        if best is None or score < best[0]:
            best = (score, labels, it)
    assert best is not None
    labels, it = best[1], best[2]
    if k > 1:  # refine in the full space while its products stay affordable, else in the projected one
        space = _grid(orig) if projected and n * k * d <= REFINE_MACS else low
        cand = None
        if n * k > FULL_SPACE_ENTRIES:
            cand = _assign(low, low_sq, _means(low, labels, k), top=CANDIDATES)[0]
            cand = torch.where((cand == labels[:, None]).any(1, keepdim=True), cand,
                               torch.cat([labels[:, None], cand[:, 1:]], 1))
        labels, rounds = _hartigan(space, (space * space).sum(1), labels, cand, k)
        it += rounds
    err = inertia(orig, labels, k)
    rel = err / total_sq if total_sq > 0 else 0.0
    return KMeansResult(labels, err, rel, it)
