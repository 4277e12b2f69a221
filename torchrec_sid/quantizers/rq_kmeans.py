"""RQ-KMeans: one k-means codebook per residual level; also the k-means pieces that RQ-GMM reuses.

* Distances: ``||x||^2 - 2 x c^T + ||c||^2``, one matmul per chunk of ``chunk_size`` rows, so memory stays
  ``O(chunk_size * K)`` and no ``[N, K, D]`` tensor is ever formed.
* Seeding: greedy k-means++ on a seeded sample of ``init_rows_per_centroid * K`` rows drawn by global index
  (the same sample on every rank, gathered row by row, never the catalogue).
* Lloyd iterations: counts, sums and inertia accumulated in float64 and all-reduced across ranks; an empty
  cluster is re-seeded at the worst-reconstructed row of the whole catalogue; stop when the inertia changes by
  at most ``tol`` relative, or after ``max_iter`` iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchrec_sid._dist import ShardLayout, all_reduce_sum_, gather_rows, worst_rows
from torchrec_sid.quantizers.base import Record, ResidualQuantizer, integer, real, register, row_chunks, setting


def squared_distances(x: Tensor, x_sq: Tensor, centroids: Tensor, centroid_sq: Tensor) -> Tensor:
    """``x: [n, D]``, ``x_sq: [n]``, ``centroids: [K, D]``, ``centroid_sq: [K]`` -> ``[n, K]`` squared distances."""
    return (x_sq[:, None] - 2 * x @ centroids.T + centroid_sq).clamp_min_(0)


def nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row: ``x: [n, D]``, ``centroids: [K, D]`` -> ``(d2: [n], codes: LongTensor[n])``."""
    d2 = squared_distances(x, (x * x).sum(1), centroids, (centroids * centroids).sum(1))
    return d2.min(dim=1)


def kmeans_plus_plus(sample: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Picks ``k`` rows of ``sample: [S, D]`` by greedy k-means++ -> ``[k, D]``.

    Each step draws ``2 + ln k`` candidates by D^2 sampling and keeps the one that lowers the total squared
    distance most (as scikit-learn does): plain k-means++ puts two seeds in one of 12 well-separated 32-d
    blobs about one time in three.
    """
    trials = 2 + int(math.log(k))
    sample_sq = (sample * sample).sum(1)
    first = torch.randint(len(sample), (1,), generator=generator)
    index = first.repeat(k)
    d2 = squared_distances(sample, sample_sq, sample[first], sample_sq[first])[:, 0]  # [S] to the nearest seed
    for j in range(1, k):
        if d2.sum() == 0:  # every row is already a seed: keep the repeats
            break
        candidates = torch.multinomial(d2, trials, replacement=True, generator=generator)
        d2_if = torch.minimum(d2[:, None], squared_distances(sample, sample_sq, sample[candidates],
                                                             sample_sq[candidates]))  # [S, trials]
        best = int(d2_if.sum(0).argmin())
        index[j], d2 = candidates[best], d2_if[:, best].contiguous()
    return sample[index].clone()


def seed_centroids(x: Tensor, k: int, layout: ShardLayout, rows_per_centroid: int,
                   generator: torch.Generator) -> Tensor:
    """k-means++ on a seeded global sample of ``min(N, rows_per_centroid * k)`` rows of ``x: [n, D]`` -> ``[k, D]``."""
    size = min(layout.total_rows, rows_per_centroid * k)
    index = torch.randperm(layout.total_rows, generator=generator)[:size]
    return kmeans_plus_plus(gather_rows(x, index, layout), k, generator)


def lloyd(x: Tensor, centroids: Tensor, layout: ShardLayout, *, max_iter: int, tol: float, chunk_size: int,
          record: Record) -> Tensor:
    """Lloyd iterations from ``centroids: [K, D]`` on ``x: [n, D]`` (this rank's rows) -> ``[K, D]``.

    Calls ``record`` once per iteration with ``iteration``, ``rmse`` (per element, of the assignment to the
    iteration's centroids), ``utilization`` (fraction of non-empty clusters) and ``reseeded`` (empty clusters
    re-seeded in the update that produced the iteration's centroids).
    """
    k, dim = centroids.shape
    previous, reseeded = None, 0
    for iteration in range(max_iter):
        counts = torch.zeros(k, dtype=torch.float64)
        sums = torch.zeros(k, dim, dtype=torch.float64)
        error = torch.empty(len(x))
        for rows in row_chunks(len(x), chunk_size):
            error[rows], codes = nearest(x[rows], centroids)
            counts += torch.bincount(codes, minlength=k)
            sums.index_add_(0, codes, x[rows].double())
        flat = all_reduce_sum_(torch.cat([counts, error.double().sum().view(1), sums.flatten()]))
        counts, inertia, sums = flat[:k], flat[k].item(), flat[k + 1 :].view(k, dim)
        empty = (counts == 0).nonzero().flatten()
        record({"iteration": iteration, "rmse": math.sqrt(inertia / (layout.total_rows * dim)),
                "utilization": 1.0 - len(empty) / k, "reseeded": reseeded})
        if previous is not None and abs(previous - inertia) <= tol * inertia:
            break
        previous = inertia
        centroids = (sums / counts.clamp_min(1)[:, None]).float()
        if len(empty):
            centroids[empty] = gather_rows(x, worst_rows(error, len(empty), layout), layout)
        reseeded = len(empty)
    return centroids


@register("rq_kmeans")
@dataclass(kw_only=True, eq=False)
class RQKMeans(ResidualQuantizer):
    """Residual k-means: ``levels`` codebooks of ``codebook_size`` centroids fit on successive residuals.

    Args:
        levels, codebook_size, chunk_size, seed: as in :class:`~torchrec_sid.quantizers.base.ResidualQuantizer`.
        max_iter: Lloyd iterations per level, at most.
        tol: stop a level when the inertia changes by at most this fraction.
        init_rows_per_centroid: k-means++ runs on a seeded sample of ``min(N, this * K)`` rows.

    Example::

        x = torch.randn(1000, 16)  # [N, D]
        q = RQKMeans(levels=2, codebook_size=8).fit(x)
        codes = q.encode(x)  # [1000, 2], values in [0, 8)
        x_hat = q.decode(codes)  # [1000, 16]
    """

    max_iter: int = setting(30, integer(1))
    tol: float = setting(1e-4, real(0.0))
    init_rows_per_centroid: int = setting(32, integer(1))

    def _fit_level(self, residual: Tensor, level: int, layout: ShardLayout, generator: torch.Generator,
                   record: Record) -> None:
        centroids = seed_centroids(residual, self.codebook_size, layout, self.init_rows_per_centroid, generator)
        self.codebooks_[level] = lloyd(residual, centroids, layout, max_iter=self.max_iter, tol=self.tol,
                                       chunk_size=self.chunk_size, record=lambda e: record({"stage": "kmeans", **e}))

    def _assign(self, residual: Tensor, level: int) -> Tensor:
        return nearest(residual, self.codebooks_[level])[1]
