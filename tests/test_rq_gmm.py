"""RQ-GMM's EM step: the folded log-density, sparse responsibilities and statistics, chunk-independent rounding,
and the EM entry points the benchmark calls."""

import pytest
import torch

from torchrec_sid._dist import shard_layout
from torchrec_sid.quantizers import RQGMM, rq_gmm
from torchrec_sid.quantizers.base import Residuals
from torchrec_sid.quantizers.rq_gmm import (
    LOG_GAMMA_MIN,
    MIN_GEMM_ROWS,
    DiagonalMixture,
    EmStart,
    em_statistics,
    features,
    fit_em,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture_and_rows(num_rows: int = 300, dim: int = 64, k: int = 64, spread: float = 1.0,
                     seed: int = 0) -> tuple[DiagonalMixture, torch.Tensor]:
    """A random diagonal mixture (means of scale ``spread``, ``[K, D]``) and rows drawn from it, a little wider
    (``[N, D]``). With ``spread=1`` a row has 1.09 responsibilities above ``e^LOG_GAMMA_MIN`` of its best on
    average (1.7% of ``[N, K]``, sparse)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g) * spread
    variances = 0.2 + torch.rand(k, dim, generator=g)
    weights = torch.rand(k, generator=g) + 0.1
    label = torch.randint(k, (num_rows,), generator=g)
    x = means[label] + torch.randn(num_rows, dim, generator=g) * variances[label].sqrt() * 1.5
    return DiagonalMixture(means, variances, weights / weights.sum()), x


def reference_log_joint(mixture: DiagonalMixture, x: torch.Tensor) -> torch.Tensor:
    """``log pi_k + log N(x_i | mu_k, diag(var_k))`` from the definition, in float64: ``[N, K]``."""
    normal = torch.distributions.Normal(mixture.means.double(), mixture.variances.double().sqrt())
    return mixture.weights.double().log() + normal.log_prob(x.double()[:, None, :]).sum(-1)


def test_log_joint_is_the_gaussian_log_density():
    mixture, x = mixture_and_rows(k=8, dim=16)
    reference = reference_log_joint(mixture, x)
    assert torch.allclose(mixture.log_joint(x), reference, rtol=1e-5, atol=1e-3)


def test_responsibilities_are_the_normalised_joint_and_zero_below_the_cut():
    mixture, x = mixture_and_rows()
    reference = reference_log_joint(mixture, x)
    relative = reference - reference.max(1, keepdim=True).values
    gamma, log_p, codes = mixture.posterior(x)
    assert torch.allclose(gamma, relative.softmax(1), atol=1e-3)  # float32 log-joints: about 5e-4 off
    assert torch.allclose(gamma.sum(1), torch.ones(len(x), dtype=torch.float64), rtol=1e-14)
    assert (gamma[relative < LOG_GAMMA_MIN - 1] == 0).all() and (relative < LOG_GAMMA_MIN - 1).any()
    assert torch.allclose(log_p, reference.logsumexp(1), rtol=1e-5)
    assert torch.equal(codes, reference.argmax(1))



def test_the_float32_preselection_keeps_what_the_whole_float64_joint_gives():
    mixture, x = mixture_and_rows()
    joint = mixture.log_joint(x)  # [N, K] float64: the float32 product plus the float64 constant
    best, codes = joint.max(dim=1)
    relative = joint - best[:, None]
    gamma = torch.where(relative >= LOG_GAMMA_MIN, relative.exp(), torch.zeros_like(relative))
    total = gamma.sum(1)
    post = mixture.sparse_posterior(x)
    assert torch.equal(post.codes, codes) and torch.allclose(post.log_p, best + total.log(), rtol=1e-15, atol=0)
    assert torch.allclose(post.dense(len(mixture.weights)), gamma / total[:, None], rtol=1e-15, atol=0)

def test_sparse_and_dense_statistics_are_the_dense_sums():
    mixture, x = mixture_and_rows()
    post = mixture.sparse_posterior(x)
    k = len(mixture.weights)
    assert len(x) < len(post.gamma) <= rq_gmm.SPARSE_DENSITY * len(x) * k  # sparse, with some rows mixed
    gamma = mixture.posterior(x)[0]
    expected = gamma.T @ features(x).double()  # [K, 2D]
    sparse = em_statistics(x, mixture, chunk_size=128)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rq_gmm, "SCATTER_BLOCK", 7)
        blocked = em_statistics(x, mixture, chunk_size=128)
        patch.setattr(rq_gmm, "SPARSE_DENSITY", 0.0)
        dense = em_statistics(x, mixture, chunk_size=128)
    for stats in (sparse, dense):
        assert torch.allclose(torch.cat([stats.first, stats.second], 1), expected, rtol=1e-12, atol=1e-12)
        assert torch.allclose(stats.mass, gamma.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(blocked.first, sparse.first) and torch.equal(blocked.second, sparse.second)


def test_a_rows_log_joint_does_not_depend_on_the_size_of_its_chunk():
    # MKL's small-matrix path (a few rows) rounds differently from a large chunk's; small chunks are padded
    mixture, x = mixture_and_rows(num_rows=200)
    whole = mixture.log_joint(x)
    for rows in range(1, MIN_GEMM_ROWS + 2):
        assert torch.equal(mixture.log_joint(x[5 : 5 + rows]), whole[5 : 5 + rows]), rows


@pytest.mark.parametrize("chunk_size", [13, 7])  # 23 chunks of 13 rows and one of 1; 42 of 7 and one of 6
def test_em_statistics_do_not_depend_on_the_chunk_size(chunk_size):
    mixture, x = mixture_and_rows()
    one, chunked = em_statistics(x, mixture, chunk_size=len(x)), em_statistics(x, mixture, chunk_size=chunk_size)
    assert torch.equal(chunked.map_counts, one.map_counts) and torch.equal(chunked.row_error, one.row_error)
    for name in ("mass", "first", "second"):
        assert torch.allclose(getattr(chunked, name), getattr(one, name), rtol=1e-13, atol=1e-13), name
    assert chunked.log_likelihood == pytest.approx(one.log_likelihood, rel=1e-14)


def test_em_from_the_initial_mixture_is_the_fit():
    _, x = mixture_and_rows(num_rows=400, dim=8, k=6, spread=4.0, seed=1)
    q = RQGMM(levels=1, codebook_size=6, max_iter=8, seed=3, chunk_size=150).fit(x)
    layout = shard_layout(*x.shape)
    start = q.clone().initial_mixture(x, layout, torch.Generator().manual_seed(3), record=lambda e: None)
    entries: list[dict] = []
    mixture = fit_em(x, start.to("cpu"), layout, max_iter=q.max_iter, tol=q.tol, chunk_size=q.chunk_size,
                     record=entries.append)
    assert torch.equal(mixture.means, q.codebooks_[0]) and torch.equal(mixture.variances, q.variances_[0])
    assert torch.equal(mixture.weights, q.weights_[0])
    assert entries == [{k: v for k, v in h.items() if k != "level"} for h in q.history_ if h["stage"] == "em"]


def test_a_dead_component_moves_to_the_worst_reconstructed_row():
    mixture, x = mixture_and_rows(num_rows=200, dim=8, k=4, spread=4.0, seed=2)
    means = mixture.means.clone()
    means[3] = 1e3  # far from every row: its total responsibility is 0
    reset_variance = torch.full((8,), 2.0, dtype=torch.float64)
    start = EmStart(DiagonalMixture(means, mixture.variances, mixture.weights), reset_variance, floor=1e-6)
    worst = em_statistics(x, start.mixture, chunk_size=64).row_error.argmax()
    entries: list[dict] = []
    out = fit_em(x, start, shard_layout(*x.shape), max_iter=1, tol=0.0, chunk_size=64, record=entries.append)
    assert torch.equal(out.means[3], x[worst]) and torch.equal(out.variances[3], torch.full((8,), 2.0))
    assert out.weights.sum().item() == pytest.approx(1.0) and entries[0]["utilization"] == 0.75



def in_rows(post: rq_gmm.SparsePosterior, order: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """A truncated E-step's results (rows in ``order``) in the chunk's own row order: dense gamma, log_p, codes."""
    back = torch.argsort(order)
    return post.dense(k)[back], post.log_p[back], post.codes[back]


# blocks of fewer rows than MIN_GEMM_ROWS; the cost rule's cuts; one block of all rows and several column tiles
@pytest.mark.parametrize(("block_rows", "overhead"), [(5, 32), (37, 32), (300, 10**6)])
def test_a_truncated_estep_reads_the_full_gemms_values_whatever_shares_its_block(block_rows, overhead):
    mixture, x = mixture_and_rows(dim=384, spread=0.1)  # MKL's rounding of a few columns differs at 2D = 768
    k = len(mixture.weights)
    moved = DiagonalMixture(mixture.means * 1.02, mixture.variances * 1.1, mixture.weights)  # a later iteration
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rq_gmm, "SUBBLOCK_ROWS", block_rows)
        patch.setattr(rq_gmm, "GEMM_OVERHEAD", overhead)
        full, candidates = mixture.full_posterior(features(x))
        ordered = features(x[candidates.order])
        same, later = (m.truncated_posterior(ordered, candidates) for m in (mixture, moved))
    assert len(x) < len(candidates.rows) < len(x) * k  # some rows have several candidates, none has all
    codes, starts = full.codes[candidates.order], torch.tensor(candidates.starts)
    assert starts[0] == 0 and starts[-1] == len(x) and (starts.diff() <= block_rows).all()
    group_start = torch.searchsorted(codes, codes[starts[1:-1]])  # of the MAP-component group a block starts in
    assert ((starts[1:-1] - group_start) % block_rows == 0).all()  # blocks start at a group or a piece of one
    assert len(starts) > 2 if overhead < 10**6 else len(starts) == 2 and len(candidates.columns) > rq_gmm.GEMM_COLUMNS
    for got, want in zip(in_rows(same, candidates.order, k), (full.dense(k), full.log_p, full.codes), strict=True):
        assert torch.equal(got, want)  # every responsibility kept is a candidate: the full E-step, bitwise
    rows, components = candidates.order[candidates.rows], candidates.components
    by_row = torch.argsort(rows * k + components)
    rows, components = rows[by_row], components[by_row]
    reference = rq_gmm._sparse_posterior(rows, components, moved.log_joint(x)[rows, components], len(x), k)[0]
    for got, want in zip(in_rows(later, candidates.order, k), (reference.dense(k), reference.log_p, reference.codes),
                         strict=True):
        assert torch.equal(got, want)  # the candidates' values of the whole [N, K] GEMM, bitwise


def test_truncated_em_is_full_on_schedule_and_after_a_reseed_and_keeps_the_fit():
    mixture, x = mixture_and_rows(num_rows=400, dim=16, k=8, spread=1.0, seed=2)
    means = mixture.means.clone()
    means[3] = 1e3  # re-seeded after the first E-step: nobody's candidate
    start = EmStart(DiagonalMixture(means, mixture.variances, mixture.weights),
                    torch.full((16,), 2.0, dtype=torch.float64), floor=1e-6)
    runs = {}
    for every in (1, 3):
        entries: list[dict] = []
        out = fit_em(x, start, shard_layout(*x.shape), max_iter=8, tol=0.0, chunk_size=150, record=entries.append,
                     full_estep_every=every)
        runs[every] = out, entries
    (full, full_log), (truncated, log) = runs[1], runs[3]
    assert [e["full_estep"] for e in log] == [True, True, False, True, False, False, True, False]
    assert [e["reseeded"] for e in log][:2] == [0, 1] and all(e["full_estep"] for e in full_log)
    # the candidates hold every responsibility kept here, and a truncated GEMM gives the full one's values
    # (the sums over rows run in another order)
    assert [e["log_likelihood"] for e in log] == pytest.approx([e["log_likelihood"] for e in full_log], rel=1e-14)
    for name in ("means", "variances", "weights"):
        assert torch.equal(getattr(truncated, name), getattr(full, name)), name


def test_em_in_lanes_gives_the_same_fit_at_1_and_2_threads():
    mixture, x = mixture_and_rows(num_rows=700, dim=16, k=8, seed=4)
    codebooks, codes = mixture.means[None] * 0.5, torch.randint(8, (700, 1), generator=torch.Generator().manual_seed(5))
    start = EmStart(mixture, torch.full((16,), 2.0, dtype=torch.float64), floor=1e-6)
    runs = []
    for threads in (1, 2):  # the module's fixture restores the thread count
        torch.set_num_threads(threads)
        for rows in (x, Residuals(x, codebooks, codes, level=1)):  # 6 chunks (117 rows, the last 115): 3 per lane
            entries: list[dict] = []
            out = fit_em(rows, start, shard_layout(*x.shape), max_iter=6, tol=0.0, chunk_size=150,
                         record=entries.append, full_estep_every=3)
            runs.append((out, entries))
        assert torch.get_num_threads() == threads
    for (one, one_log), (two, two_log) in zip(runs[:2], runs[2:], strict=True):
        assert one_log == two_log and not all(e["full_estep"] for e in one_log)
        for name in ("means", "variances", "weights"):
            assert torch.equal(getattr(one, name), getattr(two, name)), name
