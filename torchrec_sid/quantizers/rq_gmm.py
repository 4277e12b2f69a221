"""RQ-GMM (arXiv 2602.12593): a diagonal Gaussian mixture fit by EM at every residual level.

Per level (method notes: ``shared/papers/rq_gmm.md``):

* init: from the k-means clusters of :func:`~torchrec_sid.quantizers.rq_kmeans.kmeans` (progressive dimensions,
  ``init_iter`` Lloyd iterations on all columns): each component starts at its cluster's mean, per-dimension
  variance (plus nothing, floored at ``floor``) and share of the rows (an empty cluster: the level's variance and
  the weight of one row), so the first E-step starts from the k-means partition instead of spreading every row
  over many components (the previous rule: every variance the level's variance, ``pi_k = 1 / K``).

Where RQ-GMM cannot beat RQ-KMeans on RMSE: k-means descends the decode's squared error itself (nearest centroid
for fixed centroids, cluster means for fixed codes), while EM maximises likelihood; the MAP code weighs distances
by the component variances, which costs squared error. Even the true generating mixture's own MAP read-out
reconstructs a diagonal Gaussian mixture with unequal variances worse than k-means at the same K
(``benchmarks/quantizer_quality.py``: RMSE 1.800 against 1.753, one level, 16 components). From the second level
on, residuals are zero-centred with unequal spreads: the likelihood is best served by components that differ in
variance, not in mean, and their means reconstruct almost nothing (2 levels x 16: RMSE 13.7% above RQ-KMeans).
* E-step: ``log pi_k + log N(r | mu_k, diag(var_k))`` for all rows and components from one float32 matmul per
  chunk, ``[r, r*r] @ -0.5 [-2 mu/var, 1/var]^T`` (never ``[N, K, D]``; ``-0.5`` is folded into the weights, which
  is exact), plus a float64 per-component constant; the row max, log-sum-exp and responsibilities in float64. A
  responsibility below ``e^-70`` of its row's best is 0, so a chunk's responsibilities are kept sparse (row,
  component, value): on the speed benchmark's MovieLens embeddings (K = 256) about 1.7 per row are non-zero, and
  the log-sum-exp exponentiates only those. A chunk of fewer than ``MIN_GEMM_ROWS`` rows is zero-padded to that
  many: MKL's small-matrix path rounds a row's products differently from the path of a large chunk, and the same row
  must give the same value wherever the chunks and ranks cut the rows.
* M-step from sufficient statistics ``N_k, S1_k = sum gamma r, S2_k = sum gamma r*r``, gathered in the E-step's
  chunk loop (one pass over the rows per iteration), accumulated over chunks and all-reduced over ranks in float64;
  ``var = max(S2/N_k - mu^2, floor)`` with ``floor = max(var_floor_ratio * mean_d Var(r_d), min_variance)``. While
  at most ``SPARSE_DENSITY`` of a chunk's responsibilities are non-zero, the sums are a float64 scatter-add of the
  non-zero ``gamma * [r, r*r]`` (products of float32 numbers, exact in float64); denser chunks use one float64
  matmul. float64 because these sums run over rows: in float32 their rounding depended on how rows were split into
  chunks and ranks, and 30 EM iterations amplified that 1e-7 to different codes for 1,214 of MovieLens' 1,682 items
  on 2 processes; in float64 the split changes the statistics by about 1e-16, below float32 parameters' resolution.
* a component with total responsibility below one row is dead: its mean moves to the worst-reconstructed row,
  its variance to the level's variance, its weight to ``1 / K`` (weights renormalised).
* stop when the mean log-likelihood changes by at most ``tol`` relative, or after ``max_iter`` iterations.
  (:meth:`RQGMM.initial_mixture` and :func:`fit_em` are a level's two halves: ``benchmarks/quantizer_speed.py``
  times EM alone from a start it also gives scikit-learn.)
* code = MAP component (``argmax log pi + log N``); next residual = input minus that component's mean
  (``residual="posterior_mean"`` subtracts ``sum_k gamma_k mu_k`` instead while fitting; encoding is always MAP).
* two reconstructions: ``decode(codes)`` (MAP: the sum of the coded means, what a SID can give back) and
  :meth:`RQGMM.posterior_mean_reconstruction` (``sum_l sum_k gamma_lk mu_lk`` along the soft residual chain: it
  needs ``x``, not codes, so it is the mixture's fit of ``x``, not a quantizer's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from torchrec_sid._dist import ShardLayout, all_reduce_sum_, gather_rows, worst_rows
from torchrec_sid.quantizers.base import (
    QuantizerInput,
    Record,
    ResidualQuantizer,
    Rows,
    gather_global_rows,
    integer,
    one_of,
    real,
    register,
    row_chunks,
    setting,
)
from torchrec_sid.quantizers.rq_kmeans import INITS, kmeans, nearest, seed_centroids

DEAD_MASS = 1.0  # a component whose total responsibility is below one row's is re-seeded
RESIDUAL_RULES = ("hard", "posterior_mean")
LOG_GAMMA_MIN = -70.0  # log-responsibilities (relative to the row's best) below this are 0
MIN_GEMM_ROWS = 16  # E-step chunks of fewer rows are zero-padded to this many (MKL rounds small matmuls differently)
SPARSE_DENSITY = 1 / 32  # M-step by scatter-add while at most this fraction of a chunk's [c, K] gamma is non-zero
SCATTER_BLOCK = 512  # terms per scatter-add: a [512, 2D] float64 block stays in cache (one [nnz, 2D] block was 6x
# slower at D = 384, K = 256: a fresh allocation over glibc's 32 MB mmap threshold is page-faulted on every call)


def features(r: Tensor, out: Tensor | None = None) -> Tensor:
    """The E- and M-step inputs of ``r: [n, D]``: ``[r, r*r]`` -> ``[n, 2D]`` (float32), written to ``out`` when
    given (a buffer reused over chunks: a fresh ``[4096, 2D]`` tensor per chunk made this 3x slower)."""
    dim = r.shape[1]
    out = r.new_empty(len(r), 2 * dim) if out is None else out
    out[:, :dim] = r
    torch.mul(r, r, out=out[:, dim:])
    return out


@dataclass(frozen=True)
class SparsePosterior:
    """The non-zero responsibilities of ``n`` rows (``nnz`` of them, row-major) and the rows' E-step results."""

    rows: Tensor  # [nnz] row of each responsibility
    components: Tensor  # [nnz] its component
    gamma: Tensor  # [nnz] float64, summing to 1 per row
    log_p: Tensor  # [n] float64 log-density log p(r_i)
    codes: Tensor  # [n] MAP component

    def dense(self, k: int) -> Tensor:
        """The responsibilities as ``[n, K]`` float64 (zeros elsewhere)."""
        out = self.gamma.new_zeros(len(self.codes), k)
        out[self.rows, self.components] = self.gamma
        return out


