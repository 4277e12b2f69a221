"""One batch type for the whole library, and the tables every data source fills to build it.

Every source (MovieLens-100k, the synthetic generator) produces an :class:`InteractionData`: a catalogue of users
and items with side features, per-user chronological histories in CSR form, and CTR samples that point into
those histories. :class:`CtrBatches` turns a sample set into TorchRec ``Batch`` objects (dense features, a
``KeyedJaggedTensor`` of sparse features, labels), vectorised over the batch with no per-example Python loop.

Sparse features of a batch (``B`` examples), in this key order:

==================== ===================== ====================================================
key                  values per example    meaning
==================== ===================== ====================================================
``user_id``          1                     user index in ``[0, num_users)``
``<user feature>``   1                     one per entry of ``Catalog.user_features``
``item_id``          1                     candidate item index in ``[0, num_items)``
``item_genres``      0..G                  genre (category) ids of the candidate
``history_item_ids`` 0..max_history        the user's items strictly before the event, oldest first
``history_timestamps`` same as above       their unix timestamps (seconds)
``timestamp``        1                     the event's unix timestamp (seconds)
==================== ===================== ====================================================

With ``sid_codes`` (the SIDs-as-features path) the batch also carries, for ``item_id`` and ``history_item_ids``,
each item's SID code per level: ``<feature>__code<l>`` with the feature's lengths (``-1`` for an item the SID table
does not hold), looked up from a :class:`~torchrec_sid.sid.versions.SidTable` or the newest version of a
:class:`~torchrec_sid.sid.versions.SidStore` at every batch, so items published after the model was built get their
SIDs in the next batch (:class:`~torchrec_sid.modules.sid_codes.SidCodeTransform` reads them).

Sparse values are int64 by default; ``CtrBatches(index_dtype=torch.int32)`` emits int32 values (lengths are always
int32) when the catalogue and the timestamps fit int32, which TorchRec's EBC / EC, fbgemm's TBE and
:class:`~torchrec_sid.modules.SidFeatureTransform` take as they are: half the bytes per id and per SID token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.sid.features import CodeSource, code_feature_names

USER_ID = "user_id"
ITEM_ID = "item_id"
ITEM_GENRES = "item_genres"
HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_TIMESTAMPS = "history_timestamps"
TIMESTAMP = "timestamp"
CODE_SOURCES = (ITEM_ID, HISTORY_ITEM_IDS)  # the item features whose SID codes a batch carries with ``sid_codes``

Column = tuple[str, np.ndarray, np.ndarray]  # (key, values [n], lengths [B]) of one KJT feature
INDEX_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}  # sparse value dtypes a batch can carry
INT32 = np.iinfo(np.int32)


def code_columns(columns: list[Column], sid_codes: CodeSource, sources: tuple[str, ...] = CODE_SOURCES,
                 num_levels: int | None = None) -> list[Column]:
    """The code features ``<f>__code<l>`` of each item feature ``f`` of ``sources`` among ``columns``: the items'
    codes (first ``num_levels`` levels, None: all) from ``sid_codes``, with ``f``'s lengths."""
    levels = sid_codes.num_levels if num_levels is None else num_levels
    by_name = {name: (values, lengths) for name, values, lengths in columns}
    out: list[Column] = []
    for feature in sources:
        if feature not in by_name:
            raise ValueError(f"sid_codes: the batch has no item feature {feature!r} (its features: {sorted(by_name)})")
        values, lengths = by_name[feature]
        codes = sid_codes.codes_of(values).numpy()
        out += [(name, codes[:, level], lengths) for level, name in enumerate(code_feature_names(feature, levels))]
    return out


def check_int32_range(feature: str, low: int, high: int) -> None:
    """Raises ValueError naming ``feature`` when its values ``[low, high]`` do not fit int32."""
    if low < INT32.min or high > INT32.max:
        raise ValueError(f"index_dtype=torch.int32: feature {feature!r} has values in [{low}, {high}], outside "
                         f"int32 [{INT32.min}, {INT32.max}]; use index_dtype=torch.int64")


