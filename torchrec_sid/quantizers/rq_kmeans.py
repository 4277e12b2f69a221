"""RQ-KMeans: one k-means codebook per residual level; also the k-means pieces that RQ-GMM reuses.

* Distances: ``||c||^2 - 2 x c^T`` by one fused matmul (``addmm``) per chunk of ``chunk_size`` rows and its row
  minimum (``||x||^2``, the same for every centroid, only enters the inertia, as one dot product per chunk), so
  memory stays ``O(chunk_size * K)`` and no ``[N, K, D]`` tensor is ever formed. At levels >= 1 the Lloyd passes
  do not form the residuals ``r = x - sum_l C_l[a_l]`` either: ``-2 r c^T = -2 x c^T + 2 sum_l (C_l c^T)[a_l]``,
  rows of small ``[K, K]`` tables gathered into the matmul's output, and a cluster's residual sum is its sum of
  ``x`` minus its counts of earlier codes times the earlier codebooks.
* The start of each level's k-means is found on a seeded global sample of ``init_rows_per_centroid * K`` rows
  (drawn by global index, the same on every rank, read in row order; never the catalogue), so its cost does not
  grow with N; then ``max_iter`` Lloyd iterations run on all rows.
* Progressive dimensions (faiss's ``ProgressiveDimClustering``, the default training of its
  ``ResidualQuantizer``), on the sample's principal directions: k-means runs first on the projections on the
  ``d_1`` leading principal directions, then on ``d_2 > d_1`` of them starting from the previous centroids padded
  with zeros, ..., with ``d_i = D ** (i / steps)``; the full-data iterations on all D columns start from the
  result. Plain k-means (one stage on all D columns) collapses deep residual levels: residuals of sentence
  embeddings are nearly isotropic, a centroid that averages many of them has a small norm and so is near every
  row, it gathers more rows and shrinks further (rich get richer). On MovieLens text at 3 x 64, level 3 ended with
  perplexity 13 of 64 and 21% of the items in one code; faiss's own k-means per level does the same (perplexity
  8), and faiss's ``ResidualQuantizer`` avoids it only through progressive dimensions. Clustering in few
  dimensions first finds a balanced partition, which later stages refine instead of collapse. faiss takes the
  first columns as they come; principal directions reconstruct better (MovieLens 3 x 64: RMSE 0.02730 against
  0.02778 for the first columns and faiss's 0.02748). ``init="best"`` also seeds plain k-means++ and keeps the
  start with the lower inertia on the sample (:func:`kmeans`).
* Lloyd iterations: counts, sums (one chunk's in float32) and inertia accumulated in float64 and all-reduced
  across ranks; an empty cluster splits the largest cluster (its centroid and the largest one's become that
  centroid scaled by ``1 +- 1/1024`` on alternating dimensions, as faiss does), so a re-seeded code takes half of
  a crowded code's items instead of one outlier row; stop when the inertia changes by at most ``tol`` relative,
  or after ``max_iter`` iterations.
* Lanes: a Lloyd pass (on all rows or on the sample) runs its chunks in two fixed lanes, chunk i in lane i % 2
  (:func:`~torchrec_sid.quantizers.base.in_lanes`): with 2 torch threads, two threads of one intra-op thread
  each, so the work after each chunk's matmul (the row minimum, the scatter-add of the sums, the counts: ops
  that run on one thread or are too small to split well) runs in parallel with the other lane's instead of
  leaving a core idle. Each lane keeps its own statistics, added in lane order, so the result does not depend
  on the thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_sid._dist import ShardLayout, all_reduce_sum_
from torchrec_sid.quantizers.base import (
    LANES,
    Record,
    ResidualQuantizer,
    Residuals,
    Rows,
    gather_global_rows,
    in_lanes,
    integer,
    intra_op_threads,
    one_of,
    read_chunks,
    real,
    register,
    row_chunks,
    setting,
)

SPLIT_EPS = 1.0 / 1024  # relative perturbation of a split centroid (faiss's EPS)
START_TOL = 1e-3  # the Lloyd iterations on the sample (a start, refined on all rows) stop at this relative change
SEEDING_ROWS_PER_CENTROID = 8  # init="best": k-means++ runs on the first 8 * K rows of the sample, as the seeds are
# then refined on the whole sample (greedy k-means++ reads its rows 2 + ln K times per seed: on 32 * 256 rows of 384
# columns, it costs as much as two Lloyd iterations on 100k rows)


def squared_distances(x: Tensor, x_sq: Tensor, centroids: Tensor, centroid_sq: Tensor) -> Tensor:
    """``x: [n, D]``, ``x_sq: [n]``, ``centroids: [K, D]``, ``centroid_sq: [K]`` -> ``[n, K]`` squared distances."""
    return torch.addmm(centroid_sq, x, centroids.T, alpha=-2).add_(x_sq[:, None]).clamp_min_(0)


def nearest_scores(x: Tensor, centroids: Tensor, centroid_sq: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest centroid of each row by ``||c||^2 - 2 x c`` (one fused matmul; the row norms, the same for every
    centroid, are left out): ``x: [n, D]``, ``centroids: [K, D]``, ``centroid_sq: [K]`` ->
    ``(score: [n], codes: LongTensor[n])``; the squared distance is ``score + ||x||^2``."""
    return row_min_(torch.addmm(centroid_sq, x, centroids.T, alpha=-2))


