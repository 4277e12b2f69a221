"""Collectives for fitting a quantizer on item shards: no-ops on one process, torch.distributed otherwise.

When ``torch.distributed`` is initialised (gloo on CPU), every rank passes its own rows to ``fit``; a row's
*global index* is its rank's offset (the rows of lower ranks) plus its local index. Only sufficient statistics,
a seeded sample of rows and single rows cross ranks, never the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's rows sit in the global catalogue."""

    offset: int  # global index of this rank's first row
    num_rows: int  # rows on this rank
    total_rows: int  # rows on all ranks


def raise_on_any_rank(error: ValueError | None) -> None:
    """Raises on every rank when any rank failed its input checks, so that no rank waits in a collective."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    if failed:
        raise ValueError("; ".join(failed))


def shard_layout(num_rows: int, dim: int) -> ShardLayout:
    """All-gathers every rank's ``(rows, dim)``; raises ValueError when the ranks disagree on ``dim``."""
    if not is_distributed():
        return ShardLayout(0, num_rows, num_rows)
    shapes = [torch.zeros(2, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, torch.tensor([num_rows, dim]))
    rows, dims = torch.stack(shapes).unbind(1)
    if (dims != dim).any():
        raise ValueError(f"all ranks must hold embeddings of one dimension, got D={dims.tolist()} by rank")
    return ShardLayout(int(rows[: rank()].sum()), num_rows, int(rows.sum()))


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sums ``t`` over ranks, in place (use float64 or int64 for sufficient statistics)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def gather_rows(x: Tensor, index: Tensor, layout: ShardLayout) -> Tensor:
    """Rows of the global catalogue by global index, on every rank. ``x: [n, D]``, ``index: [m]`` -> ``[m, D]``."""
    local = index - layout.offset
    mine = (local >= 0) & (local < layout.num_rows)
    rows = x.new_zeros(len(index), x.shape[1])
    rows[mine] = x[local[mine]]
    return all_reduce_sum_(rows)  # every row is non-zero on exactly one rank, so the sum is exact


def worst_rows(values: Tensor, k: int, layout: ShardLayout) -> Tensor:
    """Global indices of the ``k`` rows with the largest ``values`` (ties: lowest index). ``values: [n]`` -> ``[k]``.

    The same on every rank, and independent of how the rows are split across ranks.
    """
    local = torch.sort(values, descending=True, stable=True).indices[:k]
    best = torch.full((k,), float("-inf"), dtype=torch.float64)
    index = torch.full((k,), -1, dtype=torch.long)
    best[: len(local)] = values[local].double()
    index[: len(local)] = local + layout.offset
    if is_distributed():
        world = dist.get_world_size()
        all_best = [torch.empty_like(best) for _ in range(world)]
        all_index = [torch.empty_like(index) for _ in range(world)]
        dist.all_gather(all_best, best)
        dist.all_gather(all_index, index)
        best, index = torch.cat(all_best), torch.cat(all_index)
    by_index = torch.sort(index, stable=True).indices
    by_value = torch.sort(best[by_index], descending=True, stable=True).indices
    return index[by_index[by_value]][:k]
