"""Packing a SID's digits into one integer and back (mixed radix), as SIDE and n-gram features need.

A code ``[c_1, ..., c_n]`` with ``0 <= c_k < r_k`` packs to ``s = sum_k c_k * prod_{j<k} r_j`` (the first digit is
the least significant). For ternary digits ``d_k in {-1, 0, 1}`` stored as ``c_k = 1 + d_k`` this is SIDE's
``s = sum_k 3^(k-1) (1 + d_k)``, and :func:`unpack_codes` is its exact inverse (floor-divide and modulo).
These functions validate their input (data-dependent checks); a module's ``forward`` holds
:func:`radix_weights` as a buffer and applies the same arithmetic, which traces with ``torch.fx``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_PACKED = 2**63 - 1


def radix_weights(radices: Sequence[int]) -> Tensor:
    """Place values ``[n]``: ``w_k = prod_{j<k} r_j``; raises ValueError when the product overflows int64."""
    if len(radices) == 0 or any(r < 1 for r in radices):
        raise ValueError(f"radices must be a non-empty list of integers >= 1, got {list(radices)}")
    if math.prod(radices) - 1 > MAX_PACKED:
        raise ValueError(f"radices {list(radices)} span {math.prod(radices)} values, more than int64 holds")
    return torch.tensor([math.prod(radices[:k]) for k in range(len(radices))], dtype=torch.long)


def pack_codes(codes: Tensor, radices: Sequence[int]) -> Tensor:
    """``codes: LongTensor[..., n]`` with ``0 <= codes[..., k] < radices[k]`` -> packed ``LongTensor[...]``."""
    weights = radix_weights(radices)
    if codes.shape[-1] != len(radices):
        raise ValueError(f"codes have {codes.shape[-1]} digits, radices give {len(radices)}")
    bad = (codes < 0) | (codes >= torch.tensor(radices))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"codes{where} = {int(codes[tuple(where)])} is outside [0, {radices[where[-1]]})")
    return (codes.long() * weights).sum(-1)


def unpack_codes(packed: Tensor, radices: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_codes`: ``LongTensor[...]`` -> ``LongTensor[..., n]``."""
    weights = radix_weights(radices)
    if (packed < 0).any() or (packed >= math.prod(radices)).any():
        raise ValueError(f"packed ids must be in [0, {math.prod(radices)}) for radices {list(radices)}")
    return torch.div(packed.long()[..., None], weights, rounding_mode="floor") % torch.tensor(radices)
