"""A DLRM-style ranking model whose item representation and user-history block are modules of your choice.

Arches, as in ``torchrec.models.dlrm`` (whose ``SparseArch``, ``DenseArch``, ``InteractionArch`` and ``OverArch``
are reused):

* ``sparse_arch``: one pooled ``d``-vector per feature of an ``EmbeddingBagCollection`` (user features, the
  candidate's categories, ...).
* ``dense_arch``: the dense features through an MLP to ``d``.
* :class:`ItemArch`: one ``d``-vector per item, for the candidate and for every history event, as the sum of its
  representations: item-id and SID-token tables in one ``EmbeddingCollection`` (the tokens derived from the item
  ids by a :class:`~torchrec_sid.modules.SidFeatureTransform`, or from SID code features of the batch by a
  :class:`~torchrec_sid.modules.sid_codes.SidCodeTransform`; DistributedModelParallel shards the tables, candidate
  and history share their rows), table-free :class:`~torchrec_sid.modules.SIDEmbedding` (SIDE) and
  :class:`~torchrec_sid.modules.SoftSidEmbedding` (MMQ stage 2: soft-indexed SID tokens of a trainable tokenizer;
  its small ``[E, K, d]`` tables are dense).
* ``content_arch`` (optional): the candidate's content, e.g. :class:`ContentArch` (a frozen text embedding through
  an MLP).
* :class:`HistoryArch` (optional): a :class:`~torchrec_sid.modules.HistoryBlock` (pooling, PMA, DIN, SIM, DMQN) over
  the padded history, with the candidate as target.
* ``interaction_arch`` + ``over_arch``: pairwise dot products of all ``d``-vectors, then an MLP to one logit.

The model knows no feature name of its own: :class:`ItemArch` is told which KJT features hold the candidate and the
history, the ``EmbeddingBagCollection``'s tables name the pooled ones. :meth:`SidDLRM.from_config` builds the arches
from a :class:`~torchrec_sid.models.configs.ModelConfig` and a :class:`~torchrec_sid.models.configs.FeatureSchema`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_sid.models.configs import (
    HISTORY_BLOCKS,
    HISTORY_PADDINGS,
    ITEM_REPRESENTATIONS,
    FeatureSchema,
    ModelConfig,
    SidTokenConfig,
    SoftSidConfig,
)
from torchrec_sid.modules import (
    DIN,
    DMQN,
    PMA,
    SIM,
    HistoryBlock,
    MeanPooling,
    SIDEmbedding,
    SidFeatureTransform,
    SoftSidEmbedding,
)
from torchrec_sid.modules.history import is_tracing, jagged_to_padded
from torchrec_sid.modules.sid_codes import SidCodeTransform
from torchrec_sid.modules.sid_transform import MAX_TABLE_SIZE, distinct_values, hash_packed_ids, sid_tokens
from torchrec_sid.modules.soft_sid import SoftIndexTokenizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.features import code_feature_names
from torchrec_sid.sid.packing import pack_codes
from torchrec_sid.sid.pieces import SidPieces, fit_sid_sentencepiece

__all__ = [
    "HISTORY_BLOCKS", "ITEM_REPRESENTATIONS", "ContentArch", "FeatureSchema", "HistoryArch", "ItemArch", "ItemVectors",
    "ModelConfig", "SidDLRM", "SidTokenConfig", "SoftSidConfig", "build_history_block", "check_model_inputs",
    "count_parameters", "embedding_collections", "replicated_buffer_bytes", "table_parameters",
]


class ItemVectors(NamedTuple):
    """What :class:`ItemArch` returns for a batch of B examples with ``sum L`` history events in all."""

    candidate: Tensor  # [B, d]
    history: Tensor  # [sum L, d], the history feature's jagged layout
    candidate_ids: Tensor  # [B]
    history_ids: Tensor  # [sum L]
    history_lengths: Tensor  # [B]
    history_ages: Tensor | None  # [sum L] float seconds, event time - request time (<= 0); None without timestamps
    candidate_codes: Tensor | None = None  # [B, levels] SID codes from the batch (SIDs as features); else None
    history_codes: Tensor | None = None  # [sum L, levels]


@torch.fx.wrap
def _distinct_values(features: KeyedJaggedTensor, feature_names: list[str]) -> KeyedJaggedTensor:
    return distinct_values(features, feature_names)  # an fx leaf: torch.unique is data-dependent


class DistinctFeatures(nn.Module):
    """``features`` with each of ``feature_names`` reduced to its distinct values, sorted, in the first example
    (:func:`~torchrec_sid.modules.sid_transform.distinct_values`). Parameter-free, so TrainPipelineSparseDist runs
    it in the input-dist stage of the tables it feeds (as a transform).

    Example::

        # history_item_ids: [[4, 2, 4], [2]] -> [[2, 4], []]
        DistinctFeatures(["history_item_ids"])(features)
    """

    def __init__(self, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.feature_names = list(feature_names)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return _distinct_values(features, self.feature_names)


def _first_events(inverse: Tensor, num_distinct: int) -> Tensor:
    """``[U]``: the first event of each distinct item, for ``inverse: [n]`` (event -> its item's row among the U)."""
    positions = torch.arange(inverse.size(0), device=inverse.device)
    first = positions.new_full((num_distinct,), inverse.size(0))
    return first.scatter_reduce(0, inverse, positions, "amin")


class ItemArch(nn.Module):
    """Candidate and history item vectors from id tables, SID token tables, SIDE and / or soft SIDs, summed.

    Args:
        item_feature: the KJT feature of the candidate's item id (exactly one value per example).
        history_feature: the KJT feature of the history's item ids (jagged, oldest first).
        embedding_dim: d.
        embedding_collection: tables for ``item_feature`` / ``history_feature`` (the id representation) and for the
            token features ``transform`` derives from them; every feature of the collection must be one of these.
        transform: derives SID token features from ``item_feature`` / ``history_feature`` (its feature names): a
            :class:`~torchrec_sid.modules.SidFeatureTransform` (an in-model per-item lookup, replicated on every
            rank: :func:`~torchrec_sid.modules.sid_codes.lookup_table_bytes`) or a
            :class:`~torchrec_sid.modules.sid_codes.SidCodeTransform` (reads ``code_features``; no per-item state).
            A transform whose ``distinct_features`` holds ``history_feature`` passes the history's distinct ids
            only: each is looked up once per batch and its rows are gathered back to the events (the same vectors,
            fewer lookups; :func:`_item_arch` builds it so). A transform with SentencePiece pieces (``spm``)
            emits a variable number of pieces per item: each item's piece rows are summed into its one vector
            (:meth:`_piece_sums`), like its other token rows (neither is masked by ``trained_items``).
        code_features: the KJT features carrying the candidate's and the history's SID codes, level by level
            (``([item__code0, ...], [history__code0, ...])``, the SIDs-as-features path): SIDE packs them, and
            :class:`ItemVectors` carries them (SIM's search keys). None: SIDs come from per-item buffers.
        side: a SIDE embedding of the items' packed SIDs: ``side_packed_ids`` (``[I]`` long, row i = item i,
            replicated on every rank), or the first ``side.num_levels`` of ``code_features`` (an unknown item's
            ``-1`` codes read as the digits nearest the centres).
        soft_sid: soft-indexed SID vectors of item ids (MMQ stage 2).
        history_timestamp_feature, timestamp_feature: the history events' and the request's times (both or
            neither); they give :attr:`ItemVectors.history_ages`.
        trained_items: ``[I]`` bool, the items whose id rows training updates (None: all). The id vector of any
            other item is zero, as for an id outside the vocabulary: an untrained row is random noise.
        id_dropout: in training, the probability that an item's id vector is left out of its sum.
        distinct_history: without a transform, look each distinct history item up once per batch (the id tables,
            through a :class:`DistinctFeatures` input module; or SIDE alone, on ``torch.unique`` of the ids) and
            gather its vector back to the events: the same vectors, bit for bit. False: one lookup per event. With
            a transform, its ``distinct_features`` decide. SIDE joins the distinct rows whenever the tables' history
            is distinct (a packed SID per distinct item, then the one gather).

    ``forward(features KJT) -> ItemVectors`` (see :class:`ItemVectors` for the shapes).
    """

    id_known: Tensor | None
    side_packed_ids: Tensor | None
    piece_counts: Tensor | None

    def __init__(
        self,
        item_feature: str,
        history_feature: str,
        embedding_dim: int,
        *,
        embedding_collection: EmbeddingCollection | None = None,
        transform: SidFeatureTransform | SidCodeTransform | None = None,
        code_features: tuple[Sequence[str], Sequence[str]] | None = None,
        side: SIDEmbedding | None = None,
        side_packed_ids: Tensor | None = None,
        soft_sid: SoftSidEmbedding | None = None,
        history_timestamp_feature: str | None = None,
        timestamp_feature: str | None = None,
        trained_items: Tensor | None = None,
        id_dropout: float = 0.0,
        distinct_history: bool = True,
    ) -> None:
        super().__init__()
        if item_feature == history_feature:
            raise ValueError(f"ItemArch: item_feature and history_feature are both {item_feature!r}")
        if embedding_collection is None and side is None and soft_sid is None:
            raise ValueError("ItemArch: give at least one of embedding_collection, side, soft_sid")
        if (history_timestamp_feature is None) != (timestamp_feature is None):
            raise ValueError("ItemArch: give history_timestamp_feature and timestamp_feature together, got "
                             f"{history_timestamp_feature!r} and {timestamp_feature!r}")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"ItemArch: id_dropout must be in [0, 1), got {id_dropout}")
        self.item_feature, self.history_feature, self.embedding_dim = item_feature, history_feature, embedding_dim
        self.timestamp_features: tuple[str, str] | None = (
            None if history_timestamp_feature is None or timestamp_feature is None
            else (history_timestamp_feature, timestamp_feature))
        self.transform = transform
        self.embedding_collection = embedding_collection
        self.candidate_features, self.history_features = self._table_features(embedding_collection, transform)
        self.piece_features, piece_counts = self._piece_layout(transform)
        self.register_buffer("piece_counts", piece_counts)
        # the history reduced to its distinct items (by the transform, or by an input module without one): each is
        # looked up once, its summed row gathered back to the events
        self.distinct: DistinctFeatures | None = (
            DistinctFeatures([history_feature]) if distinct_history and transform is None
            and history_feature in self.history_features else None)
        self.distinct_tables = self.distinct is not None or (
            transform is not None and bool(self.history_features) and history_feature in transform.distinct_features)
        # no table at all (SIDE alone): torch.unique of the ids in the forward
        self.distinct_history = self.distinct_tables or (distinct_history and embedding_collection is None
                                                         and side is not None)
        ids = {item_feature, history_feature} & {*self.candidate_features, *self.history_features}
        if (id_dropout or trained_items is not None) and not ids:
            raise ValueError(f"ItemArch: id_dropout / trained_items act on the id tables, but embedding_collection "
                             f"has no table for {item_feature!r} or {history_feature!r}")
        if trained_items is not None and trained_items.ndim != 1:
            raise ValueError(f"ItemArch: trained_items must be [I] bool, got shape {tuple(trained_items.shape)}")
        self.register_buffer("id_known", None if trained_items is None else trained_items.bool().clone())
        self.id_dropout = id_dropout
        self.code_features = self._code_features(code_features)
        self._check_side(side, side_packed_ids, code_features, embedding_dim)
        self.side = side
        self.register_buffer("side_packed_ids", None if side_packed_ids is None else side_packed_ids.long().clone())
        if soft_sid is not None and soft_sid.tables.shape[-1] != embedding_dim:
            raise ValueError(f"ItemArch: soft_sid vectors are {soft_sid.tables.shape[-1]}-d, embedding_dim "
                             f"{embedding_dim}")
        self.soft_sid = soft_sid

    @staticmethod
    def _piece_layout(transform: SidFeatureTransform | SidCodeTransform | None) -> tuple[list[str], Tensor | None]:
        """The SentencePiece features of ``transform`` (several rows per item, summed per item) and every item's
        number of pieces ``[N + 1]`` (the last: the OOV item's one piece); ``([], None)`` without pieces. ItemArch
        keeps its own counts: the train pipeline swaps the transform for a ``PipelinedPostproc``."""
        if not isinstance(transform, SidFeatureTransform) or transform.spm_vocab_size is None:
            return [], None
        return [transform.derived_feature_names(f)[-1] for f in transform.feature_names], transform.piece_offsets.diff()

    @staticmethod
    def _code_features(code_features: tuple[Sequence[str], Sequence[str]] | None,
                       ) -> tuple[list[str], list[str]] | None:
        if code_features is None:
            return None
        if len(code_features[0]) != len(code_features[1]) or not code_features[0]:
            raise ValueError(f"ItemArch: code_features must name as many (>= 1) candidate as history code features, "
                             f"got {[list(c) for c in code_features]}")
        return list(code_features[0]), list(code_features[1])

    @staticmethod
    def _check_side(side: SIDEmbedding | None, side_packed_ids: Tensor | None,
                    code_features: tuple[Sequence[str], Sequence[str]] | None, embedding_dim: int) -> None:
        if side is None:
            if side_packed_ids is not None:
                raise ValueError("ItemArch: side_packed_ids is given without side")
            return
        if side_packed_ids is None and code_features is None:
            raise ValueError("ItemArch: side needs side_packed_ids or code_features (SIDE embeds the items' packed "
                             "SIDs)")
        if code_features is not None and side.num_levels > len(code_features[0]):
            raise ValueError(f"ItemArch: side reads {side.num_levels} levels, code_features carry "
                             f"{len(code_features[0])}")
        if side.output_dim != embedding_dim:
            raise ValueError(f"ItemArch: side.output_dim is {side.output_dim}, embedding_dim {embedding_dim}")

    def _table_features(self, collection: EmbeddingCollection | None,
                        transform: SidFeatureTransform | SidCodeTransform | None) -> tuple[list[str], list[str]]:
        """The collection's candidate and history features (each an item feature or a token derived from one)."""
        item, history = self.item_feature, self.history_feature
        if transform is not None:
            extra = sorted(set(transform.feature_names) - {item, history})
            if extra:
                raise ValueError(f"ItemArch: transform derives tokens from {extra}, which are neither item_feature "
                                 f"{item!r} nor history_feature {history!r}")
            if collection is None:
                raise ValueError("ItemArch: a transform needs an embedding_collection with its token tables")
        if collection is None:
            return [], []

        def derived(feature: str) -> list[str]:
            known = transform is not None and feature in transform.feature_names
            return [feature, *(transform.derived_feature_names(feature) if transform is not None and known else [])]

        candidate_names, history_names = derived(item), derived(history)
        candidate, hist = [], []
        for config in collection.embedding_configs():
            if config.embedding_dim != self.embedding_dim:
                raise ValueError(f"ItemArch: table {config.name!r} is {config.embedding_dim}-d, embedding_dim "
                                 f"{self.embedding_dim}")
            for name in config.feature_names:
                if name in candidate_names:
                    candidate.append(name)
                elif name in history_names:
                    hist.append(name)
                else:
                    raise ValueError(f"ItemArch: table {config.name!r} reads feature {name!r}, which is neither "
                                     f"{item!r}, {history!r} nor a SID token the transform derives from them")
        return candidate, hist

    def forward(self, features: KeyedJaggedTensor) -> ItemVectors:
        """``features``: a KJT with ``item_feature`` and ``history_feature`` (and the timestamp features) among
        its keys; other keys are ignored. Returns :class:`ItemVectors`."""
        history_jt = features[self.history_feature]
        candidate_ids = features[self.item_feature].values()
        candidate_codes, history_codes = None, None
        if self.code_features is not None:  # read before the transform, which drops the code features
            candidate_codes = torch.stack([features[name].values() for name in self.code_features[0]], 1)
            history_codes = torch.stack([features[name].values() for name in self.code_features[1]], 1)
        history_ids, lengths = history_jt.values(), history_jt.lengths()
        # new_zeros, not torch.zeros(ids.size(0), ...): fx traces it (TrainPipelineSparseDist traces the model)
        candidate = candidate_ids.new_zeros((candidate_ids.size(0), self.embedding_dim), dtype=torch.float32)
        history = history_ids.new_zeros((history_ids.size(0), self.embedding_dim), dtype=torch.float32)
        # [U] the history's distinct items (sorted), [U, d] their summed rows, [sum L] each event's row among them
        distinct_ids, distinct, inverse = None, None, None
        if self.embedding_collection is not None:
            candidate, history, distinct_ids, distinct = self._table_vectors(features, candidate, history)
            if distinct_ids is not None:
                inverse = torch.searchsorted(distinct_ids, history_ids)
        elif self.distinct_history:  # no table: the distinct items of the ids, for SIDE
            unique = torch.unique(history_ids, return_inverse=True)  # indexed, not unpacked: fx traces it
            distinct_ids, inverse = unique[0], unique[1]
            distinct = history_ids.new_zeros((distinct_ids.size(0), self.embedding_dim), dtype=torch.float32)
        if self.side is not None:
            candidate = candidate + self.side(self._side_input(candidate_ids, candidate_codes))
            if distinct is not None and distinct_ids is not None and inverse is not None:  # SIDE of each item once
                codes = None if history_codes is None else history_codes.index_select(
                    0, _first_events(inverse, distinct_ids.size(0)))
                distinct = distinct + self.side(self._side_input(distinct_ids, codes))
            else:
                history = history + self.side(self._side_input(history_ids, history_codes))
        if distinct is not None and inverse is not None:
            history = distinct.index_select(0, inverse)
        if self.soft_sid is not None:  # one call, so the tokenizer's regulariser enters the loss once
            both = self.soft_sid(torch.cat([candidate_ids, history_ids]))
            candidate = candidate + both[: candidate_ids.size(0)]
            history = history + both[candidate_ids.size(0):]
        ages = None
        if self.timestamp_features is not None:  # seconds before the request (float32: exact to a few seconds)
            history_times, request_times = self.timestamp_features
            request = torch.repeat_interleave(features[request_times].values(), lengths)
            ages = (features[history_times].values() - request).float()
        return ItemVectors(candidate, history, candidate_ids, history_ids, lengths, ages, candidate_codes,
                           history_codes)

    def _table_vectors(self, features: KeyedJaggedTensor, candidate: Tensor, history: Tensor,
                       ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The table rows added to ``candidate: [B, d]`` and ``history: [sum L, d]``; when the tables' history is
        distinct, the history's rows stay per item: ``(candidate, history, distinct_ids [U], rows [U, d])``."""
        assert self.embedding_collection is not None
        candidate_ids, history_ids = features[self.item_feature].values(), features[self.history_feature].values()
        tables_input = features
        if self.distinct is not None:
            tables_input = self.distinct(tables_input)
        if self.transform is not None:
            tables_input = self.transform(tables_input)
        embedded = self.embedding_collection(tables_input)
        for name in self.candidate_features:
            candidate = candidate + self._item_rows(embedded, name, candidate_ids)
        if not self.distinct_tables:
            for name in self.history_features:
                history = history + self._item_rows(embedded, name, history_ids)
            return candidate, history, None, None
        distinct_ids = tables_input[self.history_feature].values()  # the history's distinct ids, sorted
        if self.training and self.id_dropout > 0:  # id dropout draws per event: gather every feature first
            return candidate, self._gathered_history_rows(embedded, distinct_ids, history_ids), None, None
        return candidate, history, distinct_ids, self._distinct_history_rows(embedded, distinct_ids)

    def _distinct_history_rows(self, embedded: dict[str, JaggedTensor], distinct_ids: Tensor) -> Tensor:
        """``[U, d]``: the summed table rows of the history's distinct items ``distinct_ids: [U]`` (sorted; ``[U, d]``
        rows per feature). Summed in the per-event path's order, so the events' gathered rows equal its bit for
        bit; trained_items masks per item, so on these rows."""
        distinct = distinct_ids.new_zeros((distinct_ids.size(0), self.embedding_dim), dtype=torch.float32)
        for name in self.history_features:
            distinct = distinct + self._item_rows(embedded, name, distinct_ids)
        return distinct

    def _gathered_history_rows(self, embedded: dict[str, JaggedTensor], distinct_ids: Tensor,
                               history_ids: Tensor) -> Tensor:
        """``[sum L, d]``: every feature's distinct rows gathered to the events ``history_ids: [sum L]`` first, then
        summed (id dropout draws per event)."""
        inverse = torch.searchsorted(distinct_ids, history_ids)
        history = history_ids.new_zeros((history_ids.size(0), self.embedding_dim), dtype=torch.float32)
        for name in self.history_features:
            if name == self.history_feature:
                history = history + self._id_rows(embedded[name].values().index_select(0, inverse), history_ids)
            else:
                history = history + self._item_rows(embedded, name, distinct_ids).index_select(0, inverse)
        return history

    def _item_rows(self, embedded: dict[str, JaggedTensor], name: str, ids: Tensor) -> Tensor:
        """``[n, d]``: feature ``name``'s table rows of the items ``ids: [n]``: the id rows masked
        (:meth:`_id_rows`), a SentencePiece feature's piece rows summed per item (:meth:`_piece_sums`), a token's
        rows as they are."""
        rows = embedded[name].values()
        if name == self.item_feature or name == self.history_feature:
            return self._id_rows(rows, ids)
        if name in self.piece_features:
            return self._piece_sums(rows, ids)
        return rows

    def _piece_sums(self, rows: Tensor, ids: Tensor) -> Tensor:
        """``[n, d]``: the piece rows ``rows: [P, d]`` of the items ``ids: [n]`` (their pieces in order, as the
        transform emits them) summed per item. Item i has ``piece_counts[i]`` pieces; an id outside the SID table
        (kept by the ``"oov"`` policy) has the OOV item's one piece."""
        assert self.piece_counts is not None
        num_items = self.piece_counts.size(0) - 1
        ids = ids.masked_fill((ids < 0) | (ids >= num_items), num_items)
        counts = self.piece_counts.index_select(0, ids)  # [n]
        # output_size: the rows' count, so fx and torch.export need no data-dependent size
        owner = torch.repeat_interleave(torch.arange(ids.size(0), device=ids.device), counts,
                                        output_size=rows.size(0))  # [P]: each piece's item
        return rows.new_zeros((ids.size(0), rows.size(1))).index_add(0, owner, rows)

    def _side_input(self, ids: Tensor, codes: Tensor | None) -> Tensor:
        """SIDE's packed SIDs ``[n]`` of items ``ids: [n]``: from ``side_packed_ids``, else from their codes
        ``[n, levels]`` (the SIDs-as-features path)."""
        if self.side_packed_ids is not None:
            return self.side_packed_ids[ids]
        assert codes is not None, "ItemArch: SIDE without side_packed_ids reads code_features"
        return self._side_packed(codes)

    def _side_packed(self, codes: Tensor) -> Tensor:
        """Codes ``[n, levels]`` -> SIDE's packed SIDs ``[n]`` over its levels; ``-1`` (unknown) digits read as the
        digit nearest the level's centre."""
        assert self.side is not None
        digits = codes[:, :self.side.num_levels]
        digits = torch.where(digits < 0, self.side.centres.round().long(), digits)
        return (digits * self.side.radix_weights).sum(-1)

    def per_item_bytes(self) -> dict[str, int]:
        """Bytes per rank of this arch's per-item buffers (replicated on every rank, growing with the catalogue):
        the SID lookup ``transform.item_tokens`` (and SentencePiece pieces: ``transform.piece_offsets``,
        ``transform.piece_values``, ``piece_counts``), ``side_packed_ids``, ``id_known``. Empty on the SIDs-as-features
        path without an id representation; the id table itself is sharded, see :func:`replicated_buffer_bytes`."""
        buffers = {"side_packed_ids": self.side_packed_ids, "id_known": self.id_known,
                   "transform.item_tokens": getattr(self.transform, "item_tokens", None),
                   "transform.piece_offsets": getattr(self.transform, "piece_offsets", None),
                   "transform.piece_values": getattr(self.transform, "piece_values", None),
                   "piece_counts": self.piece_counts}
        return {name: t.numel() * t.element_size() for name, t in buffers.items() if isinstance(t, Tensor)}

    def _id_rows(self, rows: Tensor, ids: Tensor) -> Tensor:
        """``rows`` with zeros for untrained ids and (in training) dropped ones."""
        dropout = self.training and self.id_dropout > 0
        if self.id_known is None and not dropout:
            return rows
        keep = self.id_known[ids] if self.id_known is not None else torch.ones_like(ids, dtype=torch.bool)
        if dropout:
            keep = keep & (torch.rand(ids.shape, device=ids.device) >= self.id_dropout)
        return rows * keep.unsqueeze(1).to(rows.dtype)


class HistoryArch(nn.Module):
    """A :class:`~torchrec_sid.modules.HistoryBlock` over :class:`ItemArch`'s jagged history, to one ``d``-vector.

    Pads the most recent ``max_history`` events, passes the events' ages (when the item arch has timestamps) and
    per-item search keys (for SIM), and projects the block's output to ``d`` when it is wider (PMA).

    Padded length: with ``pad_history="batch"`` a batch is padded to its longest history, at most ``max_history``
    (at least 1), so that its cost follows its real lengths: on the synthetic long-history setting (``max_history``
    10,000, mean history about 2,200, shuffled batches of 16 padded to a median 5,222) DIN trained 2.4-2.6x and DMQN
    2.8-3.0x faster, and 7.9-9.7x / 8.8-10.7x on batches grouped by length (``benchmarks/history_padding.py``, two
    runs, one thread). The block's output is the same as at ``max_history``, since no block reads a padded
    position (up to float rounding; DMQN in training draws its Gumbel noise per padded position, so its draws, and
    the random numbers drawn after them, differ between the two). It costs one device-to-host read of the longest
    length per batch. While fx (TorchRec's tracer, the train pipeline), ``torch.export`` or ``torch.compile``
    trace the model, it pads to ``max_history`` whatever the setting, so that no shape depends on the data;
    ``pad_history="max"`` does so always (fixed shapes in eager runs too).

    Args:
        block: the history block, built for ``embedding_dim``-d events.
        embedding_dim: d.
        max_history: L, the most recent events kept and the longest padded length.
        item_keys: ``[I]`` long search key of every item (e.g. its first SID level), for search-based blocks.
        key_level: instead of ``item_keys``, the search key is the items' SID code at this level, read from
            :attr:`ItemVectors.history_codes` / ``candidate_codes`` (the SIDs-as-features path: no per-item buffer).
        pad_history: ``batch`` (the batch's longest history) or ``max`` (always ``max_history``), see above.

    ``forward(items: ItemVectors) -> [B, d]``.
    """

    item_keys: Tensor | None

    def __init__(self, block: HistoryBlock, embedding_dim: int, max_history: int,
                 item_keys: Tensor | None = None, key_level: int | None = None, pad_history: str = "batch") -> None:
        super().__init__()
        if pad_history not in HISTORY_PADDINGS:
            raise ValueError(f"HistoryArch: pad_history must be one of {HISTORY_PADDINGS}, got {pad_history!r}")
        self.pad_history = pad_history
        if item_keys is not None and key_level is not None:
            raise ValueError("HistoryArch: give item_keys or key_level, not both")
        if key_level is not None and key_level < 0:
            raise ValueError(f"HistoryArch: key_level must be >= 0, got {key_level}")
        self.key_level = key_level
        if max_history < 1:
            raise ValueError(f"HistoryArch: max_history must be >= 1, got {max_history}")
        if item_keys is not None and item_keys.ndim != 1:
            raise ValueError(f"HistoryArch: item_keys must be [I], got shape {tuple(item_keys.shape)}")
        self.block = block
        self.embedding_dim, self.max_history = embedding_dim, max_history
        self.projection = nn.Linear(block.output_dim, embedding_dim) if block.output_dim != embedding_dim else None
        self.register_buffer("item_keys", None if item_keys is None else item_keys.long().clone())

    def padded_length(self, lengths: Tensor) -> int:
        """L of the padded history for history lengths ``lengths: [B]``: ``max_history`` with ``pad_history="max"``
        or while tracing (static shapes), else the longest length capped at ``max_history``, at least 1."""
        if self.pad_history == "max" or is_tracing() or lengths.numel() == 0:
            return self.max_history
        return max(1, min(int(lengths.max()), self.max_history))

    def forward(self, items: ItemVectors) -> Tensor:
        lengths = items.history_lengths
        length = self.padded_length(lengths)
        history, mask = jagged_to_padded(JaggedTensor(values=items.history, lengths=lengths), length)
        ages = None
        if items.history_ages is not None:
            ages, _ = jagged_to_padded(JaggedTensor(values=items.history_ages, lengths=lengths), length)
        keys, candidate_key = None, None
        if self.item_keys is not None:
            padded, _ = jagged_to_padded(JaggedTensor(values=self.item_keys[items.history_ids].float(),
                                                      lengths=lengths), length)
            keys, candidate_key = padded.long(), self.item_keys[items.candidate_ids]
        elif self.key_level is not None:
            if items.history_codes is None or items.candidate_codes is None:
                raise ValueError("HistoryArch: key_level needs the items' SID codes (ItemArch code_features)")
            padded, _ = jagged_to_padded(JaggedTensor(values=items.history_codes[:, self.key_level].float(),
                                                      lengths=lengths), length)
            keys, candidate_key = padded.long(), items.candidate_codes[:, self.key_level]
        out = self.block(history, mask, items.candidate, history_timestamps=ages, history_keys=keys,
                         candidate_key=candidate_key)
        return out if self.projection is None else self.projection(out)


class ContentArch(nn.Module):
    """The candidate's frozen content embedding ``[I, Dc]`` (a buffer) through a 2-layer MLP: item ids ``[B]`` ->
    ``[B, d]``."""

    content: Tensor

    def __init__(self, content: Tensor, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("content", content.float())
        self.embedding_dim = embedding_dim
        self.mlp = nn.Sequential(nn.Linear(content.shape[1], embedding_dim), nn.ReLU(),
                                 nn.Linear(embedding_dim, embedding_dim))

    def forward(self, item_ids: Tensor) -> Tensor:
        return self.mlp(self.content[item_ids])


class SidDLRM(nn.Module):
    """DLRM-style CTR model with SID item representations and a history block; see the module docstring.

    The notation of ``torchrec.models.dlrm.DLRM``: B examples, F dense features, d the embedding dimension (of
    every table, the item arch and the dense arch's output).

    Args:
        embedding_bag_collection: the pooled features' tables (``sparse_arch``), all ``d``-wide.
        item_arch: the candidate and history item vectors.
        dense_in_features: F.
        dense_arch_layer_sizes: the dense arch's layer sizes; the last is d.
        over_arch_layer_sizes: the over arch's layer sizes; the last is 1 (one logit).
        history_arch: the user-history block (None: none).
        content_arch: candidate item ids ``[B]`` -> ``[B, d]`` (None: none).

    Example::

        D = 8
        # 4 ads with 2-level SIDs; a request is a viewer country, an ad and the ads watched before it
        sids = SemanticIds(torch.tensor([[0, 1], [1, 0], [1, 1], [2, 0]]), [3, 2], "rq_kmeans", {})
        transform = SidFeatureTransform(sids, ["ad_id", "watched_ad_ids"])
        tables = [EmbeddingConfig(name="ad", embedding_dim=D, num_embeddings=4,
                                  feature_names=["ad_id", "watched_ad_ids"]), *transform.embedding_configs(D)]
        item_arch = ItemArch("ad_id", "watched_ad_ids", D, transform=transform,
                             embedding_collection=EmbeddingCollection(tables=tables))
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="country", embedding_dim=D,
                                                                num_embeddings=10, feature_names=["viewer_country"])])
        model = SidDLRM(ebc, item_arch, dense_in_features=3, dense_arch_layer_sizes=[16, D],
                        over_arch_layer_sizes=[16, 1], history_arch=HistoryArch(DIN(D), D, max_history=5))
        # 2 requests: viewer_country [[7], [2]], ad_id [[3], [0]], watched_ad_ids [[0, 2], []]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["viewer_country", "ad_id", "watched_ad_ids"], values=torch.tensor([7, 2, 3, 0, 0, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]))
        model(torch.rand(2, 3), features)  # logits [2]
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        item_arch: ItemArch,
        dense_in_features: int,
        dense_arch_layer_sizes: Sequence[int],
        over_arch_layer_sizes: Sequence[int],
        history_arch: HistoryArch | None = None,
        content_arch: nn.Module | None = None,
    ) -> None:
        super().__init__()
        d = item_arch.embedding_dim
        widths = {c.name: c.embedding_dim for c in embedding_bag_collection.embedding_bag_configs()}
        if not widths:
            raise ValueError("SidDLRM: embedding_bag_collection has no table; at least one pooled feature is needed")
        if set(widths.values()) != {d}:
            raise ValueError(f"SidDLRM: every pooled table must be item_arch.embedding_dim = {d}-d, got {widths}")
        if not dense_arch_layer_sizes or dense_arch_layer_sizes[-1] != d:
            raise ValueError(f"SidDLRM: the last dense arch layer must be embedding_dim {d}, got "
                             f"{list(dense_arch_layer_sizes)}")
        if not over_arch_layer_sizes or over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"SidDLRM: the last over arch layer must be 1 (the logit), got "
                             f"{list(over_arch_layer_sizes)}")
        if history_arch is not None and history_arch.embedding_dim != d:
            raise ValueError(f"SidDLRM: history_arch is {history_arch.embedding_dim}-d, item_arch {d}-d")
        self.sparse_arch = SparseArch(embedding_bag_collection)
        self.dense_arch = DenseArch(dense_in_features, list(dense_arch_layer_sizes))
        self.item_arch = item_arch
        self.content_arch = content_arch
        self.history_arch = history_arch
        num_vectors = (len(self.sparse_arch.sparse_feature_names) + 1 + int(content_arch is not None)
                       + int(history_arch is not None))
        self.interaction_arch = InteractionArch(num_sparse_features=num_vectors)
        self.over_arch = OverArch(d + num_vectors * (num_vectors + 1) // 2, list(over_arch_layer_sizes))

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        """Logits of a batch.

        Args:
            dense_features: ``[B, F]`` float.
            sparse_features: a KJT of B examples with the pooled features of ``embedding_bag_collection`` and the
                item arch's features among its keys (others are ignored).

        Returns:
            ``[B]`` logits.
        """
        items = self.item_arch(sparse_features)
        vectors = [self.sparse_arch(sparse_features), items.candidate.unsqueeze(1)]  # [B, F_pooled, d], [B, 1, d]
        if self.content_arch is not None:
            vectors.append(self.content_arch(items.candidate_ids).unsqueeze(1))
        if self.history_arch is not None:
            vectors.append(self.history_arch(items).unsqueeze(1))
        interactions = self.interaction_arch(self.dense_arch(dense_features), torch.cat(vectors, dim=1))
        return self.over_arch(interactions).squeeze(-1)

    @classmethod
    def from_config(cls, config: ModelConfig, schema: FeatureSchema, semantic_ids: SemanticIds | None = None,
                    signals: dict[str, Tensor] | None = None, tokenizer: SoftIndexTokenizer | None = None,
                    trained_items: Tensor | None = None) -> SidDLRM:
        """The model a YAML ``model:`` section describes, for the features of ``schema``.

        Args:
            config: the model config (representations, history block, sizes).
            schema: the KJT's feature names and sizes (for the demo data:
                :func:`torchrec_sid.models.factory.catalog_schema`).
            semantic_ids: SIDs of the items, row i = item i (needed by ``sid``, ``side`` and SIM's search keys). With
                ``config.sid_features`` only its cardinalities, centres and suffix level are read: the batch carries
                the codes (``CtrBatches(..., sid_codes=...)``), and the table may hold more or fewer items.
            signals: the items' content ``{m: [I, D_m]}``: ``text`` for ``config.content``, the tokenizer's
                modalities for ``soft_sid``.
            tokenizer: the stage-1 MMQ tokenizer (needed by ``soft_sid``; trained in place).
            trained_items: ``[I]`` bool, items whose id rows training updates (see :class:`ItemArch`; None: all).
        """
        check_model_inputs(config, schema.num_items, semantic_ids, signals, tokenizer)
        d = config.embedding_dim
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=d, num_embeddings=size, feature_names=[name])
            for name, size in schema.pooled_features.items()
        ])
        item_arch = _item_arch(config, schema, semantic_ids, signals or {}, tokenizer, trained_items)
        content_arch = ContentArch((signals or {})["text"], d) if config.content else None
        block = build_history_block(config.history_block, d, dict(config.history_options))
        history_arch = None
        if block is not None:  # SIM searches the history for the candidate's first SID level
            sim = isinstance(block, SIM) and semantic_ids is not None
            keys = semantic_ids.codes[:, 0] if sim and not config.sid_features and semantic_ids is not None else None
            history_arch = HistoryArch(block, d, config.max_history, keys,
                                       key_level=0 if sim and config.sid_features else None,
                                       pad_history=config.pad_history)
        return cls(ebc, item_arch, schema.dense_in_features, [*config.dense_layers, d], [*config.over_layers, 1],
                   history_arch, content_arch)


def _item_arch(config: ModelConfig, schema: FeatureSchema, semantic_ids: SemanticIds | None,
               signals: dict[str, Tensor], tokenizer: SoftIndexTokenizer | None,
               trained_items: Tensor | None) -> ItemArch:
    reps, d = config.item_representation, config.embedding_dim
    item_features = [schema.item_feature, schema.history_feature]
    if trained_items is not None and trained_items.shape != (schema.num_items,):
        raise ValueError(f"trained_items must be [{schema.num_items}], got {tuple(trained_items.shape)}")
    tables: list[EmbeddingConfig] = []
    if "id" in reps and config.id_buckets is None:
        tables.append(EmbeddingConfig(name="item_id", embedding_dim=d, num_embeddings=schema.num_items,
                                      feature_names=list(item_features)))
    transform: SidFeatureTransform | SidCodeTransform | None = None
    codes = None
    if config.sid_features and semantic_ids is not None:  # the batch carries every level's codes
        codes = (code_feature_names(item_features[0], semantic_ids.num_levels),
                 code_feature_names(item_features[1], semantic_ids.num_levels))
    if "sid" in reps and semantic_ids is not None:
        tokens, sids = config.sid_tokens, semantic_ids
        if config.id_buckets is not None:  # the hashed id: one more token table of the same transform
            sids, tokens = with_hashed_id_level(semantic_ids, tokens, config.id_buckets)
        settings: dict[str, Any] = {"ngram_orders": tokens.ngram_orders, "prefix_lengths": tokens.prefix_lengths,
                    "num_levels": tokens.num_levels, "max_table_size": tokens.max_table_size,
                    "unknown_ids": tokens.unknown_ids}
        pieces = None if tokens.spm_vocab_size is None else sid_pieces(semantic_ids, config)
        if pieces is not None:
            settings["spm"] = pieces
        if tokens.row_budget is not None:  # the pieces table's rows (+ OOV) first, the other tables share the rest
            reserved = 0 if pieces is None else pieces.vocab_size + int(tokens.unknown_ids == "oov")
            settings["max_table_size"] = budget_table_size(sids.cardinalities, tokens, reserved)
        transform = (SidCodeTransform(sids.cardinalities, item_features, distinct_features=[schema.history_feature],
                                      **settings)
                     if config.sid_features else SidFeatureTransform(sids, item_features,
                                                                     distinct_features=[schema.history_feature],
                                                                     **settings))
        tables += transform.embedding_configs(d)
    elif config.id_buckets is not None:  # the id table, hashed: a one-level "SID" of hash buckets
        transform = hashed_id_transform(schema.num_items, config.id_buckets, item_features,
                                        distinct_features=[schema.history_feature])
        tables += transform.embedding_configs(d)
    side, packed = None, None
    if "side" in reps and semantic_ids is not None:
        # the quantizer's own levels: a collision-suffix level only numbers duplicates, it has no order
        levels = semantic_ids.num_levels - int(bool(semantic_ids.config.get("collision_suffix")))
        side = SIDEmbedding.from_semantic_ids(semantic_ids, d, num_levels=levels)
        if not config.sid_features:
            packed = pack_codes(semantic_ids.codes[:, :levels], semantic_ids.cardinalities[:levels])
    soft_sid = None
    if "soft_sid" in reps and tokenizer is not None:
        soft = config.soft_sid
        soft_sid = SoftSidEmbedding(tokenizer, {m: signals[m] for m in tokenizer.dims}, d, soft.tau,
                                    soft.recon_weight, soft.aux_weight, soft.vq_weight)
    with_history = config.history_block != "none"
    return ItemArch(schema.item_feature, schema.history_feature, d,
                    embedding_collection=EmbeddingCollection(tables=tables) if tables else None,
                    transform=transform, code_features=codes, side=side, side_packed_ids=packed, soft_sid=soft_sid,
                    history_timestamp_feature=schema.history_timestamp_feature if with_history else None,
                    timestamp_feature=schema.timestamp_feature if with_history else None,
                    trained_items=trained_items if "id" in reps and config.id_buckets is None else None,
                    id_dropout=config.id_dropout)


def hashed_id_transform(num_items: int, buckets: int, item_features: list[str],
                        distinct_features: Sequence[str] = ()) -> SidFeatureTransform:
    """Item ids ``[0, num_items)`` hashed into ``buckets`` rows of one table ``item_hash_l0`` (a fixed hash,
    :func:`~torchrec_sid.modules.sid_transform.hash_packed_ids`), as a token transform of ``item_features``
    (those of ``distinct_features`` reduced to their distinct ids: :class:`SidFeatureTransform`)."""
    codes = hash_packed_ids(torch.arange(num_items, dtype=torch.long), buckets).unsqueeze(1)
    hashed = SemanticIds(codes, [buckets], "id_hash", {"buckets": buckets})
    return SidFeatureTransform(hashed, item_features, max_table_size=buckets, name="item_hash",
                               distinct_features=distinct_features)


def with_hashed_id_level(semantic_ids: SemanticIds, tokens: SidTokenConfig,
                         buckets: int) -> tuple[SemanticIds, SidTokenConfig]:
    """The SIDs ``[N, levels]`` (the first ``tokens.num_levels``) with each item's id hashed into ``buckets`` values
    as one more, last level ``[N, levels + 1]``, and ``tokens`` reading it: its per-level tokens then include the
    hashed id table, and ``row_budget`` holds it too. Sliding n-grams (refused by ``ModelConfig``) or a prefix longer
    than the SID would join the hashed id to SID codes: ValueError."""
    levels = semantic_ids.num_levels if tokens.num_levels is None else tokens.num_levels
    if tuple(tokens.ngram_orders) != (1,) or max(tokens.prefix_lengths, default=0) > levels:
        raise ValueError(f"model.id_buckets with sid: the hashed id is SID level {levels}, so sid_tokens must not "
                         f"span it: ngram_orders [1] and prefix_lengths <= {levels}, got "
                         f"{list(tokens.ngram_orders)} and {list(tokens.prefix_lengths)}")
    if levels > semantic_ids.num_levels:
        raise ValueError(f"model.sid_tokens.num_levels {levels} exceeds the {semantic_ids.num_levels} SID levels")
    hashed = hash_packed_ids(torch.arange(semantic_ids.num_items, dtype=torch.long), buckets)
    codes = torch.cat([semantic_ids.codes[:, :levels].long(), hashed.unsqueeze(1)], dim=1)
    sids = SemanticIds(codes, [*semantic_ids.cardinalities[:levels], buckets], semantic_ids.quantizer,
                       {**semantic_ids.config, "hashed_id_level": levels, "id_buckets": buckets})
    return sids, dataclasses.replace(tokens, num_levels=levels + 1)


def sid_pieces(semantic_ids: SemanticIds, config: ModelConfig) -> SidPieces:
    """The items' SentencePiece pieces of ``config.sid_tokens`` (``spm_vocab_size``, ``spm_model_type``,
    ``spm_seed``), fitted on their first ``num_levels`` SID levels (None: those before a collision suffix)."""
    tokens = config.sid_tokens
    assert tokens.spm_vocab_size is not None
    if config.sid_features:
        raise ValueError(f"model.sid_tokens.spm_vocab_size ({tokens.spm_vocab_size}) needs the per-item SID lookup "
                         f"(the pieces are a per-item table): not with model.sid_features")
    return fit_sid_sentencepiece(semantic_ids, tokens.spm_vocab_size, num_levels=tokens.num_levels,
                                 model_type=tokens.spm_model_type, seed=tokens.spm_seed)


def budget_table_size(cardinalities: Sequence[int], tokens: SidTokenConfig, reserved: int = 0) -> int:
    """The largest table size with which the SID token tables of ``tokens`` hold ``tokens.row_budget`` rows in all
    (OOV rows included), ``reserved`` of them (the SentencePiece table's) set aside first: tables with a smaller
    vocabulary keep it, the others are hashed into this many rows."""
    assert tokens.row_budget is not None
    levels = len(cardinalities) if tokens.num_levels is None else tokens.num_levels
    vocabularies = sorted(t.num_values for t in sid_tokens(list(cardinalities[:levels]), tokens.ngram_orders,
                                                            tokens.prefix_lengths, MAX_TABLE_SIZE))
    left = tokens.row_budget - reserved - len(vocabularies) * int(tokens.unknown_ids == "oov")
    for i, rows in enumerate(vocabularies):  # ascending: table i and all larger ones get min(rows, left / rest)
        share = left // (len(vocabularies) - i)
        if rows > share:
            if share < 1:
                raise ValueError(f"model.sid_tokens.row_budget {tokens.row_budget} leaves no row for the "
                                 f"{len(vocabularies) - i} largest SID token table(s)"
                                 + (f" after the {reserved} rows of the SentencePiece table" if reserved else ""))
            return share
        left -= rows
    return vocabularies[-1] if vocabularies else 1


def build_history_block(name: str, embedding_dim: int, options: dict[str, Any]) -> HistoryBlock | None:
    """The history block called ``name`` with ``options`` as keyword arguments (None for ``none``)."""
    blocks = {"pooling": MeanPooling, "pma": PMA, "din": DIN, "sim": SIM, "dmqn": DMQN}
    if name == "none":
        return None
    try:
        return blocks[name](embedding_dim=embedding_dim, **options)
    except TypeError as e:
        raise ValueError(f"model.history_options for {name!r}: {e}") from e


def check_model_inputs(config: ModelConfig, num_items: int, semantic_ids: SemanticIds | None,
                       signals: dict[str, Tensor] | None, tokenizer: SoftIndexTokenizer | None) -> None:
    """Raises ValueError, naming the field, when the config and the artifacts given do not fit together."""
    if config.needs_semantic_ids and semantic_ids is None:
        raise ValueError(f"model.item_representation {list(config.item_representation)} / history_block "
                         f"{config.history_block!r} needs semantic IDs (train.semantic_ids)")
    if semantic_ids is not None and semantic_ids.num_items != num_items and not config.sid_features:
        raise ValueError(f"train.semantic_ids has {semantic_ids.num_items} items, the data has {num_items}")
    needed = {"text"} if config.content else set()
    if "soft_sid" in config.item_representation:
        if tokenizer is None:
            raise ValueError("model.item_representation has soft_sid, which needs an MMQ tokenizer (train.tokenizer)")
        needed |= set(tokenizer.dims)
    given = signals or {}
    missing = sorted(needed - set(given))
    if missing:
        raise ValueError(f"model.content / soft_sid need the content signal(s) {missing}; given {sorted(given)}")
    for m in needed:
        x = given[m]
        if x.ndim != 2 or x.shape[0] != num_items:
            raise ValueError(f"content signal {m!r} must be [{num_items}, D], got {tuple(x.shape)}")


def replicated_buffer_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every buffer of ``model`` by name: what each rank holds whole (DistributedModelParallel shards only
    the embedding tables). On the id -> SID lookup path the per-item buffers (``item_arch.transform.item_tokens``,
    ``item_arch.side_packed_ids``, ``history_arch.item_keys``) grow with the catalogue; on the SIDs-as-features path
    (``ModelConfig.sid_features``) none does."""
    return {name: t.numel() * t.element_size() for name, t in model.named_buffers()}


def embedding_collections(model: nn.Module) -> list[EmbeddingCollection | EmbeddingBagCollection]:
    """The model's ``EmbeddingCollection`` and ``EmbeddingBagCollection`` modules: its tables, which
    DistributedModelParallel shards (SIDE and soft-SID parameters are dense)."""
    return [m for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of :func:`embedding_collections` ``(model)``, each once."""
    seen: dict[int, nn.Parameter] = {}
    for collection in embedding_collections(model):
        for p in collection.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters in embedding tables (:func:`table_parameters`) and elsewhere (dense), of an unsharded model."""
    tables = sum(p.numel() for p in table_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": tables, "dense": total - tables, "total": total}
