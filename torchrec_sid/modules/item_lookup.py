"""Catalogue item ids (any int64) -> artifact rows and packed SIDs, as a KeyedJaggedTensor transform.

A :class:`~torchrec_sid.sid.SemanticIds` artifact is indexed by row (row i = item i), and
:class:`~torchrec_sid.modules.SidFeatureTransform` reads rows in ``[0, N)``; real catalogues have sparse or hashed
64-bit ids. :class:`ItemSidLookup` holds the catalogue's ids sorted (``sorted_ids: [N]``) with the row of each
(``sorted_rows: [N]``), finds an id by binary search (``torch.searchsorted``, O(log N) per id, exact) and can also
emit each item's packed SID (``packed_sids: [N (+1)]``) for :class:`~torchrec_sid.modules.SIDEmbedding`.

Why a sorted-id table and not TorchRec's managed collision modules (``ManagedCollisionCollection`` with
``MCHManagedCollisionModule``): those remap an open, drifting id stream onto a fixed number of slots, assigning
and evicting slots by arrival and frequency while training, so an id's slot depends on the traffic seen. A SID
artifact fixes the catalogue when the quantizer is fitted: every known id has exactly one row, unknown ids have
none, and the mapping must be the same on every rank, in every checkpoint and at serving. A sorted table gives that
exactly, with no state to train or evict, traces with ``torch.fx`` and exports with ``torch.export``; new items get
rows by refitting (or appending to) the artifact and rebuilding the lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torchrec.pt2.checks import is_pt2_compiling
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import pack_codes

UnknownItemPolicy = Literal["raise", "oov"]


def _check_catalogue(item_ids: Tensor, num_items: int) -> Tensor:
    """``item_ids`` as int64 ``[N]`` with distinct values; ValueError naming the first duplicate."""
    item_ids = torch.as_tensor(item_ids)
    if item_ids.ndim != 1 or len(item_ids) != num_items:
        raise ValueError(f"ItemSidLookup: item_ids must be [N] = [{num_items}] (the catalogue id of each artifact "
                         f"row), got shape {tuple(item_ids.shape)}")
    if item_ids.is_floating_point() or item_ids.dtype == torch.bool:
        raise ValueError(f"ItemSidLookup: item_ids must be integers, got {item_ids.dtype}")
    sorted_ids = item_ids.long().sort().values
    same = (sorted_ids[1:] == sorted_ids[:-1]).nonzero().flatten()
    if len(same):
        raise ValueError(f"ItemSidLookup: item id {int(sorted_ids[int(same[0])])} is given for two rows of the "
                         f"artifact; catalogue ids must be distinct")
    return item_ids.long()


def find_rows(ids: Tensor, sorted_ids: Tensor, sorted_rows: Tensor, feature: str, oov: bool) -> Tensor:
    """Rows ``[n]`` of catalogue ids ``ids: [n]``; an unknown id maps to ``N`` (the OOV row) under ``oov``, else
    raises ValueError naming the feature and the id (checks are skipped while compiling / exporting)."""
    num_items = sorted_ids.numel()
    position = torch.searchsorted(sorted_ids, ids.long()).clamp(max=num_items - 1)
    found = sorted_ids[position] == ids
    rows = torch.where(found, sorted_rows[position], num_items)
    if oov or (not torch.jit.is_scripting() and is_pt2_compiling()):  # no data-dependent checks while exporting
        return rows
    if ids.numel() and not bool(found.all()):
        missing = ids[~found]
        raise ValueError(f"ItemSidLookup: feature '{feature}' has item id {int(missing[0])}, which is not in the "
                         f"lookup's catalogue of {num_items} items ({missing.numel()} unknown ids in this batch); "
                         f"add the item to the SemanticIds artifact, or pass unknown_ids='oov'")
    return rows


@torch.fx.wrap
def remap_item_features(features: KeyedJaggedTensor, sorted_ids: Tensor, sorted_rows: Tensor, packed_sids: Tensor,
                        item_features: list[str], packed_features: list[str], oov: bool) -> KeyedJaggedTensor:
    """``features`` with each item feature's values replaced by artifact rows, plus (when ``packed_features`` is
    not empty) one packed-SID feature per item feature, with its lengths, appended. An fx leaf (data-dependent
    splits and checks)."""
    keys = features.keys()
    for feature in item_features:
        if feature not in keys:
            raise ValueError(f"ItemSidLookup: item feature '{feature}' is missing from the input; its keys are {keys}")
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    stride, length_per_key = features.stride(), features.length_per_key()
    per_key = list(values.split(length_per_key))
    sources = [keys.index(feature) for feature in item_features]
    rows = [find_rows(per_key[k], sorted_ids, sorted_rows, feature, oov) for feature, k in zip(item_features, sources)]
    for k, item_rows in zip(sources, rows):
        per_key[k] = item_rows.to(values.dtype)
    out_values = per_key + [packed_sids.index_select(0, r).to(values.dtype) for r in rows[:len(packed_features)]]
    per_key_lengths = lengths.view(len(keys), stride)
    out_lengths = [lengths] + [per_key_lengths[k] for k in sources[:len(packed_features)]]
    out_weights: Tensor | None = None
    if weights is not None:
        per_key_weights = weights.split(length_per_key)
        out_weights = torch.cat([weights] + [per_key_weights[k] for k in sources[:len(packed_features)]])
    return KeyedJaggedTensor(keys=list(keys) + packed_features, values=torch.cat(out_values), weights=out_weights,
                             lengths=torch.cat(out_lengths), stride=stride,
                             length_per_key=list(length_per_key) + [length_per_key[k] for k in
                                                                     sources[:len(packed_features)]])


class ItemSidLookup(nn.Module):
    """Maps catalogue item ids (arbitrary int64) in KJT features to SID-artifact rows, and adds packed SIDs.

    ``forward(features)`` returns ``features`` with the values of each of ``feature_names`` replaced by the
    items' artifact rows in ``[0, N)`` (what :class:`~torchrec_sid.modules.SidFeatureTransform` and an item-id
    table read), lengths and weights unchanged; with ``packed_sids=True`` it also appends
    ``<feature><packed_suffix>``: each item's packed SID over the first ``num_levels`` levels, the input of
    :meth:`SIDEmbedding.pooled <torchrec_sid.modules.SIDEmbedding.pooled>` / ``sequence``.

    Args:
        semantic_ids: the artifact; row i is the item ``item_ids[i]``.
        feature_names: the KJT features whose values are catalogue item ids.
        item_ids: ``[N]`` distinct int64 catalogue ids, one per artifact row (None: the ids are the rows).
        unknown_ids: ``"raise"`` (ValueError naming the feature and the id) or ``"oov"``: an unknown id maps to
            row ``N`` (build the transform with ``unknown_ids="oov"`` so its tables have that row) and to the packed
            SID of the digits nearest the artifact's ``digit_centres`` (a centred digit vector near 0).
        packed_sids: append the packed-SID features.
        num_levels: levels packed (None: the levels before the collision suffix, ``semantic_ids.code_levels``).
        packed_suffix: name suffix of the packed-SID features.

    Example::

        # 3 items with catalogue ids 9_000_000_017, 42, -5; 2 ternary levels
        sids = SemanticIds(torch.tensor([[0, 2], [1, 1], [2, 0]]), [3, 3], "dpca", {}, digit_centres=[1.0, 1.0])
        lookup = ItemSidLookup(sids, ["product_id"], item_ids=torch.tensor([9_000_000_017, 42, -5]),
                               packed_sids=True)
        kjt = KeyedJaggedTensor.from_lengths_sync(["product_id"], torch.tensor([42, -5]), torch.tensor([1, 1]))
        out = lookup(kjt)  # product_id: rows [[1], [2]]; product_id__sid_packed: [[1 + 3 * 1], [2 + 3 * 0]]
    """

    if TYPE_CHECKING:  # buffer types for mypy; TorchScript cannot read class-level annotations here
        sorted_ids: Tensor
        sorted_rows: Tensor
        packed_sids: Tensor

    def __init__(self, semantic_ids: SemanticIds, feature_names: Sequence[str], item_ids: Tensor | None = None,
                 unknown_ids: UnknownItemPolicy = "raise", packed_sids: bool = False, num_levels: int | None = None,
                 packed_suffix: str = "__sid_packed") -> None:
        super().__init__()
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ValueError(f"ItemSidLookup: feature_names must be non-empty and distinct, got {list(feature_names)}")
        if unknown_ids not in ("raise", "oov"):
            raise ValueError(f"ItemSidLookup: unknown_ids must be 'raise' or 'oov', got {unknown_ids!r}")
        num_levels = semantic_ids.code_levels if num_levels is None else num_levels
        if not 1 <= num_levels <= semantic_ids.num_levels:
            raise ValueError(f"ItemSidLookup: num_levels={num_levels} requested, the SemanticIds artifact has "
                             f"{semantic_ids.num_levels} levels")
        n = semantic_ids.num_items
        ids = torch.arange(n) if item_ids is None else _check_catalogue(item_ids, n)
        order = ids.argsort()
        self.feature_names = list(feature_names)
        self.oov = unknown_ids == "oov"
        self.packed_feature_names = [f + packed_suffix for f in self.feature_names] if packed_sids else []
        self.radices: list[int] = semantic_ids.cardinalities[:num_levels]
        self.register_buffer("sorted_ids", ids[order].contiguous())
        self.register_buffer("sorted_rows", order.contiguous())
        self.register_buffer("packed_sids", self._packed(semantic_ids, num_levels))

    def _packed(self, semantic_ids: SemanticIds, num_levels: int) -> Tensor:
        """``[N + 1]``: every row's packed SID, then the OOV row's (the digits nearest the centres, or zeros)."""
        codes = semantic_ids.codes[:, :num_levels]
        centres = semantic_ids.digit_centres
        neutral = torch.zeros(num_levels, dtype=torch.long) if centres is None else torch.tensor(
            [round(c) for c in centres[:num_levels]], dtype=torch.long)
        return pack_codes(torch.cat([codes, neutral[None]]), self.radices)

    @property
    def num_items(self) -> int:
        return self.sorted_ids.numel()

    def rows(self, item_ids: Tensor, feature: str = "item_ids") -> Tensor:
        """Artifact rows ``[n]`` of catalogue ids ``[n]`` (the unknown-id policy applies; ``feature`` names them)."""
        return find_rows(item_ids, self.sorted_ids, self.sorted_rows, feature, self.oov)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Item features remapped to rows, plus the packed-SID features (class docstring)."""
        return remap_item_features(features, self.sorted_ids, self.sorted_rows, self.packed_sids, self.feature_names,
                                   self.packed_feature_names, self.oov)
