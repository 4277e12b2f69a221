"""A DLRM-style ranking model whose item representation and user-history block are chosen by config.

Arches, as in ``torchrec.models.dlrm`` (whose ``SparseArch``, ``DenseArch``, ``InteractionArch`` and ``OverArch``
are reused):

* ``sparse_arch``: pooled user features and the candidate's genres through an ``EmbeddingBagCollection``.
* ``dense_arch``: the dense features through an MLP to ``d``.
* ``item_arch``: one ``d``-vector per item, for the candidate and for every history event, as the sum of the
  configured representations: ``id`` (an item-id table), ``sid`` (SID token / n-gram tables fed by a
  :class:`~torchrec_sid.modules.SidFeatureTransform`) and ``side`` (table-free
  :class:`~torchrec_sid.modules.SIDEmbedding`). The id and SID tables live in one ``EmbeddingCollection`` that
  DistributedModelParallel shards; candidate and history share their rows.
* ``content_arch`` (optional): the candidate's content embedding through a 2-layer MLP.
* ``history_arch``: a :class:`~torchrec_sid.modules.HistoryBlock` (pooling, PMA, DIN, SIM, DMQN) over the padded
  history, with the candidate as target.
* ``interaction_arch`` + ``over_arch``: pairwise dot products of all ``d``-vectors, then an MLP to one logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import numpy as np
import torch
from torch import Tensor, nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_sid.data.batches import (
    HISTORY_ITEM_IDS, HISTORY_TIMESTAMPS, ITEM_GENRES, ITEM_ID, TIMESTAMP, USER_ID, Catalog,
)
from torchrec_sid.modules import DIN, DMQN, PMA, SIM, HistoryBlock, MeanPooling, SIDEmbedding, SidFeatureTransform
from torchrec_sid.modules.sequence import jagged_to_padded
from torchrec_sid.quantizers.base import SemanticIds
from torchrec_sid.sid.packing import pack_codes

ITEM_REPRESENTATIONS = ("id", "sid", "side")
HISTORY_BLOCKS = ("none", "pooling", "pma", "din", "sim", "dmqn")


@dataclass(frozen=True)
class SidTokenConfig:
    """Which SID tokens ``item_arch`` looks up (see :class:`~torchrec_sid.modules.SidFeatureTransform`)."""

    ngram_orders: tuple[int, ...] = (1,)
    prefix_lengths: tuple[int, ...] = ()
    num_levels: int | None = None
    max_table_size: int = 2**20


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape; every field is checked before anything is built.

    Args:
        embedding_dim: d, the width of every feature vector.
        item_representation: any non-empty combination of ``id``, ``sid``, ``side`` (summed).
        sid_tokens: the SID token features, when ``sid`` is used.
        content: add the candidate's content embedding (needs ``content`` at construction).
        history_block: ``none``, ``pooling``, ``pma``, ``din``, ``sim`` or ``dmqn``.
        history_options: constructor arguments of the history block (e.g. ``{"top_k": 50}`` for SIM).
        max_history: most recent history events the block sees (the padded length L).
        dense_layers: hidden sizes of the dense arch (its output is ``embedding_dim``).
        over_layers: hidden sizes of the over arch (its output is one logit).
    """

    embedding_dim: int = 32
    item_representation: tuple[str, ...] = ("id",)
    sid_tokens: SidTokenConfig = SidTokenConfig()
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

    ``forward(features)`` -> ``(candidate [B, d], history values [sum L, d])``, the history in ``features``'
    ``history_item_ids`` layout.
    """

    def __init__(self, config: ModelConfig, num_items: int, semantic_ids: SemanticIds | None) -> None:
        super().__init__()
        reps, d = config.item_representation, config.embedding_dim
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
        self.candidate_features: List[str] = [f for t in tables for f in t.feature_names if f.startswith(ITEM_ID)]
        self.history_features: List[str] = [f for t in tables for f in t.feature_names
                                             if f.startswith(HISTORY_ITEM_IDS)]
        self.embedding_collection = EmbeddingCollection(tables=tables) if tables else None
        self.side: SIDEmbedding | None = None
        if "side" in reps:
            # the quantizer's own levels: a collision-suffix level only numbers duplicates, it has no order
            levels = semantic_ids.num_levels - int(bool(semantic_ids.config.get("collision_suffix")))
            self.side = SIDEmbedding.from_semantic_ids(semantic_ids, d, num_levels=levels)
            self.register_buffer("item_packed", pack_codes(semantic_ids.codes[:, :levels],
                                                           semantic_ids.cardinalities[:levels]))
        self.embedding_dim = d

    def forward(self, features: KeyedJaggedTensor) -> tuple[Tensor, Tensor]:
        candidate_ids = features[ITEM_ID].values()
        history_ids = features[HISTORY_ITEM_IDS].values()
        candidate = torch.zeros(candidate_ids.size(0), self.embedding_dim, device=candidate_ids.device)
        history = torch.zeros(history_ids.size(0), self.embedding_dim, device=history_ids.device)
        if self.embedding_collection is not None:
            if self.transform is not None:
                features = self.transform(features)
            embedded = self.embedding_collection(features)
            for name in self.candidate_features:
                candidate = candidate + embedded[name].values()
            for name in self.history_features:
                history = history + embedded[name].values()
        if self.side is not None:
            candidate = candidate + self.side(self.item_packed[candidate_ids])
            history = history + self.side(self.item_packed[history_ids])
        return candidate, history


class ContentArch(nn.Module):
    """The candidate's frozen content embedding ``[I, Dc]`` (a buffer) through a 2-layer MLP to ``[B, d]``."""

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
        content: content embeddings ``[I, Dc]`` (needed when ``config.content``).

    ``forward(dense_features [B, F], sparse_features KJT) -> logits [B]``.

    Example::

        data = movielens.load().interactions()
        model = SidDLRM(ModelConfig(item_representation=("id", "sid"), history_block="din"), data.catalog, sids)
        batch = next(iter(CtrBatches(data, "train", batch_size=8, max_history=50)))
        model(batch.dense_features, batch.sparse_features)  # [8]
    """

    def __init__(self, config: ModelConfig, catalog: Catalog, semantic_ids: SemanticIds | None = None,
                 content: Tensor | None = None) -> None:
        super().__init__()
        check_model_inputs(config, catalog, semantic_ids, content)
        d = config.embedding_dim
        cards = catalog.sparse_cardinalities()
        pooled = [USER_ID, *catalog.user_features, ITEM_GENRES]
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=d, num_embeddings=cards[name], feature_names=[name])
            for name in pooled
        ]))
        self.dense_arch = DenseArch(catalog.num_dense, [*config.dense_layers, d])
        self.item_arch = ItemArch(config, catalog.num_items, semantic_ids)
        self.content_arch = ContentArch(content, d) if config.content else None
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
                       content: Tensor | None) -> None:
    """Raises ValueError, naming the field, when the config and the artifacts given do not fit together."""
    if config.needs_semantic_ids and semantic_ids is None:
        raise ValueError(f"model.item_representation {list(config.item_representation)} / history_block "
                         f"{config.history_block!r} needs semantic IDs (train.semantic_ids)")
    if semantic_ids is not None and semantic_ids.num_items != catalog.num_items:
        raise ValueError(f"train.semantic_ids has {semantic_ids.num_items} items, the data has {catalog.num_items}")
    if config.content:
        if content is None:
            raise ValueError("model.content is true but no content embeddings were given")
        if content.ndim != 2 or content.shape[0] != catalog.num_items:
            raise ValueError(f"content embeddings must be [{catalog.num_items}, Dc], got {tuple(content.shape)}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters in embedding tables and elsewhere (dense), of an unsharded model."""
    tables = sum(p.numel() for n, p in model.named_parameters()
                 if "embedding_collection" in n or "embedding_bag_collection" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": tables, "dense": total - tables, "total": total}

