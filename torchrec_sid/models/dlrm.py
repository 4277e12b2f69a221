"""A DLRM-style ranking model whose item representation and user-history block are chosen by config.

Arches, as in ``torchrec.models.dlrm`` (whose ``SparseArch``, ``DenseArch``, ``InteractionArch`` and ``OverArch``
are reused):

* ``sparse_arch``: pooled user features and the candidate's genres through an ``EmbeddingBagCollection``.
* ``dense_arch``: the dense features through an MLP to ``d``.
* ``item_arch``: one ``d``-vector per item, for the candidate and for every history event, as the sum of the
  configured representations: ``id`` (an item-id table), ``sid`` (SID token / n-gram tables fed by a
  :class:`~torchrec_sid.modules.SidFeatureTransform`), ``side`` (table-free
  :class:`~torchrec_sid.modules.SIDEmbedding`) and ``soft_sid`` (MMQ stage 2: soft-indexed SID tokens of a
  trainable tokenizer, :class:`~torchrec_sid.modules.SoftSidEmbedding`; its small ``[E, K, d]`` tables are dense).
  The id and SID tables live in one ``EmbeddingCollection`` that DistributedModelParallel shards; candidate and
  history share their rows.
* ``content_arch`` (optional): the candidate's text content embedding through a 2-layer MLP.
* ``history_arch``: a :class:`~torchrec_sid.modules.HistoryBlock` (pooling, PMA, DIN, SIM, DMQN) over the padded
  history, with the candidate as target.
* ``interaction_arch`` + ``over_arch``: pairwise dot products of all ``d``-vectors, then an MLP to one logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_sid.data.batches import (
    HISTORY_ITEM_IDS,
    HISTORY_TIMESTAMPS,
    ITEM_GENRES,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    Catalog,
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
from torchrec_sid.modules.history import jagged_to_padded
from torchrec_sid.modules.soft_sid import SoftIndexTokenizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import pack_codes

ITEM_REPRESENTATIONS = ("id", "sid", "side", "soft_sid")
HISTORY_BLOCKS = ("none", "pooling", "pma", "din", "sim", "dmqn")


@dataclass(frozen=True)
class SidTokenConfig:
    """Which SID tokens ``item_arch`` looks up (see :class:`~torchrec_sid.modules.SidFeatureTransform`)."""

    ngram_orders: tuple[int, ...] = (1,)
    prefix_lengths: tuple[int, ...] = ()
    num_levels: int | None = None
    max_table_size: int = 2**20


@dataclass(frozen=True)
class SoftSidConfig:
    """MMQ stage 2 (``soft_sid``): soft-index temperature and the weights of the tokenizer's reconstruction
    (alpha') and auxiliary (beta') losses (see :class:`~torchrec_sid.modules.SoftSidEmbedding`).

    The defaults keep stage 1's weights (12, 10). The paper's 0.5 / 0.5 let the ranking loss collapse one
    expert's tokens onto a single code on MovieLens-100k (utilisation 1 / 64; collisions 31% -> 68%), at
    tau = 0.1 and tau = 1 alike; with 12 / 10 every code stays in use.
    """

    tau: float = 0.1
    recon_weight: float = 12.0
    aux_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"model.soft_sid.tau must be > 0, got {self.tau}")
        for name in ("recon_weight", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.soft_sid.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape; every field is checked before anything is built.

    Args:
        embedding_dim: d, the width of every feature vector.
        item_representation: any non-empty combination of ``id``, ``sid``, ``side``, ``soft_sid`` (summed).
        id_dropout: in training, the probability that an item's id vector is left out of its sum (so the SID
            parts learn to stand for the item alone, as they must for an item the id table has not learnt).
        sid_tokens: the SID token features, when ``sid`` is used.
        soft_sid: the stage-2 settings, when ``soft_sid`` is used.
        content: add the candidate's text embedding (needs the ``text`` signal at construction).
        history_block: ``none``, ``pooling``, ``pma``, ``din``, ``sim`` or ``dmqn``.
        history_options: constructor arguments of the history block (e.g. ``{"top_k": 50}`` for SIM).
        max_history: most recent history events the block sees (the padded length L).
        dense_layers: hidden sizes of the dense arch (its output is ``embedding_dim``).
        over_layers: hidden sizes of the over arch (its output is one logit).
    """

    embedding_dim: int = 32
    item_representation: tuple[str, ...] = ("id",)
    id_dropout: float = 0.0
    sid_tokens: SidTokenConfig = SidTokenConfig()
    soft_sid: SoftSidConfig = SoftSidConfig()
    content: bool = False
    history_block: str = "pooling"
    history_options: dict[str, Any] = field(default_factory=dict)
    max_history: int = 50
    dense_layers: tuple[int, ...] = (64,)
    over_layers: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        reps = tuple(self.item_representation)
        if not reps or set(reps) - set(ITEM_REPRESENTATIONS) or len(set(reps)) != len(reps):
            raise ValueError(f"model.item_representation must be distinct values of {ITEM_REPRESENTATIONS}, "
                             f"got {list(reps)}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"model.id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.id_dropout and "id" not in reps:
            raise ValueError(f"model.id_dropout is {self.id_dropout} but item_representation {list(reps)} has no id")
        if self.history_block not in HISTORY_BLOCKS:
            raise ValueError(f"model.history_block must be one of {HISTORY_BLOCKS}, got {self.history_block!r}")
        for name in ("embedding_dim", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.history_options and self.history_block in ("none", "pooling"):
            raise ValueError(f"model.history_options are given but history_block {self.history_block!r} "
                             f"takes none: {self.history_options}")

    @property
    def needs_semantic_ids(self) -> bool:
        return bool({"sid", "side"} & set(self.item_representation)) or self.history_block == "sim"


def build_history_block(name: str, embedding_dim: int, options: dict[str, Any]) -> HistoryBlock | None:
    """The history block called ``name`` with ``options`` as keyword arguments (None for ``none``)."""
    blocks = {"pooling": MeanPooling, "pma": PMA, "din": DIN, "sim": SIM, "dmqn": DMQN}
    if name == "none":
        return None
    try:
        return blocks[name](embedding_dim=embedding_dim, **options)
    except TypeError as e:
        raise ValueError(f"model.history_options for {name!r}: {e}") from e


class ItemArch(nn.Module):
    """Candidate and history item vectors from id tables, SID token tables and/or SIDE, summed.

    Args:
        config: the model config.
        num_items: I, rows of the id table.
        semantic_ids: the items' SIDs (row i = item i), for ``sid`` and ``side``.
        tokenizer: the stage-1 MMQ tokenizer, for ``soft_sid`` (trained in place).
        signals: the items' content ``{m: [I, D_m]}``, for ``soft_sid``.
        trained_items: ``[I]`` bool, the items whose id rows training updates (None: all). The id vector of
            any other item is zero, as for an id outside the vocabulary: an untrained row is random noise.

    ``forward(features)`` -> ``(candidate [B, d], history values [sum L, d])``, the history in ``features``'
    ``history_item_ids`` layout.
    """

    def __init__(self, config: ModelConfig, num_items: int, semantic_ids: SemanticIds | None,
                 tokenizer: SoftIndexTokenizer | None = None, signals: dict[str, Tensor] | None = None,
                 trained_items: Tensor | None = None) -> None:
        super().__init__()
        reps, d = config.item_representation, config.embedding_dim
        if trained_items is not None and trained_items.shape != (num_items,):
            raise ValueError(f"trained_items must be [{num_items}], got {tuple(trained_items.shape)}")
        self.register_buffer("id_known", torch.ones(num_items, dtype=torch.bool) if trained_items is None
                             else trained_items.bool().clone())
        self.id_dropout = config.id_dropout
        item_features = [ITEM_ID, HISTORY_ITEM_IDS]
        tables: list[EmbeddingConfig] = []
        if "id" in reps:
            tables.append(EmbeddingConfig(name="item_id", embedding_dim=d, num_embeddings=num_items,
                                          feature_names=list(item_features)))
        self.transform: SidFeatureTransform | None = None
        if "sid" in reps:
            tokens = config.sid_tokens
            self.transform = SidFeatureTransform(semantic_ids, item_features, ngram_orders=tokens.ngram_orders,
                                                 prefix_lengths=tokens.prefix_lengths, num_levels=tokens.num_levels,
                                                 max_table_size=tokens.max_table_size)
            tables += self.transform.embedding_configs(d)
        self.candidate_features: list[str] = [f for t in tables for f in t.feature_names if f.startswith(ITEM_ID)]
        self.history_features: list[str] = [f for t in tables for f in t.feature_names
                                             if f.startswith(HISTORY_ITEM_IDS)]
        self.embedding_collection = EmbeddingCollection(tables=tables) if tables else None
        self.side: SIDEmbedding | None = None
        if "side" in reps:
            # the quantizer's own levels: a collision-suffix level only numbers duplicates, it has no order
            levels = semantic_ids.num_levels - int(bool(semantic_ids.config.get("collision_suffix")))
            self.side = SIDEmbedding.from_semantic_ids(semantic_ids, d, num_levels=levels)
            self.register_buffer("item_packed", pack_codes(semantic_ids.codes[:, :levels],
                                                           semantic_ids.cardinalities[:levels]))
        self.soft_sid: SoftSidEmbedding | None = None
        if "soft_sid" in reps:
            soft = config.soft_sid
            self.soft_sid = SoftSidEmbedding(tokenizer, signals, d, soft.tau, soft.recon_weight, soft.aux_weight)
        self.embedding_dim = d

    def forward(self, features: KeyedJaggedTensor) -> tuple[Tensor, Tensor]:
        candidate_ids = features[ITEM_ID].values()
        history_ids = features[HISTORY_ITEM_IDS].values()
        # new_zeros, not torch.zeros(ids.size(0), ...): fx traces it (TrainPipelineSparseDist traces the model)
        candidate = candidate_ids.new_zeros((candidate_ids.size(0), self.embedding_dim), dtype=torch.float32)
        history = history_ids.new_zeros((history_ids.size(0), self.embedding_dim), dtype=torch.float32)
        if self.embedding_collection is not None:
            if self.transform is not None:
                features = self.transform(features)
            embedded = self.embedding_collection(features)
            for name in self.candidate_features:
                rows = embedded[name].values()
                candidate = candidate + (rows * self._id_mask(candidate_ids) if name == ITEM_ID else rows)
            for name in self.history_features:
                rows = embedded[name].values()
                history = history + (rows * self._id_mask(history_ids) if name == HISTORY_ITEM_IDS else rows)
        if self.side is not None:
            candidate = candidate + self.side(self.item_packed[candidate_ids])
            history = history + self.side(self.item_packed[history_ids])
        if self.soft_sid is not None:  # one call, so the tokenizer's regulariser enters the loss once
            both = self.soft_sid(torch.cat([candidate_ids, history_ids]))
            candidate = candidate + both[: candidate_ids.size(0)]
            history = history + both[candidate_ids.size(0):]
        return candidate, history

    def _id_mask(self, ids: Tensor) -> Tensor:
        """``[N, 1]``: 1 where the id vector counts, 0 for untrained ids and (in training) dropped ones."""
        keep = self.id_known[ids]
        if self.training and self.id_dropout > 0:
            keep = keep & (torch.rand(ids.shape, device=ids.device) >= self.id_dropout)
        return keep.unsqueeze(1).to(torch.float32)


class ContentArch(nn.Module):
    """The candidate's frozen text embedding ``[I, Dc]`` (a buffer) through a 2-layer MLP to ``[B, d]``."""

    def __init__(self, content: Tensor, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("content", content.float())
        self.mlp = nn.Sequential(nn.Linear(content.shape[1], embedding_dim), nn.ReLU(),
                                 nn.Linear(embedding_dim, embedding_dim))

    def forward(self, item_ids: Tensor) -> Tensor:
        return self.mlp(self.content[item_ids])


class SidDLRM(nn.Module):
    """DLRM-style CTR model over a :mod:`torchrec_sid.data.batches` batch; see the module docstring for the arches.

    Args:
        config: the model config.
        catalog: the data source's catalogue (feature names and cardinalities).
        semantic_ids: SIDs of the catalogue's items (needed by ``sid``, ``side`` and the SIM block's search keys).
        signals: the items' content ``{m: [I, D_m]}``: ``text`` for ``config.content``, the tokenizer's
            modalities for ``soft_sid``.
        tokenizer: the stage-1 MMQ tokenizer (needed by ``soft_sid``).
        trained_items: ``[I]`` bool, items whose id rows training updates (see :class:`ItemArch`; None: all).

    ``forward(dense_features [B, F], sparse_features KJT) -> logits [B]``.

    Example::

        data = movielens.load().interactions()
        model = SidDLRM(ModelConfig(item_representation=("id", "sid"), history_block="din"), data.catalog, sids)
        batch = next(iter(CtrBatches(data, "train", batch_size=8, max_history=50)))
        model(batch.dense_features, batch.sparse_features)  # [8]
    """

    def __init__(self, config: ModelConfig, catalog: Catalog, semantic_ids: SemanticIds | None = None,
                 signals: dict[str, Tensor] | None = None, tokenizer: SoftIndexTokenizer | None = None,
                 trained_items: Tensor | None = None) -> None:
        super().__init__()
        check_model_inputs(config, catalog, semantic_ids, signals, tokenizer)
        d = config.embedding_dim
        cards = catalog.sparse_cardinalities()
        pooled = [USER_ID, *catalog.user_features, ITEM_GENRES]
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=d, num_embeddings=cards[name], feature_names=[name])
            for name in pooled
        ]))
        self.dense_arch = DenseArch(catalog.num_dense, [*config.dense_layers, d])
        self.item_arch = ItemArch(config, catalog.num_items, semantic_ids, tokenizer, signals, trained_items)
        self.content_arch = ContentArch(signals["text"], d) if config.content else None
        self.history_arch = build_history_block(config.history_block, d, dict(config.history_options))
        self.history_projection = (nn.Linear(self.history_arch.output_dim, d)
                                   if self.history_arch is not None and self.history_arch.output_dim != d else None)
        self.register_buffer("item_keys", torch.from_numpy(_search_keys(catalog, semantic_ids)))
        self.max_history = config.max_history
        num_vectors = len(pooled) + 1 + int(self.content_arch is not None) + int(self.history_arch is not None)
        self.interaction_arch = InteractionArch(num_sparse_features=num_vectors)
        self.over_arch = OverArch(d + num_vectors * (num_vectors + 1) // 2, [*config.over_layers, 1])

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        candidate, history_values = self.item_arch(sparse_features)
        vectors = [self.sparse_arch(sparse_features), candidate.unsqueeze(1)]
        if self.content_arch is not None:
            vectors.append(self.content_arch(sparse_features[ITEM_ID].values()).unsqueeze(1))
        if self.history_arch is not None:
            vectors.append(self._history(sparse_features, candidate, history_values).unsqueeze(1))
        interactions = self.interaction_arch(self.dense_arch(dense_features), torch.cat(vectors, dim=1))
        return self.over_arch(interactions).squeeze(-1)

    def _history(self, features: KeyedJaggedTensor, candidate: Tensor, history_values: Tensor) -> Tensor:
        ids = features[HISTORY_ITEM_IDS]
        lengths = ids.lengths()
        history, mask = jagged_to_padded(JaggedTensor(values=history_values, lengths=lengths), self.max_history)
        # event ages in seconds before the request (float32 keeps them exact to a few seconds) and SIM search keys
        request = torch.repeat_interleave(features[TIMESTAMP].values(), lengths)
        ages, _ = jagged_to_padded(
            JaggedTensor(values=(features[HISTORY_TIMESTAMPS].values() - request).float(), lengths=lengths),
            self.max_history)
        keys, _ = jagged_to_padded(JaggedTensor(values=self.item_keys[ids.values()].float(), lengths=lengths),
                                   self.max_history)
        out = self.history_arch(history, mask, candidate, history_timestamps=ages, history_keys=keys.long(),
                                candidate_key=self.item_keys[features[ITEM_ID].values()])
        return out if self.history_projection is None else self.history_projection(out)


def _search_keys(catalog: Catalog, semantic_ids: SemanticIds | None) -> np.ndarray:
    """Per-item key for SIM's hard search ``[I]``: the first SID level when SIDs are given, else the first genre."""
    if semantic_ids is not None:
        return semantic_ids.codes[:, 0].numpy().astype(np.int64)
    genres = np.asarray(catalog.item_genres)
    return np.where(genres.any(1), genres.argmax(1), len(catalog.genre_names)).astype(np.int64)


def check_model_inputs(config: ModelConfig, catalog: Catalog, semantic_ids: SemanticIds | None,
                       signals: dict[str, Tensor] | None, tokenizer: SoftIndexTokenizer | None) -> None:
    """Raises ValueError, naming the field, when the config and the artifacts given do not fit together."""
    if config.needs_semantic_ids and semantic_ids is None:
        raise ValueError(f"model.item_representation {list(config.item_representation)} / history_block "
                         f"{config.history_block!r} needs semantic IDs (train.semantic_ids)")
    if semantic_ids is not None and semantic_ids.num_items != catalog.num_items:
        raise ValueError(f"train.semantic_ids has {semantic_ids.num_items} items, the data has {catalog.num_items}")
    needed = {"text"} if config.content else set()
    if "soft_sid" in config.item_representation:
        if tokenizer is None:
            raise ValueError("model.item_representation has soft_sid, which needs an MMQ tokenizer (train.tokenizer)")
        needed |= set(tokenizer.dims)
    missing = sorted(needed - set(signals or {}))
    if missing:
        raise ValueError(f"model.content / soft_sid need the content signal(s) {missing}; given "
                         f"{sorted(signals or {})}")
    for m in needed:
        x = signals[m]
        if x.ndim != 2 or x.shape[0] != catalog.num_items:
            raise ValueError(f"content signal {m!r} must be [{catalog.num_items}, D], got {tuple(x.shape)}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters in embedding tables and elsewhere (dense), of an unsharded model."""
    tables = sum(p.numel() for n, p in model.named_parameters()
                 if "embedding_collection" in n or "embedding_bag_collection" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": tables, "dense": total - tables, "total": total}

