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
* full E-step: ``log pi_k + log N(r | mu_k, diag(var_k))`` for all rows and components from one float32 matmul
  per chunk, ``[r, r*r] @ -0.5 [-2 mu/var, 1/var]^T`` (never ``[N, K, D]``; ``-0.5`` is folded into the weights,
  which is exact), plus a float64 per-component constant; the row max, log-sum-exp and responsibilities in float64.
  A responsibility below ``e^LOG_GAMMA_MIN`` (``e^-36``, 2.3e-16) of its row's best is 0: below float64's
  resolution (``2^-52 = e^-36.04``) of the row's total responsibility, it would change the row's log-density and
  its share of the M-step's sums by less than their own rounding (on the speed benchmark the fitted mixture, codes
  and log-likelihoods were bitwise those of the earlier cut at ``e^-70``, which kept 1.8x the M-step's terms).
  A chunk's responsibilities are kept sparse (row, component, value): on the speed benchmark's MovieLens
  embeddings (K = 256) about 1.1 per row are non-zero (2.0 at ``e^-70``). Only those entries become float64: the
  row max and the cut are first taken on ``product + float32 constant``, with a margin far above float32's
  rounding of it, and the kept entries are then ``product + float64 constant`` exactly as if all ``[n, K]`` had
  been converted. A matmul of fewer than ``MIN_GEMM_ROWS`` rows is zero-padded to that
  many, and its columns to a multiple of ``GEMM_COLUMNS``: MKL's small-matrix paths round a row's products
  differently, and the same row must give the same value wherever the chunks, ranks and blocks cut the rows.
* truncated E-steps (Lucke's "expectation truncation", Neal & Hinton's sparse EM): a full E-step also keeps each
  row's candidates, the components within ``e^LOG_CANDIDATE_MIN`` (-46, 10 nats below the cut) of its best. The
  next iterations compute the log-joint of the candidates only: a chunk's rows, ordered by their MAP component,
  are cut into blocks at the boundaries of MAP-component groups (rows with the same MAP component have nearly the
  same candidates; small groups are merged while one GEMM costs less than two), and each block runs one small
  float32 matmul against the union of its rows' candidates (mostly one tile of 16 of the K columns). A row reads
  only its own candidates, and a padded matmul gives bitwise the full matmul's values, so a row's result depends
  neither on its neighbours nor on chunks and ranks. The other responsibilities are 0 and the recorded
  log-likelihood sums over the candidates: a lower bound, equal to the full one while the candidates hold every
  responsibility above ``e^LOG_GAMMA_MIN``. On the speed benchmark (1.24 candidates per row) none was missed in
  8 truncated iterations. An E-step is full every ``full_estep_every`` iterations (the same schedule on every
  rank) and after a re-seeding (a new component is nobody's candidate); :meth:`RQGMM.encode` is always full.
* M-step from sufficient statistics ``N_k, S1_k = sum gamma r, S2_k = sum gamma r*r``, gathered in the E-step's
  chunk loop (one pass over the rows per iteration), accumulated over chunks and all-reduced over ranks in float64;
  ``var = max(S2/N_k - mu^2, floor)`` with ``floor = max(var_floor_ratio * mean_d Var(r_d), min_variance)``. While
  at most ``SPARSE_DENSITY`` of a chunk's responsibilities are non-zero, the sums are a float64 scatter-add of the
  non-zero ``gamma * [r, r*r]`` (products of float32 numbers, exact in float64); denser chunks use one float64
  matmul. float64 because these sums run over rows: in float32 their rounding depended on how rows were split into
  chunks and ranks, and 30 EM iterations amplified that 1e-7 to different codes for 1,214 of MovieLens' 1,682 items
  on 2 processes; in float64 the split changes the statistics by about 1e-16, below float32 parameters' resolution.
* lanes: an E-step's chunks run in two fixed lanes, chunk ``i`` in lane ``i % 2``
  (:func:`~torchrec_sid.quantizers.base.in_lanes`), each gathering its own float64 statistics, which are added in
  lane order, so the sums do not depend on the thread count. With 2 torch threads the lanes run at once in two
  Python threads (torch ops release the GIL) on one intra-op thread each, set once, process-wide, around the
  whole pass: nothing inside a lane changes the thread count (flipping the process-wide setting per op from two
  threads at once would race), and the single-threaded work (truncated GEMMs, sparse posteriors, scatter-adds)
  uses both cores instead of one. A full E-step's GEMM then runs as two 1-thread GEMMs, one per lane. (With more
  threads a full E-step's lanes get half of them each; a truncated one's lanes stay at one thread each.)
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
    LANES,
    QuantizerInput,
    Record,
    ResidualQuantizer,
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
from torchrec_sid.quantizers.rq_kmeans import INITS, kmeans, nearest, seed_centroids

