"""RQ-GMM's EM step: the folded log-density, sparse responsibilities and statistics, chunk-independent rounding,
and the EM entry points the benchmark calls."""

import pytest
import torch

from torchrec_sid._dist import shard_layout
from torchrec_sid.quantizers import RQGMM, rq_gmm
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


def mixture_and_rows(num_rows: int = 300, dim: int = 64, k: int = 64, spread: float = 1.2,
                     seed: int = 0) -> tuple[DiagonalMixture, torch.Tensor]:
    """A random diagonal mixture (means of scale ``spread``, ``[K, D]``) and rows drawn from it, a little wider
    (``[N, D]``). With ``spread=1.2`` a row has 1.25 responsibilities above ``e^-70`` of its best on average (2% of
    ``[N, K]``, sparse); with ``spread=1`` 4.3, and 93% of the joint is below ``e^-71`` of the row's best."""
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


def test_responsibilities_are_the_normalised_joint_and_zero_below_e70_of_the_best():
    mixture, x = mixture_and_rows(spread=1.0)
    reference = reference_log_joint(mixture, x)
    relative = reference - reference.max(1, keepdim=True).values
    gamma, log_p, codes = mixture.posterior(x)
    assert torch.allclose(gamma, relative.softmax(1), atol=1e-3)  # float32 log-joints: about 5e-4 off
    assert torch.allclose(gamma.sum(1), torch.ones(len(x), dtype=torch.float64), rtol=1e-14)
    assert (gamma[relative < LOG_GAMMA_MIN - 1] == 0).all() and (relative < LOG_GAMMA_MIN - 1).any()
    assert torch.allclose(log_p, reference.logsumexp(1), rtol=1e-5)
    assert torch.equal(codes, reference.argmax(1))


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


@pytest.mark.parametrize("chunk_size", [299, 7])  # a last chunk of 1 row; chunks of 7 rows and a last one of 6
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
