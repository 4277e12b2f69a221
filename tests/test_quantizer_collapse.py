"""Deep-level codebook collapse of RQ-KMeans, the metrics that show it, and RQ-GMM's two reconstructions."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_sid._dist import ShardLayout
from torchrec_sid.quantizers import RQGMM, RQKMeans
from torchrec_sid.quantizers.metrics import code_balance, collisions, quality_report, reseeding, rmse
from torchrec_sid.quantizers.rq_kmeans import lloyd, progressive_dims

pytestmark = pytest.mark.usefixtures("one_thread")


def power_law_sphere(num_items: int = 1700, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Unit rows of a Gaussian whose variances fall as ``1 / rank`` in a random basis: the spectrum of sentence
    embeddings, without their clusters. ``[N, D]``."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1).float() ** -0.5
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return F.normalize((torch.randn(num_items, dim, generator=g) * scale) @ basis, dim=1)


def test_plain_kmeans_collapses_the_deepest_level_and_the_default_does_not():
    x = power_law_sphere()
    plain = RQKMeans(levels=3, codebook_size=64, init="kmeans++").fit(x)  # the previous algorithm
    fixed = RQKMeans(levels=3, codebook_size=64).fit(x)
    old, new = code_balance(plain.encode(x), [64] * 3), code_balance(fixed.encode(x), [64] * 3)
    assert old["max_code_share"][2] > 0.12  # one level-3 code holds 14% of the items (ideal: 1.6%)
    assert max(new["max_code_share"]) < 0.04
    assert min(new["perplexity_ratio"]) > 0.8
    assert collisions(fixed.encode(x))["collision_rate"] < collisions(plain.encode(x))["collision_rate"] / 3
    assert rmse(x, fixed.decode(fixed.encode(x))) < rmse(x, plain.decode(plain.encode(x)))


def test_progressive_dims_schedule():
    assert progressive_dims(384, 10) == [1, 3, 5, 10, 19, 35, 64, 116, 211, 384]
    assert progressive_dims(16, 0) == [16] == progressive_dims(16, 1)


def test_best_init_records_its_choice():
    x = power_law_sphere(num_items=400, dim=16)
    q = RQKMeans(levels=2, codebook_size=8).fit(x)
    choices = [h for h in q.history_ if h["stage"] == "kmeans_choice"]
    assert [h["level"] for h in choices] == [0, 1]
    for h in choices:
        assert h["rmse"] == min(h["rmse_progressive"], h["rmse_kmeans++"])


def test_empty_cluster_splits_the_largest():
    # 90 rows at 0 and 10 at 5 (1-d); three centroids, two of them far from every row: both end up empty after the
    # first assignment and are re-seeded by splitting the crowded cluster, not at an outlier row
    x = torch.cat([torch.zeros(90, 1) + torch.linspace(-1, 1, 90)[:, None], torch.full((10, 1), 5.0)])
    log: list[dict] = []
    centroids = lloyd(x, torch.tensor([[0.0], [100.0], [200.0]]), ShardLayout(0, 100, 100), max_iter=10, tol=0.0,
                      chunk_size=64, record=log.append)
    assert log[0]["utilization"] == pytest.approx(1 / 3) and log[0]["max_share"] == 1.0
    assert log[1]["reseeded"] == 2
    assert sorted(centroids[:, 0].tolist())[-1] < 6  # no centroid left at an empty place
    assert log[-1]["utilization"] == 1.0


def test_code_balance_and_collisions_on_known_codes():
    codes = torch.tensor([[0, 0]] * 91 + [[1, 1]] * 3 + [[2, 2]] * 3 + [[3, 3]] * 3)  # 100 items, 4 codes used
    balance = code_balance(codes, [100, 4])
    assert balance["max_code_share"] == pytest.approx([0.91, 0.91])
    assert balance["share_in_codes_over_1pct"] == pytest.approx([1.0, 1.0])
    p = torch.tensor([0.91, 0.03, 0.03, 0.03])
    assert balance["perplexity"][0] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert balance["perplexity_ratio"] == pytest.approx([balance["perplexity"][0] / 100, balance["perplexity"][0] / 4])
    assert collisions(codes) == {"collision_rate": 1.0, "suffix_cardinality": 91}
    assert collisions(torch.arange(5)[:, None]) == {"collision_rate": 0.0, "suffix_cardinality": 1}


def test_reseeding_reads_the_final_stage():
    history = [
        {"level": 0, "stage": "kmeans_progressive", "iteration": 0, "utilization": 0.2, "reseeded": 5},
        {"level": 0, "stage": "kmeans", "iteration": 0, "utilization": 0.75, "reseeded": 0},
        {"level": 0, "stage": "kmeans", "iteration": 1, "utilization": 1.0, "reseeded": 2},
        {"level": 0, "stage": "kmeans_kmeans++", "iteration": 0, "utilization": 0.5, "reseeded": 0},
        {"level": 0, "stage": "kmeans_choice", "iteration": 0, "chosen": "progressive", "rmse": 1.0},
        {"level": 1, "stage": "em", "iteration": 0, "utilization": 0.9, "reseeded": 0},
        {"level": 1, "stage": "em", "iteration": 1, "utilization": 1.0, "reseeded": 3},
    ]
    assert reseeding(history, 2) == {"utilization_before_reseed": [0.75, 0.9], "reseeded": [2.0, 3.0]}


def test_quality_report_has_the_collapse_metrics_and_both_gmm_reconstructions():
    x = power_law_sphere(num_items=600, dim=16)
    gmm = RQGMM(levels=2, codebook_size=8).fit(x)
    report = quality_report(gmm, x, num_queries=50)
    for key in ("perplexity_ratio", "max_code_share", "share_in_codes_over_1pct", "utilization_before_reseed",
                "reseeded"):
        assert len(report[key]) == 2
    assert report["suffix_cardinality"] >= 1
    soft = gmm.posterior_mean_reconstruction(x)
    assert report["rmse_posterior_mean"] == pytest.approx(rmse(x, soft))
    assert report["rmse_posterior_mean"] < report["rmse"]  # the MAP read-out loses the soft assignment


def test_rq_gmm_starts_from_the_kmeans_clusters():
    # blobs with very different spreads: the initial mixture must carry them (per-cluster variances and weights),
    # so the first EM pass already has the k-means partition's RMSE, not a blurred one
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 20
    spread = torch.tensor([0.1, 0.5, 1.0, 3.0])
    label = torch.randint(4, (800,), generator=g)
    x = centres[label] + torch.randn(800, 8, generator=g) * spread[label, None]
    q = RQGMM(levels=1, codebook_size=4, max_iter=1, var_floor_ratio=0.0).fit(x)
    kmeans_rmse = [h["rmse"] for h in q.history_ if h["stage"] == "kmeans_init"][-1]
    first_em = next(h for h in q.history_ if h["stage"] == "em")
    assert first_em["rmse"] == pytest.approx(kmeans_rmse, rel=1e-3)
    assert sorted(q.variances_[0].mean(1).sqrt().tolist()) == pytest.approx(spread.tolist(), rel=0.15)
