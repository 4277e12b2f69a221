"""SIDs as input features: the names of the per-level code features a batch carries, and what supplies the codes.

On the SIDs-as-features path the data pipeline looks up each item's SID codes (from a SID table or the newest
version of a :class:`~torchrec_sid.sid.versions.SidStore`) and the batch carries them beside the item ids, one
feature per level with the item feature's lengths: ``<feature>__code<l>``. An item the table does not know has
code ``-1`` (:data:`UNKNOWN_CODE`) at every level. The model then turns codes into tokens by arithmetic alone
(:class:`~torchrec_sid.modules.sid_codes.SidCodeTransform`), so its memory does not grow with the catalogue.

Example::

    code_feature_names("history_item_ids", 3)
    # ['history_item_ids__code0', 'history_item_ids__code1', 'history_item_ids__code2']
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

UNKNOWN_CODE = -1  # the code of every level of an item the SID table does not hold


def code_feature_names(feature: str, num_levels: int) -> list[str]:
    """The code features of item feature ``feature``: ``<feature>__code0 ... <feature>__code{num_levels - 1}``."""
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    return [f"{feature}__code{level}" for level in range(num_levels)]


@runtime_checkable
class CodeSource(Protocol):
    """Anything that gives items' SID codes: a :class:`~torchrec_sid.sid.versions.SidTable` (one version) or a
    :class:`~torchrec_sid.sid.versions.SidStore` reader (its newest version, re-read when a new one appears)."""

    @property
    def num_levels(self) -> int: ...

    def codes_of(self, item_ids: Tensor | np.ndarray) -> Tensor:
        """``item_ids: [n]`` -> ``LongTensor[n, num_levels]``; :data:`UNKNOWN_CODE` rows for unknown items."""
        ...


def lookup_sorted(item_ids: Tensor | np.ndarray, sorted_ids: Tensor, codes: Tensor) -> Tensor:
    """Codes ``[n, levels]`` of ``item_ids: [n]`` in a table whose ids ``sorted_ids: [N]`` are sorted (row i has
    ``codes[i]``): binary search, O(log N) per id, or direct indexing when the ids are ``0 .. N-1``; unknown ids get
    :data:`UNKNOWN_CODE` rows."""
    ids = torch.as_tensor(np.asarray(item_ids) if isinstance(item_ids, np.ndarray) else item_ids).long().flatten()
    n = sorted_ids.numel()
    if n == 0:
        return torch.full((ids.numel(), codes.shape[1]), UNKNOWN_CODE, dtype=torch.long)
    if int(sorted_ids[0]) == 0 and int(sorted_ids[-1]) == n - 1:  # dense ids: row = id
        found = (ids >= 0) & (ids < n)
        rows = ids.clamp(0, n - 1)
    else:
        rows = torch.searchsorted(sorted_ids, ids).clamp(max=n - 1)
        found = sorted_ids[rows] == ids
    out = codes[rows].long()
    return out.masked_fill_(~found[:, None], UNKNOWN_CODE)