DEAD_MASS = 1.0  # a component whose total responsibility is below one row's is re-seeded
RESIDUAL_RULES = ("hard", "posterior_mean")
LOG_GAMMA_MIN = -36.0  # log-responsibilities (relative to the row's best) below this are 0 (float64: 2^-52 = e^-36.04)
LOG_CANDIDATE_MIN = -46.0  # a truncated E-step's candidates: within e^-46 of the row's best at the last full one
FULL_ESTEP_EVERY = 10  # default: a full E-step every this many iterations (the others truncated)
FLOAT32_SLACK = 1e-5  # margin of the float32 preselection, relative to the magnitudes it rounds (80x float32's)
MIN_GEMM_ROWS = 16  # E-step GEMMs of fewer rows are zero-padded to this many (MKL rounds small matmuls differently)
GEMM_COLUMNS = 16  # truncated E-step GEMMs have a multiple of this many columns (fewer round differently)
SUBBLOCK_ROWS = 256  # rows per truncated E-step GEMM, at most (blocks are cut at MAP-component groups)
GEMM_OVERHEAD = 32  # a small GEMM's fixed cost, in rows x 16 columns (about 10 us against 0.3 us at 1 thread)
SPARSE_DENSITY = 1 / 32  # M-step by scatter-add while at most this fraction of a chunk's [c, K] gamma is non-zero
SCATTER_BLOCK = 512  # terms per scatter-add: a [512, 2D] float64 block stays in cache (one [nnz, 2D] block was 6x
# slower at D = 384, K = 256: a fresh allocation over glibc's 32 MB mmap threshold is page-faulted on every call)


