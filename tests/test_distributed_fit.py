"""Fitting on 2 real gloo processes, each with its own shard of the items, gives the 1-process result."""

import pytest
import torch

from tests.multiprocess import run_multiprocess
from torchrec_sid._dist import ShardLayout, gather_rows, worst_rows
from torchrec_sid.quantizers import build_quantizer

SPLIT = 400  # rank 0 holds rows [0, 400), rank 1 rows [400, 1200): uneven shards
CHUNK = 200  # divides both shards, so every chunk holds the same rows as in the 1-process fit


def catalogues() -> dict[str, torch.Tensor]:
    """Three 1200-item catalogues: blobs, duplicates plus noise (RQ-GMM re-seeds components), and duplicates
    only (RQ-KMeans re-seeds empty clusters, all at ties of zero error)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g) * 10
    blobs = centres[torch.randint(8, (1200,), generator=g)] + torch.randn(1200, 16, generator=g)
    distinct = torch.randn(24, 8, generator=g) * 5
    noisy = torch.cat([distinct[torch.randint(24, (1000,), generator=g)], torch.randn(200, 8, generator=g)])
    duplicates = distinct[torch.randint(24, (1200,), generator=g)]
    return {"blobs": blobs, "noisy": noisy[torch.randperm(1200, generator=g)], "duplicates": duplicates}


RUNS = {  # name: (catalogue, quantizer, settings)
    "kmeans_blobs": ("blobs", "rq_kmeans", {"levels": 2, "codebook_size": 8}),
    "gmm_blobs": ("blobs", "rq_gmm", {"levels": 2, "codebook_size": 8}),
    "gmm_reseeds": ("noisy", "rq_gmm", {"levels": 2, "codebook_size": 32}),
    "kmeans_reseeds": ("duplicates", "rq_kmeans", {"levels": 1, "codebook_size": 32}),
}


def fit_all(shard: slice) -> dict[str, dict]:
    """Fits every run on rows ``shard`` of its catalogue: codes of those rows, codebooks, history."""
    data = catalogues()
    out = {}
    for name, (catalogue, method, settings) in RUNS.items():
        x = data[catalogue][shard]
        q = build_quantizer(method, **settings, chunk_size=CHUNK, seed=7).fit(x)
        out[name] = {"codes": q.encode(x), "codebooks": q.codebooks_, "history": q.history_}
    return out


def _fit_on_my_shard(rank: int, world_size: int) -> dict:
    """One rank of the 2-process run (tests.multiprocess): fits on its shard, crosses rows, checks a bad row."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    result: dict = fit_all(shard)
    x = catalogues()["blobs"][shard]
    layout = ShardLayout(shard.start, len(x), 1200)
    result["gathered"] = gather_rows(x, torch.tensor([1100, 3, 400, 399]), layout)
    result["worst"] = worst_rows(x[:, 0], 5, layout)
    bad = x.clone()
    if rank == 1:
        bad[7, 0] = float("nan")
    try:
        build_quantizer("rq_kmeans", levels=1, codebook_size=8).fit(bad)
    except ValueError as e:
        result["error"] = str(e)
    return result


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_multiprocess(_fit_on_my_shard, world_size=2)


@pytest.fixture(scope="module")
def one_rank() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matmul blocking, hence the rounding, must match the workers'
    try:
        return fit_all(slice(None))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_give_the_same_codes_as_one(run, two_ranks, one_rank):
    codes = torch.cat([two_ranks[0][run]["codes"], two_ranks[1][run]["codes"]])
    assert torch.equal(codes, one_rank[run]["codes"])
    for rank in two_ranks:
        assert torch.equal(rank[run]["codebooks"], one_rank[run]["codebooks"])
        for got, expected in zip(rank[run]["history"], one_rank[run]["history"], strict=True):
            assert got.keys() == expected.keys()
            for key, value in expected.items():  # floats: sums of float64 statistics in another order
                assert got[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value)


def test_runs_exercise_reseeding(one_rank):
    for run in ("gmm_reseeds", "kmeans_reseeds"):
        assert sum(h.get("reseeded", 0) for h in one_rank[run]["history"]) > 0


def test_rows_cross_ranks_by_global_index(two_ranks):
    x = catalogues()["blobs"]
    for rank in two_ranks:
        assert torch.equal(rank["gathered"], x[[1100, 3, 400, 399]])
        assert torch.equal(rank["worst"], torch.sort(x[:, 0], descending=True, stable=True).indices[:5])


def test_bad_rows_on_one_rank_raise_on_every_rank(two_ranks):
    for rank in two_ranks:
        assert rank["error"] == "rank 1: x has non-finite values (NaN or inf) in row 7 (1 rows in all)"


def movielens_sized() -> torch.Tensor:
    """1,682 unit rows (MovieLens' item count) of 40 clusters under a power-law spectrum, ``[1682, 64]``."""
    g = torch.Generator().manual_seed(3)
    scale = torch.arange(1, 65).float() ** -0.5
    centres = torch.randn(40, 64, generator=g) * scale
    x = centres[torch.randint(40, (1682,), generator=g)] + 0.5 * torch.randn(1682, 64, generator=g) * scale
    return torch.nn.functional.normalize(x, dim=1)


def _fit_gmm_on_my_half(rank: int, world_size: int) -> torch.Tensor:
    """RQ-GMM at its default chunk size: one 1,682-row chunk on one process, one 841-row chunk per rank here."""
    half = slice(0, 841) if rank == 0 else slice(841, None)
    x = movielens_sized()[half]
    return build_quantizer("rq_gmm", levels=3, codebook_size=64, seed=0).fit(x).encode(x)


def test_rq_gmm_two_ranks_give_the_codes_of_one_on_movielens_sized_data():
    # chunks not aligned with the ranks' rows: with float32 M-step sums the rounding differed by split and EM
    # amplified it until every item's codes differed; float64 sums give the same codes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = movielens_sized()
        one = build_quantizer("rq_gmm", levels=3, codebook_size=64, seed=0).fit(x).encode(x)
    finally:
        torch.set_num_threads(threads)
    two = torch.cat(run_multiprocess(_fit_gmm_on_my_half, world_size=2))
    assert torch.equal(two, one)
