"""RQ-KMeans internals: scattered reads of the seeding sample (page releases), the fused assignment, and the
sample-based choice between its two k-means candidates."""

import pytest
import torch

from torchrec_sid._dist import shard_layout
from torchrec_sid.quantizers import base
from torchrec_sid.quantizers.base import Residuals, gather_global_rows, releasing_pages, row_chunks


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