def features(r: Tensor, out: Tensor | None = None) -> Tensor:
    """The E- and M-step inputs of ``r: [n, D]``: ``[r, r*r]`` -> ``[n, 2D]`` (float32), written to ``out`` when
    given (a buffer reused over chunks: a fresh ``[4096, 2D]`` tensor per chunk made this 3x slower; ``r`` may be
    ``out[:, :D]`` itself)."""
    dim = r.shape[1]
    out = r.new_empty(len(r), 2 * dim) if out is None else out
    if r.data_ptr() != out.data_ptr():  # r may already be out[:, :D]
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
class Candidates:
    """One chunk's components for truncated E-steps, from a full one, and the plan of their GEMMs.

    A truncated E-step reads the chunk's rows in ``order`` (by MAP component: a group of rows with the same MAP
    component has nearly the same candidates); ``rows`` are positions in that order. Each row's candidates are its
    components within ``e^LOG_CANDIDATE_MIN`` of its best (``m`` of them, by row, components ascending in a row).
    The ordered rows are cut into blocks at group boundaries (:func:`_block_starts`): block ``j`` is the rows
    ``starts[j]:starts[j + 1]``, and its GEMM covers the union of its rows' candidates, ``columns`` at
    ``column_starts[j]:column_starts[j + 1]`` (padded to a multiple of ``GEMM_COLUMNS``). It is written, row-major,
    at ``offsets[j]`` of one flat buffer (``size`` values), where each candidate's value sits at ``flat``.
    """

    order: Tensor  # [c] the chunk's rows by MAP component
    rows: Tensor  # [m] position in order
    components: Tensor  # [m] its component
    starts: list[int]  # [blocks + 1] each block's first row (in order), then c
    columns: Tensor  # [sum of the padded unions] the blocks' unions, one after the other
    column_starts: list[int]  # [blocks + 1]
    offsets: list[int]  # [blocks]
    flat: Tensor  # [m] each candidate's place in the flat buffer
    size: int

    @classmethod
    def plan(cls, rows: Tensor, components: Tensor, codes: Tensor, k: int) -> Candidates:
        """The candidates ``rows``, ``components``: ``[m]`` (chunk rows) of rows whose MAP components are
        ``codes: [c]``, out of ``k``."""
        n = len(codes)
        order = torch.argsort(codes, stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(n, device=order.device)
        rows = position.index_select(0, rows)
        by_row = torch.argsort(rows * k + components)
        rows, components = rows.index_select(0, by_row), components.index_select(0, by_row)
        starts = _block_starts(codes.index_select(0, order), rows, components, k)
        bounds = torch.tensor(starts, device=rows.device)
        block = torch.searchsorted(bounds, rows, right=True) - 1
        slot = rows - bounds.index_select(0, block)
        pairs, pair = torch.unique(block * k + components, return_inverse=True)  # (block, component), sorted
        blocks = len(starts) - 1
        width = torch.bincount(pairs.div(k, rounding_mode="floor"), minlength=blocks)  # union sizes
        first = width.cumsum(0) - width  # each block's first pair
        # extra columns change the shape only, no row reads them; MKL is fastest at multiples of 16
        padded = width + (-width).remainder(GEMM_COLUMNS)
        column = torch.arange(len(pairs), device=rows.device) - first.repeat_interleave(width)  # [pairs]
        column_starts = padded.cumsum(0) - padded
        columns = pairs.new_zeros(int(padded.sum())).index_put_(
            (column_starts.repeat_interleave(width) + column,), pairs.remainder(k))
        values = bounds.diff() * padded
        offsets = values.cumsum(0) - values  # of each block's product in the flat buffer
        flat = offsets.index_select(0, block) + slot * padded.index_select(0, block) + column.index_select(0, pair)
        return cls(order, rows, components, starts, columns, [*column_starts.tolist(), len(columns)],
                   offsets.tolist(), flat, int(values.sum()))


def _block_starts(codes: Tensor, rows: Tensor, components: Tensor, k: int) -> list[int]:
    """Where the truncated E-step's GEMM blocks start, for ``codes: [c]`` sorted MAP components and the
    candidates ``rows``, ``components``: ``[m]`` (rows: positions in that order): ``[blocks + 1]``, the last
    ``c``. A group of rows with the same MAP component (cut into pieces of at most ``SUBBLOCK_ROWS``) joins the
    block before it when one GEMM of both costs less than two, at ``max(rows, MIN_GEMM_ROWS)`` times the padded
    column tiles of their union per GEMM, plus ``GEMM_OVERHEAD`` (the cut depends on the chunk's rows alone)."""
    unions: list[set[int]] = [set() for _ in range(k)]
    for pair in torch.unique(codes.index_select(0, rows) * k + components).tolist():
        unions[pair // k].add(pair % k)

    def cost(num_rows: int, union: set[int]) -> int:
        return max(num_rows, MIN_GEMM_ROWS) * -(-len(union) // GEMM_COLUMNS)

    starts, union, size, at = [0], set[int](), 0, 0
    for code, count in enumerate(torch.bincount(codes, minlength=k).tolist()):
        for piece in range(0, count, SUBBLOCK_ROWS):
            num_rows, group = min(SUBBLOCK_ROWS, count - piece), unions[code]
            merged = union | group
            if size and (size + num_rows > SUBBLOCK_ROWS or cost(size + num_rows, merged)
                         > cost(size, union) + cost(num_rows, group) + GEMM_OVERHEAD):
                starts.append(at)
                union, size = set(group), num_rows
            else:
                union, size = merged, size + num_rows
            at += num_rows
    return [*starts, at]


def _gemm(f: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """``f @ weights.T``: ``f: [n, 2D]``, ``weights: [m, 2D]`` (contiguous) -> ``[n, m]`` float32 (into ``out``).
    Fewer than ``MIN_GEMM_ROWS`` rows are zero-padded to that many and the columns to a multiple of
    ``GEMM_COLUMNS``: MKL rounds smaller shapes differently, and a row's value must not depend on how many rows
    share its matmul, nor on whether a full or a truncated E-step computes it (module docstring)."""
    n, m = len(f), len(weights)
    if n >= MIN_GEMM_ROWS and m % GEMM_COLUMNS == 0:
        return torch.matmul(f, weights.T, out=out)
    if n < MIN_GEMM_ROWS:
        f = torch.cat([f, f.new_zeros(MIN_GEMM_ROWS - n, f.shape[1])])
    if m % GEMM_COLUMNS:
        weights = torch.cat([weights, weights.new_zeros(-m % GEMM_COLUMNS, weights.shape[1])])
    product = (f @ weights.T)[:n, :m]
    return product if out is None else out.copy_(product)


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
    def _weights(self) -> Tensor:
        """``-0.5 [-2 mu/var, 1/var]``: ``[K, 2D]`` float32, the E-step matmul's weights for :func:`features`."""
        precision = 1.0 / self.variances
        return torch.cat([self.means * precision, -0.5 * precision], dim=1)

    @cached_property
    def _bias(self) -> Tensor:
        """``log pi_k - 0.5 (D log 2 pi + sum_d log var_kd + sum_d mu_kd^2 / var_kd)``: ``[K]`` float64."""
        return self.weights.double().log() - 0.5 * (
            self.means.shape[1] * math.log(2 * math.pi)
            + self.variances.double().log().sum(1)
            + (self.means * self.means / self.variances).double().sum(1)
        )

    @cached_property
    def _bias32(self) -> Tensor:
        """:attr:`_bias` in float32 ``[K]`` (the full E-step's preselection only)."""
        return self._bias.float()

    def log_joint(self, r: Tensor) -> Tensor:
        """``log pi_k + log N(r_i | mu_k, diag(var_k))``: ``r: [n, D]`` -> ``[n, K]`` float64."""
        return self.log_joint_of(features(r))

    def log_joint_of(self, f: Tensor) -> Tensor:
        """:meth:`log_joint` of rows given as ``f = features(r): [n, 2D]`` -> ``[n, K]`` float64."""
        return _gemm(f, self._weights).double().add_(self._bias)

    def sparse_posterior(self, r: Tensor) -> SparsePosterior:
        """E-step of ``r: [n, D]``: :meth:`full_posterior` without the candidates."""
        return self.full_posterior(features(r))[0]

    def full_posterior(self, f: Tensor, out: Tensor | None = None) -> tuple[SparsePosterior, Candidates]:
        """E-step of rows given as ``f = features(r): [n, 2D]`` over all components (``out``: a ``[2, n, K]``
        float32 buffer to use): the responsibilities within ``e^LOG_GAMMA_MIN`` of each row's best (the rest are 0), the
        log-density, the MAP codes, and the candidates of the truncated E-steps that follow.

        The log-joint of every component is one float32 GEMM; entries within ``-LOG_CANDIDATE_MIN`` (plus a
        margin for float32 rounding) of the row's best by ``product + float32 bias`` are preselected, and only
        those become float64 (``product + float64 bias``): the row's best is always among them, so the kept
        responsibilities, log-density and codes are those of the whole ``[n, K]`` in float64.
        """
        n, k = len(f), len(self.weights)
        product = _gemm(f, self._weights, None if out is None else out[0])  # [n, K]
        approx = torch.add(product, self._bias32, out=None if out is None else out[1])
        best = approx.amax(dim=1)
        margin = FLOAT32_SLACK * (best.abs() - LOG_CANDIDATE_MIN + 2 * self._bias32.abs().max())
        index = (approx >= (best + LOG_CANDIDATE_MIN - margin)[:, None]).view(-1).nonzero().squeeze(1)
        rows, components = index.div(k, rounding_mode="floor"), index.remainder(k)
        joint = product.reshape(-1).index_select(0, index).double().add_(self._bias.index_select(0, components))
        post, relative = _sparse_posterior(rows, components, joint, n, k)
        keep = (relative >= LOG_CANDIDATE_MIN).nonzero().squeeze(1)
        return post, Candidates.plan(rows.index_select(0, keep), components.index_select(0, keep), post.codes, k)

    def truncated_posterior(self, f: Tensor, candidates: Candidates) -> SparsePosterior:
        """E-step of rows given as ``f = features(r): [n, 2D]``, in ``candidates.order``, over each row's
        ``candidates`` alone (the other responsibilities 0; ``log_p`` a lower bound of the log-density, equal to
        it up to the candidates' misses); the result's rows are in that order too.

        One float32 GEMM per block of rows (:class:`Candidates`) against the union of its rows' candidates (a
        multiple of ``GEMM_COLUMNS`` columns, at least ``MIN_GEMM_ROWS`` rows); each row reads its own candidates'
        values from it: the same float32 values as the full E-step's GEMM, whatever rows and columns share it."""
        buffer = f.new_empty(candidates.size)
        weights = self._weights.index_select(0, candidates.columns)  # [sum of the unions, 2D]
        rows, columns, offsets = candidates.starts, candidates.column_starts, candidates.offsets
        for j, start in enumerate(offsets):
            n, m = rows[j + 1] - rows[j], columns[j + 1] - columns[j]
            _gemm(f[rows[j] : rows[j + 1]], weights[columns[j] : columns[j + 1]],
                  buffer[start : start + n * m].view(n, m))
        joint = buffer.index_select(0, candidates.flat).double()
        joint.add_(self._bias.index_select(0, candidates.components))
        return _sparse_posterior(candidates.rows, candidates.components, joint, len(f), len(self.weights))[0]

    def posterior(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """E-step of ``r: [n, D]``: ``(gamma: [n, K] float64 responsibilities, log_p: [n] float64 log-density,
        codes: LongTensor[n] MAP components)``, as :meth:`sparse_posterior` with the responsibilities dense."""
        post = self.sparse_posterior(r)
        return post.dense(len(self.weights)), post.log_p, post.codes


def _sparse_posterior(rows: Tensor, components: Tensor, joint: Tensor, n: int,
                      k: int) -> tuple[SparsePosterior, Tensor]:
    """Responsibilities from some entries of ``n`` rows' float64 log-joint (``rows``, ``components``, ``joint``:
    ``[m]``, row-major, components ascending in a row; every row has one): those within ``e^LOG_GAMMA_MIN`` of
    their row's best (the rest 0), log-sum-exp over them; MAP code the first best. Returns the posterior and each
    entry's log-joint relative to its row's best ``[m]``."""
    best = joint.new_full((n,), -math.inf).scatter_reduce_(0, rows, joint, "amax")
    relative = joint - best.index_select(0, rows)
    top = (relative == 0).nonzero().squeeze(1)
    codes = rows.new_full((n,), k).scatter_reduce_(0, rows.index_select(0, top), components.index_select(0, top),
                                                    "amin")
    index = (relative >= LOG_GAMMA_MIN).nonzero().squeeze(1)
    kept_rows = rows.index_select(0, index)
    gamma = relative.index_select(0, index).exp_()
    total = torch.zeros_like(best).index_add_(0, kept_rows, gamma)  # >= 1: the best component contributes e^0
    post = SparsePosterior(kept_rows, components.index_select(0, index), gamma.div_(total.index_select(0, kept_rows)),
                           best + total.log(), codes)
    return post, relative


@dataclass(frozen=True)
class EmStatistics:
    """Sufficient statistics of one E-step over all ranks (float64), plus this rank's per-row errors and the
    candidates of the truncated E-steps (one :class:`Candidates` per chunk, from the last full E-step)."""

    mass: Tensor  # [K] N_k = sum_i gamma_ik
    first: Tensor  # [K, D] S1_k = sum_i gamma_ik r_i
    second: Tensor  # [K, D] S2_k = sum_i gamma_ik r_i^2
    map_counts: Tensor  # [K] rows whose MAP component is k
    log_likelihood: float  # sum_i log p(r_i)
    squared_error: float  # sum_i ||r_i - mu_{MAP(i)}||^2
    row_error: Tensor  # [n] ||r_i - mu_{MAP(i)}||^2 on this rank
    candidates: list[Candidates]


def add_moments_(moments: Tensor, f: Tensor, post: SparsePosterior) -> None:
    """``moments: [K, 2D]`` float64 ``+= sum_i gamma_ik f_i`` for one chunk, ``f = features(r): [c, 2D]``: a
    scatter-add of the non-zero terms while they are sparse (at most ``SPARSE_DENSITY`` of ``[c, K]``), in blocks
    of ``SCATTER_BLOCK`` terms, else one float64 matmul. Each term is a product of float32 numbers, exact in
    float64; only the sums round. (At 2 torch threads a lane runs this on one intra-op thread: ``index_add_`` of
    ``[512, 2D]`` float64 rows took 7x longer on 2 threads than on 1.)"""
    k = len(moments)
    if len(post.gamma) > SPARSE_DENSITY * len(f) * k:
        moments.addmm_(post.dense(k).T, f.double())
        return
    size = min(SCATTER_BLOCK, len(post.gamma))  # buffers reused by every block
    rows, terms = f.new_empty(size, f.shape[1]), f.new_empty(size, f.shape[1], dtype=torch.float64)
    for start in range(0, len(post.gamma), SCATTER_BLOCK):
        block = slice(start, min(start + SCATTER_BLOCK, len(post.gamma)))
        b = block.stop - block.start
        torch.index_select(f, 0, post.rows[block], out=rows[:b])
        moments.index_add_(0, post.components[block], terms[:b].copy_(rows[:b]).mul_(post.gamma[block, None]))


def em_statistics(residual: Rows, mixture: DiagonalMixture, chunk_size: int,
                  candidates: list[Candidates] | None = None) -> EmStatistics:
    """One E-step over ``residual: [n, D]`` with the M-step's statistics gathered in the same chunk loop, reduced
    over ranks (on the mixture's device): full, or truncated to ``candidates`` (one per chunk, from a full E-step's
    statistics with the same ``residual`` and ``chunk_size``). The rows are cut into chunks of one size (at most
    ``chunk_size``, the last one smaller), about a multiple of :data:`~torchrec_sid.quantizers.base.LANES` of them,
    which run in ``LANES`` fixed lanes (:func:`~torchrec_sid.quantizers.base.in_lanes`, chunk ``i`` in lane
    ``i % LANES``: near-equal shares of the rows), each into its own float64 statistics, added in lane order: the
    result does not depend on the number of threads."""
    k, dim = mixture.means.shape
    device = mixture.means.device
    chunks = LANES * -(-len(residual) // (LANES * chunk_size))  # 20,000 rows of 4,096: 6 of 3,334, not 5 (3:2)
    chunk_size = -(-len(residual) // chunks) if chunks else chunk_size
    row_error = torch.empty(len(residual), device=device)
    _ = mixture._weights, mixture._bias, mixture._bias32  # computed once, before the lanes read them

    def lane(index: int) -> tuple[Tensor, list[tuple[int, Candidates]]]:
        """Chunks ``index, index + LANES, ...``: their statistics, in the layout of ``flat`` below."""
        flat = torch.zeros(2 * k + 2 + 2 * k * dim, dtype=torch.float64, device=device)
        mass, map_counts, moments = flat[:k], flat[k : 2 * k], flat[2 * k + 2 :].view(k, 2 * dim)  # [S1, S2]
        log_likelihood = flat[2 * k : 2 * k + 1]
        size = min(chunk_size, len(residual))  # buffers reused by the lane's chunks (joint: full E-steps only)
        f_buffer = torch.empty(size, 2 * dim, device=device)
        joint_buffer = torch.empty(2, 0 if candidates else size, k, device=device)
        error_buffer = torch.empty(size, dim, device=device)
        found: list[tuple[int, Candidates]] = []
        for j, (rows, r) in enumerate(read_chunks(residual, chunk_size, index, LANES)):
            i = index + j * LANES  # the chunk's index
            order = candidates[i].order if candidates else None
            if order is not None:  # a truncated E-step reads the rows grouped by MAP component, straight into f
                r = torch.index_select(r, 0, order, out=f_buffer[: len(r), :dim])
            f = features(r, f_buffer[: len(r)])  # [c, 2D]
            if candidates:
                post = mixture.truncated_posterior(f, candidates[i])
            else:
                post, chunk_candidates = mixture.full_posterior(f, joint_buffer[:, : len(r)])
                found.append((i, chunk_candidates))
            mass.index_add_(0, post.components, post.gamma)
            add_moments_(moments, f, post)
            map_counts += torch.bincount(post.codes, minlength=k)
            log_likelihood += post.log_p.sum()
            error = torch.index_select(mixture.means, 0, post.codes, out=error_buffer[: len(r)])
            error = error.sub_(r).square_().sum(1)  # = (r - mu)^2, exactly
            if order is None:
                row_error[rows] = error
            else:
                row_error[rows][order] = error
        return flat, found

    flat = torch.zeros(2 * k + 2 + 2 * k * dim, dtype=torch.float64, device=device)
    found: list[tuple[int, Candidates]] = []
    # a truncated E-step is small ops alone: its lanes get one intra-op thread each at any thread count
    with intra_op_threads(LANES if candidates else torch.get_num_threads()):
        for lane_flat, lane_found in in_lanes(lane):  # added in lane order, whatever the number of threads
            flat += lane_flat
            found += lane_found
    flat[2 * k + 1] = row_error.double().sum()
    all_reduce_sum_(flat)
    moments = flat[2 * k + 2 :].view(k, 2 * dim)
    found.sort(key=lambda entry: entry[0])  # by chunk
    return EmStatistics(flat[:k], moments[:, :dim], moments[:, dim:], flat[k : 2 * k], flat[2 * k].item(),
                        flat[2 * k + 1].item(), row_error, candidates or [c for _, c in found])


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
           record: Record, full_estep_every: int = FULL_ESTEP_EVERY) -> DiagonalMixture:
    """EM from ``start`` on ``residual: [n, D]`` (this rank's rows; on ``start``'s device): at most ``max_iter``
    iterations, stopping when the mean log-likelihood changes by at most ``tol`` relative. The E-step of
    iterations ``0, full_estep_every, 2 full_estep_every, ...`` and of the iteration after a re-seeding is full,
    the others are truncated to the last full one's candidates (module docstring). ``record`` gets one entry per
    E-step (``stage="em"``, ``iteration``, ``rmse``, ``log_likelihood``, ``utilization``, ``reseeded``,
    ``full_estep``)."""
    mixture, previous, reseeded, candidates = start.mixture, None, 0, None
    for iteration in range(max_iter):
        full = candidates is None or reseeded > 0 or iteration % full_estep_every == 0  # the same on every rank
        stats = em_statistics(residual, mixture, chunk_size, None if full else candidates)
        candidates = stats.candidates
        mean_log_likelihood = stats.log_likelihood / layout.total_rows
        record({"stage": "em", "iteration": iteration,
                "rmse": math.sqrt(stats.squared_error / (layout.total_rows * residual.shape[1])),
                "log_likelihood": mean_log_likelihood,
                "utilization": (stats.map_counts > 0).double().mean().item(), "reseeded": reseeded,
                "full_estep": full})
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
        full_estep_every: a full E-step every this many EM iterations, the others truncated to the candidates
            of the last full one (1: every E-step full).

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
    full_estep_every: int = setting(FULL_ESTEP_EVERY, integer(1))
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
                         record=record, full_estep_every=self.full_estep_every)
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
