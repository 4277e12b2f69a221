"""RQ-KMeans internals: scattered reads of the seeding sample (page releases), the fused assignment, and the
sample-based choice between its two k-means candidates; Lloyd iterations on residuals that are never formed, in
lanes whose result does not depend on the thread count."""

from typing import Any

import pytest
import torch

from torchrec_sid._dist import shard_layout
from torchrec_sid.quantizers import base
from torchrec_sid.quantizers.base import LANES, Residuals, gather_global_rows, in_lanes, releasing_pages, row_chunks
from torchrec_sid.quantizers.rq_kmeans import lloyd, row_min_


class LoggedRows:
    """``[n, D]`` rows that log every read (the index tensor), standing in for a memory map."""

    def __init__(self, x: torch.Tensor, log: list) -> None:
        self.x, self.log, self.shape = x, log, x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        self.log.append(("read", rows.clone()))
        return self.x[rows]


def test_a_scattered_read_goes_in_row_order_and_releases_pages_after_each_chunk(monkeypatch):
    monkeypatch.setattr(base, "SCATTERED_READ_ROWS", 64)
    g = torch.Generator().manual_seed(0)
    x, codebooks = torch.randn(1000, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    codes = torch.randint(4, (1000, 2), generator=g)
    index = torch.randperm(1000, generator=g)[:300]
    log: list = []
    rows = Residuals(LoggedRows(x, log), codebooks, codes, level=2)  # type: ignore[arg-type]
    with releasing_pages(lambda: log.append(("release", None))):
        got = gather_global_rows(rows, index, shard_layout(*x.shape))
    assert torch.equal(got, x[index] - codebooks[0, codes[index, 0]] - codebooks[1, codes[index, 1]])
    assert [kind for kind, _ in log] == ["read", "release"] * 5  # 300 rows in chunks of 64
    reads = torch.cat([rows for kind, rows in log if kind == "read"])
    assert torch.equal(reads, index.sort().values)  # increasing row order: each chunk touches one stretch of pages
    log.clear()
    assert torch.equal(gather_global_rows(rows, index, shard_layout(*x.shape)), got)  # no hook: one read
    assert [kind for kind, _ in log] == ["read"]


def test_the_hook_is_set_only_inside_the_block():
    calls: list[int] = []
    with releasing_pages(lambda: calls.append(1)):
        gather_global_rows(torch.randn(10, 2), torch.tensor([3, 1]), shard_layout(10, 2))
    gather_global_rows(torch.randn(10, 2), torch.tensor([3, 1]), shard_layout(10, 2))
    assert calls == [1]
    with pytest.raises(RuntimeError), releasing_pages(lambda: calls.append(2)):
        raise RuntimeError("the hook is reset on errors too")
    gather_global_rows(torch.randn(10, 2), torch.tensor([3, 1]), shard_layout(10, 2))
    assert calls == [1]


def test_every_chunked_pass_releases_pages_after_each_chunk():
    calls: list[int] = []
    with releasing_pages(lambda: calls.append(1)):
        assert [r.stop for r in row_chunks(300, 64)] == [64, 128, 192, 256, 300]
        assert len(calls) == 5
    list(row_chunks(300, 64))
    assert len(calls) == 5  # no hook outside the block
    assert [r.start for r in row_chunks(300, 64, 1, 2)] == [64, 192]  # lane 1 of 2: chunks 1 and 3


@pytest.mark.parametrize("threads", [1, 2])
def test_lanes_cover_every_chunk_and_keep_the_hook_and_the_thread_count(threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # 2: lanes in threads, whatever the machine
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    calls: list[int] = []
    with releasing_pages(lambda: calls.append(1)):
        lanes = in_lanes(lambda lane: [r.start for r in row_chunks(300, 64, lane, LANES)])
    assert sorted(sum(lanes, [])) == [0, 64, 128, 192, 256] and lanes[0][0] == 0
    assert len(calls) == 5  # the hook runs in every lane's thread
    assert set_to == ([] if threads == 1 else [1, 2])  # one intra-op thread per lane while they run, then restored


def test_lloyd_on_deep_residuals_matches_lloyd_on_the_formed_residuals():
    g = torch.Generator().manual_seed(0)
    x, codebooks = torch.randn(3000, 24, generator=g), torch.randn(2, 12, 24, generator=g) * 0.5
    codes = torch.randint(12, (3000, 3), generator=g)
    formed = x - codebooks[0, codes[:, 0]] - codebooks[1, codes[:, 1]]
    lazy_history: list = []
    formed_history: list = []
    kwargs: dict[str, Any] = {"layout": shard_layout(*x.shape), "max_iter": 8, "tol": 0.0, "chunk_size": 700,
                              "reduce": False}
    lazy = lloyd(Residuals(x, codebooks, codes, level=2), formed[:16].clone(), record=lazy_history.append, **kwargs)
    eager = lloyd(formed, formed[:16].clone(), record=formed_history.append, **kwargs)
    torch.testing.assert_close(lazy, eager, rtol=0, atol=1e-5)
    assert [h["utilization"] for h in lazy_history] == [h["utilization"] for h in formed_history]
    assert [h["rmse"] for h in lazy_history] == pytest.approx([h["rmse"] for h in formed_history], rel=1e-5)


def test_lloyd_in_lanes_gives_the_same_centroids_at_1_and_2_threads(one_thread):
    g = torch.Generator().manual_seed(1)
    x, codebooks = torch.randn(2000, 16, generator=g), torch.randn(1, 8, 16, generator=g) * 0.5
    codes = torch.randint(8, (2000, 2), generator=g)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append([lloyd(rows, x[:8].clone(), shard_layout(*x.shape), max_iter=5, tol=0.0, chunk_size=300,
                           record=lambda entry: None) for rows in (x, Residuals(x, codebooks, codes, level=1))])
        assert torch.get_num_threads() == threads  # restored after every pass
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one, two)


def test_row_min_matches_torch_min_with_ties():
    scores = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    scores[3, [9, 2, 40]] = -100.0  # a tie: the first index wins
    scores[7] = 1.0  # all tied
    expected = scores.min(dim=1)
    values, indices = row_min_(scores.clone())
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert indices[3] == 2 and indices[7] == 0