@dataclass(frozen=True)
class DiagonalMixture:
    """One level's mixture: ``means: [K, D]``, ``variances: [K, D]``, ``weights: [K]`` (float32)."""

    means: Tensor
    variances: Tensor
    weights: Tensor

    def to(self, device: torch.device | str) -> DiagonalMixture:
        """The same mixture on ``device``."""
        return DiagonalMixture(self.means.to(device), self.variances.to(device), self.weights.to(device))

    @cached_property
    def _projection(self) -> Tensor:
        """``-0.5 [-2 mu/var, 1/var]^T``: ``[2D, K]`` float32, the E-step matmul's weights for :func:`features`."""
        precision = 1.0 / self.variances
        return torch.cat([self.means * precision, -0.5 * precision], dim=1).T

    @cached_property
    def _bias(self) -> Tensor:
        """``log pi_k - 0.5 (D log 2 pi + sum_d log var_kd + sum_d mu_kd^2 / var_kd)``: ``[K]`` float64."""
        return self.weights.double().log() - 0.5 * (
            self.means.shape[1] * math.log(2 * math.pi)
            + self.variances.double().log().sum(1)
            + (self.means * self.means / self.variances).double().sum(1)
        )

    def log_joint(self, r: Tensor) -> Tensor:
        """``log pi_k + log N(r_i | mu_k, diag(var_k))``: ``r: [n, D]`` -> ``[n, K]`` float64."""
        return self.log_joint_of(features(r))

    def log_joint_of(self, f: Tensor, out: Tensor | None = None) -> Tensor:
        """:meth:`log_joint` of rows given as ``f = features(r): [n, 2D]`` -> ``[n, K]`` float64 (written to
        ``out``, contiguous, when given)."""
        n = len(f)
        if n < MIN_GEMM_ROWS:  # the row's value must not depend on the chunk it sits in (module docstring)
            f = torch.cat([f, f.new_zeros(MIN_GEMM_ROWS - n, f.shape[1])])
        product = (f @ self._projection)[:n]
        return (product.double() if out is None else out.copy_(product)).add_(self._bias)

    def sparse_posterior(self, r: Tensor, f: Tensor | None = None, out: Tensor | None = None) -> SparsePosterior:
        """E-step of ``r: [n, D]`` (``f``: its :func:`features`, when already formed; ``out``: an ``[n, K]``
        float64 buffer to use): the responsibilities within ``e^-70`` of each row's best (the rest are 0), the
        log-density and the MAP codes; log-sum-exp in float64."""
        relative = self.log_joint_of(features(r) if f is None else f, out)  # [n, K], becomes log gamma + log total
        best, codes = relative.max(dim=1)
        relative.sub_(best[:, None])
        k = relative.shape[1]
        index = (relative >= LOG_GAMMA_MIN).view(-1).nonzero().squeeze(1)  # flat, row-major
        rows, components = index.div(k, rounding_mode="floor"), index.remainder(k)
        gamma = relative.view(-1).index_select(0, index).exp_()
        total = torch.zeros_like(best).index_add_(0, rows, gamma)  # >= 1: the best component contributes e^0
        return SparsePosterior(rows, components, gamma.div_(total.index_select(0, rows)), best + total.log(), codes)

    def posterior(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """E-step of ``r: [n, D]``: ``(gamma: [n, K] float64 responsibilities, log_p: [n] float64 log-density,
        codes: LongTensor[n] MAP components)``, as :meth:`sparse_posterior` with the responsibilities dense."""
        post = self.sparse_posterior(r)
        return post.dense(len(self.weights)), post.log_p, post.codes


@dataclass(frozen=True)
class EmStatistics:
    """Sufficient statistics of one E-step over all ranks (float64), plus this rank's per-row errors."""

    mass: Tensor  # [K] N_k = sum_i gamma_ik
    first: Tensor  # [K, D] S1_k = sum_i gamma_ik r_i
    second: Tensor  # [K, D] S2_k = sum_i gamma_ik r_i^2
    map_counts: Tensor  # [K] rows whose MAP component is k
    log_likelihood: float  # sum_i log p(r_i)
    squared_error: float  # sum_i ||r_i - mu_{MAP(i)}||^2
    row_error: Tensor  # [n] ||r_i - mu_{MAP(i)}||^2 on this rank


def add_moments_(moments: Tensor, f: Tensor, post: SparsePosterior) -> None:
    """``moments: [K, 2D]`` float64 ``+= sum_i gamma_ik f_i`` for one chunk, ``f = features(r): [c, 2D]``: a
    scatter-add of the non-zero terms while they are sparse (at most ``SPARSE_DENSITY`` of ``[c, K]``), in blocks
    of ``SCATTER_BLOCK`` terms, else one float64 matmul. Each term is a product of float32 numbers, exact in
    float64; only the sums round."""
    k = len(moments)
    if len(post.gamma) > SPARSE_DENSITY * len(f) * k:
        moments.addmm_(post.dense(k).T, f.double())
        return
    for block in row_chunks(len(post.gamma), SCATTER_BLOCK):
        terms = f.index_select(0, post.rows[block]).double().mul_(post.gamma[block, None])  # [b, 2D]
        moments.index_add_(0, post.components[block], terms)


def em_statistics(residual: Rows, mixture: DiagonalMixture, chunk_size: int) -> EmStatistics:
    """One E-step over ``residual: [n, D]`` with the M-step's statistics gathered in the same chunk loop, reduced
    over ranks (on the mixture's device)."""
    k, dim = mixture.means.shape
    flat = torch.zeros(2 * k + 2 + 2 * k * dim, dtype=torch.float64, device=mixture.means.device)
    mass, map_counts, moments = flat[:k], flat[k : 2 * k], flat[2 * k + 2 :].view(k, 2 * dim)  # moments: [S1, S2]
    log_likelihood = flat[2 * k : 2 * k + 1]
    row_error = torch.empty(len(residual), device=mixture.means.device)
    size = min(chunk_size, len(residual))  # buffers reused by every chunk
    f_buffer = torch.empty(size, 2 * dim, device=mixture.means.device)
    joint_buffer = torch.empty(size, k, dtype=torch.float64, device=mixture.means.device)
    for rows in row_chunks(len(residual), chunk_size):
        r = residual[rows]
        f = features(r, f_buffer[: len(r)])  # [c, 2D]
        post = mixture.sparse_posterior(r, f, joint_buffer[: len(r)])
        mass.index_add_(0, post.components, post.gamma)
        add_moments_(moments, f, post)
        map_counts += torch.bincount(post.codes, minlength=k)
        log_likelihood += post.log_p.sum()
        row_error[rows] = (r - mixture.means.index_select(0, post.codes)).pow_(2).sum(1)
    flat[2 * k + 1] = row_error.double().sum()
    all_reduce_sum_(flat)
    return EmStatistics(mass, moments[:, :dim], moments[:, dim:], map_counts, flat[2 * k].item(),
                        flat[2 * k + 1].item(), row_error)


def dimension_variance(x: Rows, layout: ShardLayout, chunk_size: int) -> Tensor:
    """Per-dimension variance over all ranks' rows of ``x: [n, D]`` -> ``[D]`` float64."""
    sums = torch.zeros(2, x.shape[1], dtype=torch.float64)
    for rows in row_chunks(len(x), chunk_size):
        r = x[rows].double()
        sums += torch.stack([r.sum(0), (r * r).sum(0)])
    mean, mean_sq = all_reduce_sum_(sums) / layout.total_rows
    return (mean_sq - mean * mean).clamp_min(0)


def cluster_statistics(x: Rows, centroids: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Hard k-means statistics of ``x: [n, D]`` assigned to the nearest of ``centroids: [K, D]``, over all ranks:
    ``(counts: [K], sums: [K, D], sums of squares: [K, D])``, float64."""
    k, dim = centroids.shape
    flat = torch.zeros(k * (1 + 2 * dim), dtype=torch.float64)
    counts, moments = flat[:k], flat[k:].view(k, 2 * dim)
    for rows in row_chunks(len(x), chunk_size):
        r = x[rows]
        codes = nearest(r, centroids)[1]
        counts += torch.bincount(codes, minlength=k)
        moments.index_add_(0, codes, features(r).double())
    all_reduce_sum_(flat)
    return counts, moments[:, :dim], moments[:, dim:]


def mixture_from_clusters(counts: Tensor, sums: Tensor, squares: Tensor, reset_variance: Tensor,
                          floor: float) -> DiagonalMixture:
    """A mixture whose components are the k-means clusters: means, per-dimension variances (at least ``floor``)
    and weights ``counts / N``; an empty cluster gets ``reset_variance: [D]`` and the weight of one row (then the
    weights are renormalised). ``counts: [K]``, ``sums`` / ``squares``: ``[K, D]`` (float64)."""
    size = counts.clamp_min(1)[:, None]
    means = sums / size
    variances = (squares / size - means * means).clamp_min(floor)
    empty = counts == 0
    variances[empty] = reset_variance
    weights = counts.clamp_min(1)
    return DiagonalMixture(means.float(), variances.float(), (weights / weights.sum()).float())


@dataclass(frozen=True)
class EmStart:
    """Where EM starts on one level: the initial mixture, the variance of a re-seeded component (``[D]`` float64)
    and the variance floor."""

    mixture: DiagonalMixture
    reset_variance: Tensor
    floor: float

    def to(self, device: torch.device | str) -> EmStart:
        """The same start on ``device``."""
        return EmStart(self.mixture.to(device), self.reset_variance.to(device), self.floor)


def fit_em(residual: Rows, start: EmStart, layout: ShardLayout, *, max_iter: int, tol: float, chunk_size: int,
           record: Record) -> DiagonalMixture:
    """EM from ``start`` on ``residual: [n, D]`` (this rank's rows; on ``start``'s device): at most ``max_iter``
    iterations, stopping when the mean log-likelihood changes by at most ``tol`` relative. ``record`` gets one entry
    per E-step (``stage="em"``, ``iteration``, ``rmse``, ``log_likelihood``, ``utilization``, ``reseeded``)."""
    mixture, previous, reseeded = start.mixture, None, 0
    for iteration in range(max_iter):
        stats = em_statistics(residual, mixture, chunk_size)
        mean_log_likelihood = stats.log_likelihood / layout.total_rows
        record({"stage": "em", "iteration": iteration,
                "rmse": math.sqrt(stats.squared_error / (layout.total_rows * residual.shape[1])),
                "log_likelihood": mean_log_likelihood,
                "utilization": (stats.map_counts > 0).double().mean().item(), "reseeded": reseeded})
        if (previous is not None and not reseeded
                and abs(mean_log_likelihood - previous) <= tol * abs(mean_log_likelihood)):
            break
        previous = mean_log_likelihood
        mixture, reseeded = m_step(stats, residual, layout, start.reset_variance, start.floor)
    return mixture


def m_step(stats: EmStatistics, residual: Rows, layout: ShardLayout, reset_variance: Tensor,
           floor: float) -> tuple[DiagonalMixture, int]:
    """New parameters from the statistics; dead components re-seeded. Returns ``(mixture, num_reseeded)``."""
    mass = stats.mass.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    means = stats.first / mass
    variances = (stats.second / mass - means * means).clamp_min(floor)
    weights = stats.mass / layout.total_rows
    dead = (stats.mass < DEAD_MASS).nonzero().flatten()
    if len(dead):
        index = worst_rows(stats.row_error, len(dead), layout).to(means.device)
        # a tensor (fit_em called directly, possibly on a GPU) is gathered on its device
        rows = gather_rows(residual, index, layout) if isinstance(residual, Tensor) else gather_global_rows(
            residual, index, layout)
        means[dead] = rows.to(means)
        variances[dead] = reset_variance.to(variances)
        weights[dead] = 1.0 / len(weights)
        weights /= weights.sum()
    return DiagonalMixture(means.float(), variances.float(), weights.float()), len(dead)


@register("rq_gmm")
@dataclass(kw_only=True, eq=False)
class RQGMM(ResidualQuantizer):
    """Residual quantization with a K-component diagonal Gaussian mixture per level, fit by EM.

    Args:
        levels, codebook_size, chunk_size, seed: as in :class:`~torchrec_sid.quantizers.base.ResidualQuantizer`
            (``codebook_size``: K, mixture components per level).
        max_iter: EM iterations per level, at most.
        tol: stop a level when the mean log-likelihood changes by at most this fraction.
        init_iter: Lloyd iterations (on all columns) of the k-means initialisation (0: k-means++ seeds only).
        var_floor_ratio: variance floor relative to the level's mean per-dimension variance.
        min_variance: absolute variance floor (> 0).
        residual: ``"hard"`` (minus the MAP mean) or ``"posterior_mean"`` (minus ``sum_k gamma_k mu_k``): the
            residual handed to the next level while fitting.
        init_rows_per_centroid: k-means++ runs on a seeded sample of ``min(N, this * K)`` rows.
        init, progressive_steps, progressive_iter: the k-means initialisation's own initialisation (as in
            :class:`~torchrec_sid.quantizers.rq_kmeans.RQKMeans`).

    Fitted state: ``codebooks_`` (the means) ``[L, K, D]``, ``variances_: [L, K, D]``, ``weights_: [L, K]``,
    ``history_`` (one entry per k-means init and EM iteration: ``stage``, ``level``, ``iteration``, ``rmse``,
    ``utilization``, ``reseeded``, and ``log_likelihood`` for EM).

    Example::

        x = torch.randn(1000, 16)  # [N, D]
        q = RQGMM(levels=2, codebook_size=8).fit(x)
        codes = q.encode(x)  # [1000, 2], the MAP component per level
        probs, components = q.responsibilities(x, level=0, top_k=3)  # [1000, 3] each
    """

    _state_names = ("codebooks_", "variances_", "weights_")
    max_iter: int = setting(30, integer(1))
    tol: float = setting(1e-5, real(0.0))
    init_iter: int = setting(10, integer(0))
    var_floor_ratio: float = setting(0.1, real(0.0))
    min_variance: float = setting(1e-6, real(0.0, open_low=True))
    residual: str = setting("hard", one_of(*RESIDUAL_RULES))
    init_rows_per_centroid: int = setting(32, integer(1))
    init: str = setting("best", one_of(*INITS))
    progressive_steps: int = setting(10, integer(0))
    progressive_iter: int = setting(10, integer(1))
    variances_: Tensor = field(init=False, repr=False)
    weights_: Tensor = field(init=False, repr=False)

    def _init_state(self, dim: int) -> None:
        super()._init_state(dim)
        self.variances_ = torch.ones(self.levels, self.codebook_size, dim)
        self.weights_ = torch.full((self.levels, self.codebook_size), 1.0 / self.codebook_size)

    def mixture(self, level: int) -> DiagonalMixture:
        """The fitted mixture of ``level``."""
        return DiagonalMixture(self.codebooks_[level], self.variances_[level], self.weights_[level])

    def _fit_level(self, residual: Rows, level: int, layout: ShardLayout, generator: torch.Generator,
                   record: Record) -> None:
        start = self.initial_mixture(residual, layout, generator, record)
        mixture = fit_em(residual, start, layout, max_iter=self.max_iter, tol=self.tol, chunk_size=self.chunk_size,
                         record=record)
        self.codebooks_[level], self.variances_[level], self.weights_[level] = (
            mixture.means, mixture.variances, mixture.weights)

    def initial_mixture(self, residual: Rows, layout: ShardLayout, generator: torch.Generator,
                        record: Record) -> EmStart:
        """The k-means init of one level on ``residual: [n, D]`` (this rank's rows) and its variance floor."""
        k = self.codebook_size
        if self.init_iter:
            means = kmeans(residual, k, layout, generator, init=self.init, max_iter=self.init_iter, tol=0.0,
                           chunk_size=self.chunk_size, rows_per_centroid=self.init_rows_per_centroid,
                           progressive_steps=self.progressive_steps, progressive_iter=self.progressive_iter,
                           stage="kmeans_init", record=record)
        else:
            means = seed_centroids(residual, k, layout, self.init_rows_per_centroid, generator)
        level_variance = dimension_variance(residual, layout, self.chunk_size)
        floor = max(self.var_floor_ratio * level_variance.mean().item(), self.min_variance)
        reset_variance = level_variance + floor
        mixture = mixture_from_clusters(*cluster_statistics(residual, means, self.chunk_size), reset_variance, floor)
        return EmStart(mixture, reset_variance, floor)

    def _assign(self, residual: Tensor, level: int) -> Tensor:
        return self.mixture(level).log_joint(residual).max(dim=1).indices

    def _next_residual(self, residual: Rows, level: int, codes: Tensor) -> Rows:
        if self.residual == "hard":
            return super()._next_residual(residual, level, codes)
        # the soft residual is no codeword difference: it is stored ([n, D], the price of this option)
        out = torch.empty(residual.shape)
        mixture = self.mixture(level)
        for rows in row_chunks(len(residual), self.chunk_size):
            r = residual[rows]
            out[rows] = r - mixture.posterior(r)[0] @ mixture.means.double()
        return out

    def posterior_mean_reconstruction(self, x: QuantizerInput) -> Tensor:
        """The mixture's soft reconstruction of ``x: [N, D]`` -> ``[N, D]``: ``sum_l sum_k gamma_lk mu_lk`` where
        level ``l``'s responsibilities are of the soft residual ``x - (the levels < l's reconstruction)``.

        Not a decode of the SIDs (it reads ``x``): it shows how much of the MAP read-out's error is the hard
        choice of one component per level.
        """
        self._check_fitted()
        x = self._embeddings(x, dim=self.codebooks_.shape[2])
        out = torch.empty_like(x)
        for rows in row_chunks(len(x), self.chunk_size):
            r = x[rows].double()
            for level in range(self.levels):
                mixture = self.mixture(level)
                r = r - mixture.posterior(r.float())[0] @ mixture.means.double()
            out[rows] = (x[rows].double() - r).float()
        return out

    def responsibilities(self, x: QuantizerInput, level: int, top_k: int = 5) -> tuple[Tensor, Tensor]:
        """Soft assignments at ``level`` of the residuals left by MAP-encoding levels ``< level``.

        ``x: [N, D]`` -> ``(probs: [N, top_k], components: LongTensor[N, top_k])``, most probable first.
        """
        self._check_fitted()
        if not 0 <= level < self.levels:
            raise ValueError(f"level must be in [0, {self.levels}), got {level}")
        if not 1 <= top_k <= self.codebook_size:
            raise ValueError(f"top_k must be in [1, {self.codebook_size}], got {top_k}")
        x = self._embeddings(x, dim=self.codebooks_.shape[2])
        probs = torch.empty(len(x), top_k)
        components = torch.empty(len(x), top_k, dtype=torch.long)
        mixture = self.mixture(level)
        for rows in row_chunks(len(x), self.chunk_size):
            r = x[rows].clone()
            self._descend_(r, level)
            probs[rows], components[rows] = mixture.posterior(r)[0].float().topk(top_k, dim=1)
        return probs, components