def row_min_(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.min(dim=1)`` of ``scores: [n, K]`` -> ``(values: [n], indices: LongTensor[n])``, the first index
    among ties, at a third of the cost: the (vectorized) ``amin``, then the index by one matrix-vector product of
    the ``scores == min`` mask (written over ``scores``) with ``0..K-1``; rows with ties take the mask's ``argmax``."""
    values = scores.amin(dim=1, keepdim=True)
    mask = torch.eq(scores, values, out=scores)
    indices = torch.mv(mask, torch.arange(scores.shape[1], dtype=scores.dtype)).long()
    tied = (mask.sum(1) != 1).nonzero().flatten()
    if len(tied):
        indices[tied] = mask[tied].argmax(1)
    return values.flatten(), indices


def nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row: ``x: [n, D]``, ``centroids: [K, D]`` -> ``(d2: [n], codes: LongTensor[n])``."""
    score, codes = nearest_scores(x, centroids, (centroids * centroids).sum(1))
    return (score + (x * x).sum(1)).clamp_min_(0), codes


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
    with intra_op_threads(1):  # k - 1 steps of small ops: 1.4x faster on one thread than on two
        for j in range(1, k):
            if d2.sum() == 0:  # every row is already a seed: keep the repeats
                break
            candidates = torch.multinomial(d2, trials, replacement=True, generator=generator)
            d2_if = torch.minimum(d2, squared_distances(sample[candidates], sample_sq[candidates], sample,
                                                        sample_sq))  # [trials, S]: 1.5x faster than [S, trials]
            best = int(d2_if.sum(1).argmin())
            index[j], d2 = candidates[best], d2_if[best]
    return sample[index].clone()


def global_sample(x: Rows, layout: ShardLayout, size: int, generator: torch.Generator) -> Tensor:
    """A seeded sample of ``min(N, size)`` rows of the global catalogue ``x: [n, D]`` (this rank's rows), the same on
    every rank (drawn by global index and gathered, never the catalogue) -> ``[S, D]``."""
    index = torch.randperm(layout.total_rows, generator=generator)[: min(layout.total_rows, size)]
    return gather_global_rows(x, index, layout)


def seed_centroids(x: Rows, k: int, layout: ShardLayout, rows_per_centroid: int,
                   generator: torch.Generator) -> Tensor:
    """k-means++ on a seeded global sample of ``min(N, rows_per_centroid * k)`` rows of ``x: [n, D]`` -> ``[k, D]``."""
    return kmeans_plus_plus(global_sample(x, layout, rows_per_centroid * k, generator), k, generator)


def split_largest_(centroids: Tensor, counts: Tensor, empty: Tensor) -> None:
    """Re-seeds each ``empty`` cluster by splitting the currently largest one, in place (faiss's rule).

    ``centroids: [K, D]``, ``counts: [K]`` float64 (updated: the split halves the count), ``empty``: indices. The
    largest cluster is the first of the largest counts, so the result depends only on the reduced statistics.
    """
    sign = torch.ones(centroids.shape[1])
    sign[1::2] = -1
    for e in empty.tolist():
        j = int(torch.argmax(counts))
        centroids[e] = centroids[j] * (1 + SPLIT_EPS * sign)
        centroids[j] = centroids[j] * (1 - SPLIT_EPS * sign)
        counts[e] = counts[j] / 2
        counts[j] -= counts[e]


def lloyd(x: Rows, centroids: Tensor, layout: ShardLayout, *, max_iter: int, tol: float, chunk_size: int,
          record: Record, reduce: bool = True) -> Tensor:
    """Lloyd iterations from ``centroids: [K, D]`` on ``x: [n, D]`` (this rank's rows) -> ``[K, D]``.

    Calls ``record`` once per iteration with ``iteration``, ``rmse`` (per element, of the assignment to the
    iteration's centroids), ``utilization`` (fraction of non-empty clusters in that assignment, before any
    re-seeding), ``max_share`` (the largest cluster's fraction of the rows) and ``reseeded`` (empty clusters
    re-seeded, by splitting the largest, in the update that produced the iteration's centroids). ``reduce=False``:
    ``x`` is the same on every rank (a gathered sample), nothing is all-reduced. Residuals of a level >= 1 are
    assigned without being formed (:func:`_residual_pass`).
    """
    k, dim = centroids.shape
    deep = x if isinstance(x, Residuals) and x.level else None
    pairs_size = deep.level * k * _earlier(deep)[0].shape[1] if deep is not None else 0
    norms = _squared_norm(x, chunk_size)  # the inertia's sum ||x||^2, the same every iteration
    previous, reseeded = None, 0
    for iteration in range(max_iter):
        flat = torch.zeros(k + 1 + k * dim + pairs_size, dtype=torch.float64)  # one all-reduce
        counts, inertia_sum = flat[:k], flat[k : k + 1]
        sums, pairs = flat[k + 1 : k + 1 + k * dim].view(k, dim), flat[k + 1 + k * dim :]
        inertia_sum += norms
        if deep is not None:
            _residual_pass(deep, centroids, chunk_size, counts, sums, inertia_sum, pairs)
        else:
            _row_pass(x, centroids, chunk_size, counts, sums, inertia_sum)
        if reduce:
            all_reduce_sum_(flat)
        if deep is not None:
            sums -= _earlier_codeword_sums(deep, pairs)
        inertia = max(inertia_sum.item(), 0.0)
        empty = (counts == 0).nonzero().flatten()
        record({"iteration": iteration, "rmse": math.sqrt(inertia / (layout.total_rows * dim)),
                "utilization": 1.0 - len(empty) / k, "max_share": counts.max().item() / layout.total_rows,
                "reseeded": reseeded})
        if previous is not None and abs(previous - inertia) <= tol * inertia:
            break
        previous = inertia
        centroids = (sums / counts.clamp_min(1)[:, None]).float()
        split_largest_(centroids, counts.clone(), empty)
        reseeded = len(empty)
    return centroids


def _row_pass(x: Rows, centroids: Tensor, chunk_size: int, counts: Tensor, sums: Tensor, inertia: Tensor) -> None:
    """Assigns the rows of ``x: [n, D]`` to ``centroids: [K, D]``; adds to the float64 ``counts: [K]``,
    ``sums: [K, D]`` (one chunk's in float32) and ``inertia: [1]`` (the scores, without ``sum ||x||^2``). The
    chunks run in lanes (:func:`~torchrec_sid.quantizers.base.in_lanes`), their statistics added in lane order."""
    centroid_sq = (centroids * centroids).sum(1)

    def lane(index: int) -> tuple[Tensor, Tensor, Tensor]:
        lane_counts, lane_sums = torch.zeros_like(counts), torch.zeros_like(sums)
        lane_inertia, chunk_sums = torch.zeros_like(inertia), torch.empty_like(centroids)
        for _, chunk in read_chunks(x, chunk_size, index, LANES):
            score, codes = nearest_scores(chunk, centroids, centroid_sq)
            lane_counts += torch.bincount(codes, minlength=len(centroids))
            lane_sums += chunk_sums.zero_().index_add_(0, codes, chunk)
            lane_inertia += score.sum(dtype=torch.float64)
        return lane_counts, lane_sums, lane_inertia

    for lane_counts, lane_sums, lane_inertia in in_lanes(lane):
        counts += lane_counts
        sums += lane_sums
        inertia += lane_inertia


def _residual_pass(x: Residuals, centroids: Tensor, chunk_size: int, counts: Tensor, sums: Tensor,
                   inertia: Tensor, pairs: Tensor) -> None:
    """:func:`_row_pass` for the residuals ``r = x - sum_{l < L} C_l[a_l]`` of level ``L = x.level >= 1``, without
    forming them (forming them costs more than the matmul's epilogue at deep levels).

    Scores: ``||c||^2 - 2 r.c = -2 x.c + (||c||^2 + 2 sum_l C_l[a_l].c)``, the bracket summed by one
    ``embedding_bag`` from the rows of per-level ``[K', K]`` tables. ``sums`` get the rows of ``x`` and
    ``pairs: [L * K * K']`` the counts of (code, level-l code) pairs, from which :func:`_earlier_codeword_sums`
    gives the codewords to subtract; ``inertia`` gets the scores, without ``sum ||r||^2``.
    """
    k, level = len(centroids), x.level
    earlier, earlier_codes = _earlier(x)
    width = earlier.shape[1]
    tables = 2 * earlier @ centroids.T  # [L, K', K]
    tables[0] += (centroids * centroids).sum(1)
    tables = tables.reshape(level * width, k)
    table_rows = torch.arange(level) * width
    assigned = torch.empty(len(x), dtype=torch.long)

    def lane(index: int) -> tuple[Tensor, Tensor]:
        lane_sums, lane_inertia, chunk_sums = torch.zeros_like(sums), torch.zeros_like(inertia), torch.empty_like(
            centroids)
        for rows in row_chunks(len(x), chunk_size, index, LANES):
            chunk, codes_before = x.x[rows].float(), earlier_codes[rows]
            scores = F.embedding_bag(codes_before + table_rows, tables, mode="sum").addmm_(chunk, centroids.T,
                                                                                            alpha=-2)
            score, assigned[rows] = row_min_(scores)
            lane_sums += chunk_sums.zero_().index_add_(0, assigned[rows], chunk)
            lane_inertia += score.sum(dtype=torch.float64)
        return lane_sums, lane_inertia

    for lane_sums, lane_inertia in in_lanes(lane):
        sums += lane_sums
        inertia += lane_inertia
    counts += torch.bincount(assigned, minlength=k)
    pair_index = assigned[:, None] * width + earlier_codes + torch.arange(level) * (k * width)  # [n, L]
    pairs += torch.bincount(pair_index.flatten(), minlength=len(pairs))


def _earlier(x: Residuals) -> tuple[Tensor, Tensor]:
    """The earlier levels of residuals of level ``L``: codebooks ``[L, K', D]`` and codes ``[n, L]``."""
    assert x.codebooks is not None and x.codes is not None
    return x.codebooks[: x.level], x.codes[:, : x.level]


def _earlier_codeword_sums(x: Residuals, pairs: Tensor) -> Tensor:
    """Per cluster, the sum of its rows' earlier codewords ``sum_l M_l C_l`` -> ``[K, D]`` float64, from the counts
    ``pairs: [L * K * K']`` of (code, level-l code) pairs (``M_l: [K, K']``, :func:`_residual_pass`)."""
    earlier = _earlier(x)[0].double()  # [L, K', D]
    return torch.bmm(pairs.view(x.level, -1, earlier.shape[1]), earlier).sum(0)


def _squared_norm(x: Rows, chunk_size: int) -> Tensor:
    """``sum_i ||x_i||^2`` over the rows of ``x: [n, D]`` -> ``[1]`` float64."""
    total = torch.zeros(1, dtype=torch.float64)
    for _, chunk in read_chunks(x, chunk_size):
        row_sq = chunk.reshape(-1)
        total += torch.dot(row_sq, row_sq).double()
    return total


def progressive_dims(dim: int, steps: int) -> list[int]:
    """The column counts of progressive-dimension k-means: ``int(dim ** (i / steps))`` for ``i = 1..steps``,
    distinct, ending at ``dim`` (``steps <= 1``: ``[dim]``). ``progressive_dims(384, 10) == [1, 3, 5, 10, 19, 35, 64,
    116, 211, 384]``."""
    dims = sorted({max(1, int(dim ** (i / steps))) for i in range(1, steps + 1)} | {dim}) if steps > 1 else [dim]
    return [d for d in dims if d <= dim]


def principal_basis(x: Rows, layout: ShardLayout, chunk_size: int, *, reduce: bool = True) -> Tensor:
    """The principal directions of ``x: [n, D]`` over all ranks (``reduce=False``: of this rank's rows, e.g. a
    gathered sample), by decreasing variance -> ``basis: [D, D]`` (columns; each signed so that its largest entry
    is positive, so the result does not depend on the solver)."""
    dim = x.shape[1]
    flat = torch.zeros(dim + dim * dim, dtype=torch.float64)
    total, outer = flat[:dim], flat[dim:].view(dim, dim)
    for rows in row_chunks(len(x), chunk_size):
        r = x[rows]
        total += r.sum(0, dtype=torch.float64)
        outer += (r.T @ r).double()  # one chunk's in float32: half the cost of float64
    if reduce:
        all_reduce_sum_(flat)
    mean = total / layout.total_rows
    _, vectors = torch.linalg.eigh(outer / layout.total_rows - torch.outer(mean, mean))
    vectors = vectors.flip(1)
    sign = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
    return (vectors * torch.where(sign == 0, 1.0, sign)).float()


def inertia(x: Rows, centroids: Tensor, chunk_size: int, *, reduce: bool = True) -> float:
    """Sum over all ranks' rows (``reduce=False``: this rank's) of ``x: [n, D]`` of the squared distance to the
    nearest of ``centroids: [K, D]``."""
    total = torch.zeros(1, dtype=torch.float64)
    for _, chunk in read_chunks(x, chunk_size):
        total += nearest(chunk, centroids)[0].double().sum()
    return (all_reduce_sum_(total) if reduce else total).item()


def progressive_start(sample: Tensor, k: int, generator: torch.Generator, *, tol: float, chunk_size: int,
                      steps: int, stage_iter: int, stage: str, record: Record) -> Tensor:
    """Progressive-dimension k-means (module docstring) on a gathered ``sample: [S, D]`` -> ``[k, D]`` centroids
    in the sample's coordinates, the start of the full-data Lloyd iterations.

    Stage ``d`` of :func:`progressive_dims` (all but the last, ``D``) clusters the sample's projections on its
    ``d`` leading principal directions (at most ``stage_iter`` Lloyd iterations, recorded as
    ``stage + "_progressive"`` with their ``dims``), starting from the previous stage's centroids padded with zeros;
    the first stage is seeded by k-means++. The stages run on the sample only: they find a balanced partition,
    which the full-data iterations refine, at a cost that does not grow with N.
    """
    dims = progressive_dims(sample.shape[1], steps)
    layout = ShardLayout(0, len(sample), len(sample))
    basis = principal_basis(sample, layout, chunk_size, reduce=False)
    centroids = kmeans_plus_plus(sample @ basis[:, : dims[0]], k, generator)
    for d in dims[:-1]:
        padded = torch.zeros(k, d)
        padded[:, : centroids.shape[1]] = centroids
        centroids = lloyd(sample @ basis[:, :d], padded, layout, max_iter=stage_iter, tol=tol, chunk_size=chunk_size,
                          record=_tagged(record, f"{stage}_progressive", d), reduce=False)
    return centroids @ basis[:, : centroids.shape[1]].T  # back to the input's coordinates


INITS = ("best", "progressive", "kmeans++")


def kmeans(x: Rows, k: int, layout: ShardLayout, generator: torch.Generator, *, init: str, max_iter: int,
           tol: float, chunk_size: int, rows_per_centroid: int, progressive_steps: int, progressive_iter: int,
           stage: str, record: Record) -> Tensor:
    """k-means of ``x: [n, D]`` (this rank's rows) -> centroids ``[k, D]``: a start found on a seeded global sample
    of ``min(N, rows_per_centroid * k)`` rows, then ``max_iter`` Lloyd iterations (at most) on all rows. The
    iterations on the sample stop when the inertia changes by at most ``max(tol, START_TOL)`` relative.

    ``init``: ``"progressive"`` (:func:`progressive_start`), ``"kmeans++"`` (k-means++ seeds), or ``"best"``: both,
    each refined by ``progressive_iter`` Lloyd iterations on the sample's D columns (recorded as
    ``stage + "_sample_<name>"``), keeping the lower inertia on the sample (recorded as ``stage + "_choice"`` with
    ``start``, the name kept, and each candidate's sample ``rmse_<name>``). The full-data iterations are recorded as
    ``stage``. Progressive k-means avoids the collapse of deep levels; on well-separated blobs its low-dimensional
    stages can merge two blobs, which k-means++ does not.
    """
    sample = global_sample(x, layout, rows_per_centroid * k, generator)
    start_tol = max(tol, START_TOL)
    starts: dict[str, Tensor] = {}
    if init in ("best", "progressive") and progressive_steps > 1:
        starts["progressive"] = progressive_start(sample, k, generator, tol=start_tol, chunk_size=chunk_size,
                                                  steps=progressive_steps, stage_iter=progressive_iter, stage=stage,
                                                  record=record)
    if init in ("best", "kmeans++") or not starts:  # seeds refined on the sample need fewer seeding rows
        seeding_rows = SEEDING_ROWS_PER_CENTROID * k if starts else len(sample)
        starts["kmeans++"] = kmeans_plus_plus(sample[:seeding_rows], k, generator)
    chosen = next(iter(starts))
    if len(starts) > 1:
        chosen, starts = _choose_on_sample(sample, starts, tol=start_tol, chunk_size=chunk_size,
                                           iterations=progressive_iter, stage=stage, record=record)
    return lloyd(x, starts[chosen], layout, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                 record=_tagged(record, stage, x.shape[1]))


def _choose_on_sample(sample: Tensor, starts: dict[str, Tensor], *, tol: float, chunk_size: int, iterations: int,
                      stage: str, record: Record) -> tuple[str, dict[str, Tensor]]:
    """Refines each start ``{name: [k, D]}`` by ``iterations`` Lloyd iterations on ``sample: [S, D]``; returns the
    name of the one with the lower inertia on the sample (ties: progressive) and the refined centroids."""
    layout, dim = ShardLayout(0, len(sample), len(sample)), sample.shape[1]
    refined = {name: lloyd(sample, c, layout, max_iter=iterations, tol=tol, chunk_size=chunk_size,
                           record=_tagged(record, f"{stage}_sample_{name}", dim), reduce=False)
               for name, c in starts.items()}
    errors = {name: inertia(sample, c, chunk_size, reduce=False) for name, c in refined.items()}
    chosen = min(errors, key=lambda name: (errors[name], name != "progressive"))
    record({"stage": f"{stage}_choice", "iteration": 0, "start": chosen, "sample_rows": len(sample),
            "rmse": math.sqrt(errors[chosen] / (len(sample) * dim)),
            **{f"rmse_{name}": math.sqrt(e / (len(sample) * dim)) for name, e in errors.items()}})
    return chosen, refined


def _tagged(record: Record, stage: str, dims: int) -> Record:
    """``record`` with ``stage`` and ``dims`` added to every entry."""
    return lambda entry: record({"stage": stage, "dims": dims, **entry})


@register("rq_kmeans")
@dataclass(kw_only=True, eq=False)
class RQKMeans(ResidualQuantizer):
    """Residual k-means: ``levels`` codebooks of ``codebook_size`` centroids fit on successive residuals.

    Args:
        levels, codebook_size, chunk_size, seed: as in :class:`~torchrec_sid.quantizers.base.ResidualQuantizer`.
        max_iter: Lloyd iterations per level (on all D columns), at most.
        tol: stop a stage when the inertia changes by at most this fraction.
        init_rows_per_centroid: each level's start is found on a seeded sample of ``min(N, this * K)`` rows.
        init: ``"best"`` (progressive-dimension k-means and k-means++, each refined on the sample's D columns; the
            lower inertia on the sample wins), ``"progressive"`` or ``"kmeans++"`` (plain k-means, which collapses
            deep levels of text embeddings). See :func:`kmeans`.
        progressive_steps: stages of progressive-dimension k-means (module docstring; faiss uses 10; 0 or 1: none).
        progressive_iter: Lloyd iterations, at most, of each progressive stage and of each candidate's refinement
            on the sample (both run on the sample only).

    Example::

        x = torch.randn(1000, 16)  # [N, D]
        q = RQKMeans(levels=2, codebook_size=8).fit(x)
        codes = q.encode(x)  # [1000, 2], values in [0, 8)
        x_hat = q.decode(codes)  # [1000, 16]
    """

    max_iter: int = setting(30, integer(1))
    tol: float = setting(1e-4, real(0.0))
    init_rows_per_centroid: int = setting(32, integer(1))
    init: str = setting("best", one_of(*INITS))
    progressive_steps: int = setting(10, integer(0))
    progressive_iter: int = setting(10, integer(1))

    def _fit_level(self, residual: Rows, level: int, layout: ShardLayout, generator: torch.Generator,
                   record: Record) -> None:
        self.codebooks_[level] = kmeans(
            residual, self.codebook_size, layout, generator, init=self.init, max_iter=self.max_iter, tol=self.tol,
            chunk_size=self.chunk_size, rows_per_centroid=self.init_rows_per_centroid,
            progressive_steps=self.progressive_steps, progressive_iter=self.progressive_iter, stage="kmeans",
            record=record)

    def _assign(self, residual: Tensor, level: int) -> Tensor:
        return nearest(residual, self.codebooks_[level])[1]