def columns_to_kjt(columns: list[Column], index_dtype: torch.dtype = torch.int64) -> KeyedJaggedTensor:
    """One KJT of ``columns`` in order (values of ``index_dtype``, int64 or int32: every column checked to fit;
    int32 lengths)."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    if index_dtype == torch.int32:
        for key, values, _ in columns:
            if len(values):
                check_int32_range(key, int(values.min()), int(values.max()))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[k for k, _, _ in columns],
        values=torch.from_numpy(np.concatenate([v for _, v, _ in columns]).astype(INDEX_DTYPES[index_dtype])),
        lengths=torch.from_numpy(np.concatenate([ln for _, _, ln in columns]).astype(np.int32)),
    )


def check_catalog_fits_int32(data: InteractionData, samples: Samples) -> None:
    """Raises ValueError naming the feature whose ids (``[0, cardinality)``) or timestamps (of ``data``'s histories
    and of ``samples``) do not fit int32."""
    for feature, cardinality in data.catalog.sparse_cardinalities().items():
        check_int32_range(feature, 0, cardinality - 1)
    for feature, stamps in ((HISTORY_TIMESTAMPS, data.histories.timestamps), (TIMESTAMP, samples.timestamps)):
        if len(stamps):
            check_int32_range(feature, int(stamps.min()), int(stamps.max()))


@dataclass(frozen=True)
class Catalog:
    """Users, items and their side features, all indexed from 0.

    Args:
        num_users: U.
        num_items: I.
        user_features: categorical user features, name -> ids ``[U]`` (int64, ``0..cardinality-1``).
        user_feature_cardinalities: name -> number of distinct values.
        item_genres: multi-hot categories ``[I, G]`` (bool); the categorical content modality.
        genre_names: G names.
        dense_user: dense user features ``[U, Fu]`` (float32, standardised).
        dense_item: dense item features ``[I, Fi]`` (float32, standardised).
        item_titles: I display names.
    """

    num_users: int
    num_items: int
    user_features: dict[str, np.ndarray]
    user_feature_cardinalities: dict[str, int]
    item_genres: np.ndarray
    genre_names: list[str]
    dense_user: np.ndarray
    dense_item: np.ndarray
    item_titles: list[str]

    @property
    def num_dense(self) -> int:
        """Dense features per example: user, item, and log history length."""
        return self.dense_user.shape[1] + self.dense_item.shape[1] + 1

    def sparse_cardinalities(self) -> dict[str, int]:
        """Ids each id-valued sparse feature can take (for ``EmbeddingBagConfig.num_embeddings``)."""
        return {
            USER_ID: self.num_users,
            **self.user_feature_cardinalities,
            ITEM_ID: self.num_items,
            ITEM_GENRES: len(self.genre_names),
            HISTORY_ITEM_IDS: self.num_items,
        }


@dataclass(frozen=True)
class Histories:
    """Per-user chronological event sequences in CSR form.

    User ``u``'s events are ``items[offsets[u]:offsets[u + 1]]``, oldest first.

    Args:
        offsets: ``[U + 1]`` int64.
        items: ``[E]`` int64 item indices.
        timestamps: ``[E]`` int64 unix seconds, non-decreasing within each user.
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    def lengths(self) -> np.ndarray:
        """Events per user ``[U]``."""
        return np.diff(self.offsets)

    @staticmethod
    def from_events(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_users: int) -> Histories:
        """Builds histories from unordered events ``[E]`` (stable order for equal timestamps)."""
        order = np.lexsort((timestamps, users))
        counts = np.bincount(users, minlength=num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Histories(offsets, items[order].astype(np.int64), timestamps[order].astype(np.int64))

    def count_before(self, users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Number of events of ``users[s]`` strictly before ``timestamps[s]``, ``[S]``: no leakage of the event
        itself or anything at the same second."""
        num_users = len(self.offsets) - 1
        owner = np.repeat(np.arange(num_users, dtype=np.int64), self.lengths())
        keys = (owner << 32) + self.timestamps  # sorted: by user, then by time
        queries = (users.astype(np.int64) << 32) + timestamps.astype(np.int64)
        return np.searchsorted(keys, queries, side="left") - self.offsets[users]


@dataclass(frozen=True)
class Samples:
    """CTR samples; sample ``s``'s history is the first ``history_lengths[s]`` events of user ``users[s]``.

    All arrays are ``[S]``.
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray
    history_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, mask_or_index: np.ndarray) -> Samples:
        """Samples selected by a boolean mask or an index array."""
        return Samples(*(a[mask_or_index] for a in (self.users, self.items, self.labels, self.timestamps,
                                                     self.history_lengths)))

    def positive_rate(self) -> float:
        return float(self.labels.mean()) if len(self) else float("nan")


@dataclass(frozen=True)
class InteractionData:
    """What every data source produces: a catalogue, histories and named sample sets.

    ``splits`` holds ``train``, ``valid``, ``test`` (a temporal split over warm items) and ``cold`` (events on
    items held out of training entirely). ``histories`` never contains a cold item, so a model trained on
    ``train`` has not seen a cold item's id anywhere.
    """

    name: str
    catalog: Catalog
    histories: Histories
    splits: dict[str, Samples]
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def trained_items(self, max_history: int | None = None) -> np.ndarray:
        """``[I]`` bool: items whose id a model trained on ``train`` looks up, as candidate or as one of the
        ``max_history`` most recent history events of a training sample (None: all events)."""
        s, hist = self.splits["train"], self.histories
        lengths = s.history_lengths if max_history is None else np.minimum(s.history_lengths, max_history)
        seen = np.zeros(self.catalog.num_items, dtype=bool)
        seen[s.items] = True
        seen[hist.items[_ranges(hist.offsets[s.users] + s.history_lengths - lengths, lengths)]] = True
        return seen

    def with_long_tail(self, fraction: float = 0.25) -> InteractionData:
        """A copy with a ``tail`` split: the ``test`` samples of the least popular items, those whose number of
        training samples is at most the ``fraction`` quantile of that number over the distinct test items."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        test = self.splits["test"]
        counts = np.bincount(self.splits["train"].items, minlength=self.catalog.num_items)
        threshold = np.quantile(counts[np.unique(test.items)], fraction) if len(test) else 0
        return dataclasses.replace(self, splits={**self.splits, "tail": test.subset(counts[test.items] <= threshold)})

    def summary(self) -> str:
        c = self.catalog
        lines = [
            f"{self.name}: {c.num_users:,} users, {c.num_items:,} items, {len(self.histories.items):,} history "
            f"events, {len(self.cold_items):,} cold items",
        ]
        for name, s in self.splits.items():
            lines.append(f"  {name:<6} {len(s):>9,} samples  positive rate {s.positive_rate():.3f}  "
                         f"mean history {s.history_lengths.mean() if len(s) else 0:.1f}")
        return "\n".join(lines)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over i, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - seg_start)


class CtrBatches(torch.utils.data.IterableDataset):
    """Iterates a sample set as TorchRec ``Batch`` objects; use with ``DataLoader(batches, batch_size=None)``.

    Args:
        data: the source's tables.
        split: which sample set of ``data.splits`` to iterate.
        batch_size: examples per batch (B).
        max_history: keep the most recent ``max_history`` history events (None: all).
        shuffle: reshuffle every epoch with ``seed + epoch``; otherwise chronological order.
        seed: base seed of the shuffle.
        rank, world_size: this process takes every ``world_size``-th batch starting at ``rank``; all ranks see
            the same number of batches (the ragged tail is dropped when ``world_size > 1``).
        drop_last: drop a final batch smaller than ``batch_size``.
        sid_codes: add the SID code features of the candidate and history items (module docstring), looked up at
            every batch (a :class:`~torchrec_sid.sid.versions.SidStore` serves its newest version).
        code_levels: code levels carried (None: all of the source's).
        index_dtype: dtype of the sparse values: ``torch.int64``, or ``torch.int32`` (half the bytes, taken as they
            are by TorchRec's EBC / EC and :class:`~torchrec_sid.modules.SidFeatureTransform`), checked here to fit
            the catalogue's ids and the timestamps, and every batch's values.

    Example::

        data = movielens.load().interactions()
        for batch in CtrBatches(data, "train", batch_size=4):
            batch.sparse_features["history_item_ids"].lengths()  # [4]
            batch.dense_features.shape                            # [4, data.catalog.num_dense]
    """

    def __init__(
        self,
        data: InteractionData,
        split: str,
        batch_size: int,
        max_history: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        sid_codes: CodeSource | None = None,
        code_levels: int | None = None,
        index_dtype: torch.dtype = torch.int64,
    ) -> None:
        super().__init__()
        if split not in data.splits:
            raise ValueError(f"split {split!r} is not one of {sorted(data.splits)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_history is not None and max_history < 0:
            raise ValueError(f"max_history must be >= 0 or None, got {max_history}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
        if index_dtype == torch.int32:
            check_catalog_fits_int32(data, data.splits[split])
        self.data = data
        self.samples = data.splits[split]
        self.batch_size = batch_size
        self.max_history = max_history
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last or world_size > 1
        self.sid_codes = sid_codes
        self.code_levels = code_levels
        self.index_dtype = index_dtype
        self.epoch = 0
        self.start_batch = 0
        self._genre_offsets, self._genre_values = self._genres_csr(data.catalog.item_genres)

    @staticmethod
    def _genres_csr(multi_hot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.nonzero(multi_hot)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(multi_hot)))])
        return offsets.astype(np.int64), cols.astype(np.int64)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the shuffle order of the next iteration, and the batch it starts at (to resume mid-epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        n = len(self.samples)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return batches // self.world_size

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.samples)
        order = np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)
        for b in range(self.start_batch, len(self)):
            start = (b * self.world_size + self.rank) * self.batch_size
            yield self.build(order[start:start + self.batch_size])

    def build(self, index: np.ndarray) -> Batch:
        """The batch of samples ``index`` (``[B]`` positions in the sample set)."""
        s = self.samples.subset(index)
        cat, hist = self.data.catalog, self.data.histories
        hist_len = s.history_lengths
        if self.max_history is not None:
            hist_len = np.minimum(hist_len, self.max_history)
        hist_pos = _ranges(hist.offsets[s.users] + s.history_lengths - hist_len, hist_len)
        genre_len = self._genre_offsets[s.items + 1] - self._genre_offsets[s.items]
        genre_pos = _ranges(self._genre_offsets[s.items], genre_len)
        ones = np.ones(len(s), dtype=np.int64)

        features: list[Column] = [(USER_ID, s.users, ones)]
        features += [(name, ids[s.users], ones) for name, ids in cat.user_features.items()]
        features += [
            (ITEM_ID, s.items, ones),
            (ITEM_GENRES, self._genre_values[genre_pos], genre_len),
            (HISTORY_ITEM_IDS, hist.items[hist_pos], hist_len),
            (HISTORY_TIMESTAMPS, hist.timestamps[hist_pos], hist_len),
            (TIMESTAMP, s.timestamps, ones),
        ]
        if self.sid_codes is not None:
            features += code_columns(features, self.sid_codes, num_levels=self.code_levels)
        sparse = columns_to_kjt(features, self.index_dtype)
        dense = np.concatenate(
            [cat.dense_user[s.users], cat.dense_item[s.items], np.log1p(hist_len)[:, None] / 5.0], axis=1
        )
        return Batch(
            dense_features=torch.from_numpy(dense.astype(np.float32)),
            sparse_features=sparse,
            labels=torch.from_numpy(s.labels.astype(np.float32)),
        )
