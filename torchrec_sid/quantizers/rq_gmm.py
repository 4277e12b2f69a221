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
  chunk, ``[r*r, r] @ [1/var, -2 mu/var]^T`` (never ``[N, K, D]``); log-sum-exp and responsibilities in float64.
* M-step from sufficient statistics ``N_k, S1_k = sum gamma r, S2_k = sum gamma r*r``: one float64 matmul per
  chunk, accumulated over chunks and all-reduced over ranks in float64; ``var = max(S2/N_k - mu^2, floor)`` with
  ``floor = max(var_floor_ratio * mean_d Var(r_d), min_variance)``. float64 because these sums run over rows: in
  float32 their rounding depended on how rows were split into chunks and ranks, and 30 EM iterations amplified
  that 1e-7 to different codes for 1,214 of MovieLens' 1,682 items on 2 processes; in float64 the split changes
  the statistics by about 1e-16, below float32 parameters' resolution.
* a component with total responsibility below one row is dead: its mean moves to the worst-reconstructed row,
  its variance to the level's variance, its weight to ``1 / K`` (weights renormalised).
* stop when the mean log-likelihood changes by at most ``tol`` relative, or after ``max_iter`` iterations.
* code = MAP component (``argmax log pi + log N``); next residual = input minus that component's mean
  (``residual="posterior_mean"`` subtracts ``sum_k gamma_k mu_k`` instead while fitting; encoding is always MAP).
* two reconstructions: ``decode(codes)`` (MAP: the sum of the coded means, what a SID can give back) and
  :meth:`RQGMM.posterior_mean_reconstruction` (``sum_l sum_k gamma_lk mu_lk`` along the soft residual chain: it
  needs ``x``, not codes, so it is the mixture's fit of ``x``, not a quantizer's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchrec_sid._dist import ShardLayout, all_reduce_sum_, worst_rows
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
LOG_GAMMA_MIN = -70.0  # log-responsibilities (relative to the row's best) are clamped here


@dataclass(frozen=True)
class DiagonalMixture:
    """One level's mixture: ``means: [K, D]``, ``variances: [K, D]``, ``weights: [K]`` (float32)."""

    means: Tensor
    variances: Tensor
    weights: Tensor

    def log_joint(self, r: Tensor) -> Tensor:
        """``log pi_k + log N(r_i | mu_k, diag(var_k))``: ``r: [n, D]`` -> ``[n, K]`` float64."""
        precision = 1.0 / self.variances
        projection = torch.cat([precision, -2.0 * self.means * precision], dim=1).T  # [2D, K]
        bias = self.weights.double().log() - 0.5 * (
            self.means.shape[1] * math.log(2 * math.pi)
            + self.variances.double().log().sum(1)
            + (self.means * self.means * precision).double().sum(1)
        )  # [K]
        return (torch.cat([r * r, r], dim=1) @ projection).double().mul_(-0.5).add_(bias)

    def posterior(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """E-step of ``r: [n, D]``: ``(gamma: [n, K] float64 responsibilities, log_p: [n] float64 log-density,
        codes: LongTensor[n] MAP components)``; log-sum-exp shifted by the row max, all in float64."""
        joint = self.log_joint(r)
        best, codes = joint.max(dim=1)
        # below e^-70 of the row's best the exact value does not matter; clamping keeps gamma (and gamma in
        # float32, for the M-step matmul) out of denormal numbers, which are 10-100x slower on CPU
        gamma = (joint - best[:, None]).clamp_min_(LOG_GAMMA_MIN).exp_()
        total = gamma.sum(dim=1)
        return gamma.div_(total[:, None]), best + total.log(), codes


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


def em_statistics(residual: Rows, mixture: DiagonalMixture, chunk_size: int) -> EmStatistics:
    """E-step over ``residual: [n, D]`` in chunks, reduced over ranks."""
    k, dim = mixture.means.shape
    mass = torch.zeros(k, dtype=torch.float64)
    map_counts = torch.zeros(k, dtype=torch.float64)
    moments = torch.zeros(k, 2 * dim, dtype=torch.float64)  # [S1, S2]
    log_likelihood = torch.zeros(1, dtype=torch.float64)
    row_error = torch.empty(len(residual))
    for rows in row_chunks(len(residual), chunk_size):
        r = residual[rows]
        gamma, log_p, codes = mixture.posterior(r)  # [c, K], [c], [c]
        mass += gamma.sum(0)
        map_counts += torch.bincount(codes, minlength=k)
        moments += gamma.T @ torch.cat([r, r * r], dim=1).double()  # float64: see the module docstring
        log_likelihood += log_p.sum()
        row_error[rows] = ((r - mixture.means[codes]) ** 2).sum(1)
    flat = all_reduce_sum_(torch.cat([mass, map_counts, log_likelihood, row_error.double().sum().view(1),
                                      moments.flatten()]))
    moments = flat[2 * k + 2 :].view(k, 2 * dim)
    return EmStatistics(flat[:k], moments[:, :dim], moments[:, dim:], flat[k : 2 * k], flat[2 * k].item(),
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
        moments.index_add_(0, codes, torch.cat([r, r * r], dim=1).double())
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
        mixture = mixture_from_clusters(*cluster_statistics(residual, means, self.chunk_size), level_variance + floor,
                                        floor)
        previous, reseeded = None, 0
        for iteration in range(self.max_iter):
            stats = em_statistics(residual, mixture, self.chunk_size)
            mean_log_likelihood = stats.log_likelihood / layout.total_rows
            record({"stage": "em", "iteration": iteration,
                    "rmse": math.sqrt(stats.squared_error / (layout.total_rows * residual.shape[1])),
                    "log_likelihood": mean_log_likelihood,
                    "utilization": (stats.map_counts > 0).double().mean().item(), "reseeded": reseeded})
            if (previous is not None and not reseeded
                    and abs(mean_log_likelihood - previous) <= self.tol * abs(mean_log_likelihood)):
                break
            previous = mean_log_likelihood
            mixture, reseeded = self._m_step(stats, residual, layout, level_variance + floor, floor)
        self.codebooks_[level], self.variances_[level], self.weights_[level] = (
            mixture.means, mixture.variances, mixture.weights)

    @staticmethod
    def _m_step(stats: EmStatistics, residual: Rows, layout: ShardLayout, reset_variance: Tensor,
                floor: float) -> tuple[DiagonalMixture, int]:
        """New parameters from the statistics; dead components re-seeded. Returns ``(mixture, num_reseeded)``."""
        mass = stats.mass.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        means = stats.first / mass
        variances = (stats.second / mass - means * means).clamp_min(floor)
        weights = stats.mass / layout.total_rows
        dead = (stats.mass < DEAD_MASS).nonzero().flatten()
        if len(dead):
            means[dead] = gather_global_rows(residual, worst_rows(stats.row_error, len(dead), layout),
                                             layout).double()
            variances[dead] = reset_variance
            weights[dead] = 1.0 / len(weights)
            weights /= weights.sum()
        return DiagonalMixture(means.float(), variances.float(), weights.float()), len(dead)

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
