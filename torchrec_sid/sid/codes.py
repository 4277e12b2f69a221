"""Code manipulations on semantic IDs: ``codes: LongTensor[N, levels]``, row i = item i.

Collisions: items whose full code (all levels) is the same. As in TIGER / GRID, an extra *suffix* level
numbers the items of each shared code 0, 1, 2, ... in item-index order, so every item gets a unique SID.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_codes(codes: Tensor) -> None:
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D [N, levels] tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")


def check_codes(codes: Tensor, cardinalities: list[int], *, what: str = "codes") -> Tensor:
    """``codes: [N, l]`` (``1 <= l <= len(cardinalities)``) as int64; ValueError naming the first bad entry."""
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or not 1 <= codes.shape[1] <= len(cardinalities):
        raise ValueError(f"{what} must be [N, levels] with 1 <= levels <= {len(cardinalities)}, "
                         f"got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {codes.dtype}")
    codes = codes.long()
    limit = torch.tensor(cardinalities[: codes.shape[1]])
    bad = ((codes < 0) | (codes >= limit)).nonzero()
    if len(bad):
        i, level = bad[0].tolist()
        raise ValueError(f"{what}[{i}, {level}] = {int(codes[i, level])} is outside [0, {cardinalities[level]}) "
                         f"at level {level} ({len(bad)} bad entries in all)")
    return codes


def _group_of_each_item(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Groups items by full code. Returns (group: [N] index of each item's code, size: [G] items per code)."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    return group, torch.bincount(group)


def collision_rate(codes: Tensor) -> float:
    """Fraction of items whose full code is shared with at least one other item. ``codes: [N, levels]``."""
    _check_codes(codes)
    if codes.shape[0] == 0:
        return 0.0
    group, size = _group_of_each_item(codes)
    return (size[group] > 1).double().mean().item()


def add_collision_suffix(codes: Tensor) -> tuple[Tensor, int]:
    """Appends a level that makes every item's SID unique.

    Args:
        codes: ``[N, L]`` integer codes.

    Returns:
        ``(codes_with_suffix: LongTensor[N, L + 1], suffix_cardinality)``: the suffix of an item is its rank,
        in item-index order, among the items sharing its full code (0 for an item whose code is unique);
        ``suffix_cardinality`` is the largest number of items sharing one code (1 when there is no collision).

    Example::

        codes = torch.tensor([[3, 1], [0, 2], [3, 1], [3, 1]])
        add_collision_suffix(codes)  # (tensor([[3, 1, 0], [0, 2, 0], [3, 1, 1], [3, 1, 2]]), 3)
    """
    _check_codes(codes)
    codes = codes.long()
    if codes.shape[0] == 0:
        return torch.cat([codes, codes.new_zeros(0, 1)], dim=1), 1
    group, size = _group_of_each_item(codes)
    order = torch.sort(group, stable=True).indices  # items grouped by code, item order kept inside a group
    first_of_group = torch.cumsum(size, 0) - size  # [G] position of each group's first item in `order`
    suffix = torch.empty_like(group)
    suffix[order] = torch.arange(len(group)) - first_of_group[group[order]]
    return torch.cat([codes, suffix[:, None]], dim=1), int(size.max())
