"""The settings of :meth:`SidDLRM.from_config <torchrec_sid.models.dlrm.SidDLRM.from_config>`: the model's shape
(:class:`ModelConfig`, one YAML ``model:`` section) and the KJT it reads (:class:`FeatureSchema`).

Nothing here knows a data source: a :class:`FeatureSchema` names any team's features (the demo's is
:func:`torchrec_sid.models.factory.catalog_schema`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ITEM_REPRESENTATIONS = ("id", "sid", "side", "soft_sid")
HISTORY_BLOCKS = ("none", "pooling", "pma", "din", "sim", "dmqn")
HISTORY_PADDINGS = ("batch", "max")


@dataclass(frozen=True)
class SidTokenConfig:
    """Which SID tokens ``item_arch`` looks up (see :class:`~torchrec_sid.modules.SidFeatureTransform`);
    ``unknown_ids``: ``raise``, or ``oov`` (an item the SID table does not hold gets each table's reserved last row).
    ``row_budget``: rows of all the token tables together (the equal-memory setting): a table whose vocabulary fits
    keeps it exactly, the larger ones share the rest equally, each hashed into its share (this sets the largest table
    size, ``max_table_size`` is then unused). None: every table holds up to ``max_table_size`` rows.
    ``spm_vocab_size``: one more token table, SentencePiece pieces of the SIDs (Singh et al.'s SPM-SID,
    :func:`~torchrec_sid.sid.pieces.fit_sid_sentencepiece`, fitted on the items' first ``num_levels`` levels when the
    model is built, seeded): a variable number of pieces per item, summed into its vector. It asks SentencePiece for
    this many pieces (at least the distinct (level, code) symbols + 1, checked at the fit); the table has the pieces
    SentencePiece returns (+ the OOV row), counted in ``row_budget`` before the other tables share the rest. None:
    no pieces. ``spm_model_type``: ``bpe`` (default) or ``unigram``; on 200,000 near-uniform 3 x 256 SIDs the
    unigram trainer stops at the 768 single codes + 1 whatever ``spm_vocab_size`` asks, BPE fills it.
    ``spm_seed``: the seed of the SentencePiece corpus order.
    """

    ngram_orders: tuple[int, ...] = (1,)
    prefix_lengths: tuple[int, ...] = ()
    num_levels: int | None = None
    max_table_size: int = 2**20
    unknown_ids: str = "raise"
    row_budget: int | None = None
    spm_vocab_size: int | None = None
    spm_model_type: Literal["unigram", "bpe"] = "bpe"
    spm_seed: int = 0

    def __post_init__(self) -> None:
        if self.spm_vocab_size is not None and self.spm_vocab_size < 2:
            raise ValueError(f"model.sid_tokens.spm_vocab_size must be >= 2 (the SIDs' symbols + SentencePiece's "
                             f"unknown piece) or None, got {self.spm_vocab_size}")
        if self.spm_model_type not in ("unigram", "bpe"):
            raise ValueError(f"model.sid_tokens.spm_model_type must be 'unigram' or 'bpe', got "
                             f"{self.spm_model_type!r}")
        if (self.spm_vocab_size is not None and self.row_budget is not None
                and self.spm_vocab_size >= self.row_budget):
            raise ValueError(f"model.sid_tokens.spm_vocab_size {self.spm_vocab_size} leaves no row of row_budget "
                             f"{self.row_budget} for the other SID token tables")


@dataclass(frozen=True)
class SoftSidConfig:
    """MMQ stage 2 (``soft_sid``): soft-index temperature and the weights of the tokenizer's reconstruction
    (alpha') and auxiliary (beta') losses (see :class:`~torchrec_sid.modules.SoftSidEmbedding`).

    The defaults keep stage 1's weights (12, 10, vq 1). The paper's setting is recon 0.5, aux 0.5, vq 0
    (:data:`~torchrec_sid.modules.soft_sid.PAPER_STAGE2_WEIGHTS`): on MovieLens-100k (one seed) it let the ranking
    loss collapse one expert's tokens onto a single code (utilisation 1 / 64; collisions 31% -> 68%), at tau = 0.1
    and tau = 1 alike, for a valid AUC of 0.6892 against 0.6854 with 12 / 10, where every code stays in use.
    """

    tau: float = 0.1
    recon_weight: float = 12.0
    aux_weight: float = 10.0
    vq_weight: float = 1.0

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
        pad_history: ``batch`` pads each batch's histories to its longest one (at most ``max_history``), so a
            batch of short histories costs what they hold; ``max`` pads every batch to ``max_history`` (fixed
            shapes). Same outputs either way (DMQN's training noise aside: it is drawn per padded position); fx
            tracing, torch.export and torch.compile always pad to ``max_history`` (see
            :class:`~torchrec_sid.models.dlrm.HistoryArch`).
        dense_layers: hidden sizes of the dense arch (its output is ``embedding_dim``).
        over_layers: hidden sizes of the over arch (its output is one logit).
        sid_features: SIDs as input features: the batch carries each item's SID codes (``<feature>__code<l>``,
            :func:`~torchrec_sid.sid.features.code_feature_names`) and ``sid`` / ``side`` / SIM read them, so the model
            holds no per-item SID table (memory per rank flat in the catalogue size; new items need no rebuild).
            False: the model looks SIDs up by item id in replicated per-item buffers (small catalogues).
        id_buckets: the id table has this many rows and each item id is hashed into one (a fixed hash: the
            equal-memory baseline of SID tokens); None: one row per item. With ``sid``, the hashed id is one more
            token table of the SID transform (table ``sid_l<levels>``, after the per-level ones): sliding n-grams
            would join it to the last SID code, so ``sid_tokens.ngram_orders`` must be ``[1]`` (prefixes are fine),
            and ``sid_tokens.row_budget``, when set, holds the id table too (it gets at most an equal share). Not
            with ``id_dropout`` nor ``sid_features``; untrained items are not zeroed (their bucket is shared).
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
    pad_history: str = "batch"
    dense_layers: tuple[int, ...] = (64,)
    over_layers: tuple[int, ...] = (128, 64)
    sid_features: bool = False
    id_buckets: int | None = None

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
        if self.pad_history not in HISTORY_PADDINGS:
            raise ValueError(f"model.pad_history must be one of {HISTORY_PADDINGS}, got {self.pad_history!r}")
        for name in ("embedding_dim", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dense_layers", "over_layers"):
            sizes = getattr(self, name)
            if isinstance(sizes, (str, bytes)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
                raise ValueError(f"model.{name} must be a list of layer sizes >= 1, got {list(sizes)}")
        if self.sid_tokens.unknown_ids not in ("raise", "oov"):
            raise ValueError(f"model.sid_tokens.unknown_ids must be 'raise' or 'oov', got "
                             f"{self.sid_tokens.unknown_ids!r}")
        self._check_row_budgets(reps)
        if self.history_options and self.history_block in ("none", "pooling"):
            raise ValueError(f"model.history_options are given but history_block {self.history_block!r} "
                             f"takes none: {self.history_options}")

    def _check_row_budgets(self, reps: tuple[str, ...]) -> None:
        """``id_buckets`` and ``sid_tokens.row_budget``, the equal-memory settings."""
        if self.id_buckets is not None and (self.id_buckets < 1 or "id" not in reps or self.id_dropout):
            raise ValueError(f"model.id_buckets ({self.id_buckets}) hashes the id table: it must be >= 1, with id "
                             f"in item_representation {list(reps)} and without id_dropout ({self.id_dropout})")
        if self.id_buckets is not None and "sid" in reps:
            if tuple(self.sid_tokens.ngram_orders) != (1,):
                raise ValueError(f"model.id_buckets ({self.id_buckets}) with sid makes the hashed id one more SID "
                                 f"token level, which sliding n-grams would join to the last SID code: "
                                 f"sid_tokens.ngram_orders must be [1], got {list(self.sid_tokens.ngram_orders)}")
            if self.sid_features:
                raise ValueError(f"model.id_buckets ({self.id_buckets}) with sid needs the per-item SID lookup: "
                                 f"not with sid_features (the batch's code features carry no hashed id)")
        if self.sid_tokens.row_budget is not None and self.sid_tokens.row_budget < 1:
            raise ValueError(f"model.sid_tokens.row_budget must be >= 1, got {self.sid_tokens.row_budget}")

    @property
    def needs_semantic_ids(self) -> bool:
        return bool({"sid", "side"} & set(self.item_representation)) or self.history_block == "sim"


@dataclass(frozen=True)
class FeatureSchema:
    """The features a :meth:`~torchrec_sid.models.dlrm.SidDLRM.from_config` model reads, by name and size.

    Args:
        pooled_features: KJT feature -> number of ids; each gets its own sum-pooled table in the model's
            ``EmbeddingBagCollection`` (user id, user attributes, the candidate's categories, ...).
        dense_in_features: F, the width of ``dense_features``.
        num_items: I; item ids are in ``[0, I)``.
        item_feature: the candidate's item id, exactly one value per example.
        history_feature: the user's history item ids, oldest first (jagged, possibly empty).
        history_timestamp_feature: the history events' times (same lengths as ``history_feature``), with
            ``timestamp_feature``, the request's time (one per example): the history blocks get event ages. Both or
            neither.
    """

    pooled_features: Mapping[str, int]
    dense_in_features: int
    num_items: int
    item_feature: str
    history_feature: str
    history_timestamp_feature: str | None = None
    timestamp_feature: str | None = None

    def __post_init__(self) -> None:
        if not self.pooled_features:
            raise ValueError("FeatureSchema: pooled_features is empty; the model needs at least one pooled feature")
        small = {name: n for name, n in self.pooled_features.items() if n < 1}
        if small:
            raise ValueError(f"FeatureSchema: pooled feature sizes must be >= 1, got {small}")
        for name in ("dense_in_features", "num_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureSchema: {name} must be >= 1, got {getattr(self, name)}")
        if (self.history_timestamp_feature is None) != (self.timestamp_feature is None):
            raise ValueError("FeatureSchema: give history_timestamp_feature and timestamp_feature together, got "
                             f"{self.history_timestamp_feature!r} and {self.timestamp_feature!r}")
        clash = {self.item_feature, self.history_feature} & set(self.pooled_features)
        if clash or self.item_feature == self.history_feature:
            raise ValueError(f"FeatureSchema: item_feature {self.item_feature!r} and history_feature "
                             f"{self.history_feature!r} must be distinct and not pooled features")
