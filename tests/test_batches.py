from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_sid.data import movielens
from torchrec_sid.data.batches import (
    HISTORY_ITEM_IDS,
    HISTORY_TIMESTAMPS,
    ITEM_GENRES,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    CtrBatches,
    Histories,
    columns_to_kjt,
)


@pytest.fixture
def data(ml100k_folder: Path):
    return movielens.load(ml100k_folder).interactions(valid_frac=0.2, test_frac=0.2, cold_frac=0.0)


def test_batch_features_match_the_tables(data) -> None:
    batches = CtrBatches(data, "train", batch_size=5)
    batch = next(iter(batches))
    kjt = batch.sparse_features
    s = data.splits["train"].subset(np.arange(5))
    assert kjt.keys()[:2] == [USER_ID, "user_gender"] and kjt.keys()[-3:] == [HISTORY_ITEM_IDS, HISTORY_TIMESTAMPS,
                                                                            TIMESTAMP]
    assert kjt[USER_ID].values().tolist() == s.users.tolist()
    assert kjt[ITEM_ID].values().tolist() == s.items.tolist()
    assert kjt[TIMESTAMP].values().tolist() == s.timestamps.tolist()
    genres = [np.flatnonzero(data.catalog.item_genres[i]).tolist() for i in s.items]
    assert [t.tolist() for t in kjt[ITEM_GENRES].to_dense()] == genres
    h = data.histories
    for row, (u, n) in enumerate(zip(s.users, s.history_lengths)):
        start = h.offsets[u]
        assert kjt[HISTORY_ITEM_IDS].to_dense()[row].tolist() == h.items[start:start + n].tolist()
        assert kjt[HISTORY_TIMESTAMPS].to_dense()[row].tolist() == h.timestamps[start:start + n].tolist()
    assert batch.dense_features.shape == (5, data.catalog.num_dense)
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == s.labels.tolist()


def test_max_history_keeps_the_most_recent_events(data) -> None:
    full = next(iter(CtrBatches(data, "test", batch_size=8))).sparse_features[HISTORY_ITEM_IDS].to_dense()
    cut = next(iter(CtrBatches(data, "test", batch_size=8, max_history=2))).sparse_features[HISTORY_ITEM_IDS]
    assert [t.tolist() for t in cut.to_dense()] == [t.tolist()[-2:] for t in full]
    empty = next(iter(CtrBatches(data, "test", batch_size=8, max_history=0))).sparse_features[HISTORY_ITEM_IDS]
    assert empty.lengths().sum() == 0 and empty.values().numel() == 0


def test_ranks_partition_the_batches(data) -> None:
    single = [b.sparse_features[ITEM_ID].values() for b in CtrBatches(data, "train", batch_size=3, drop_last=True)]
    ranks = [list(CtrBatches(data, "train", batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    interleaved = [b.sparse_features[ITEM_ID].values() for pair in zip(*ranks) for b in pair]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, single))


def test_shuffle_is_seeded_per_epoch(data) -> None:
    def order(epoch: int, seed: int = 0) -> list[int]:
        batches = CtrBatches(data, "train", batch_size=4, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return torch.cat([b.sparse_features[TIMESTAMP].values() for b in batches]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_dataloader_yields_batches(data) -> None:
    loader = torch.utils.data.DataLoader(CtrBatches(data, "valid", batch_size=4), batch_size=None)
    assert sum(len(b.labels) for b in loader) == len(data.splits["valid"])


def test_count_before_excludes_same_second_events() -> None:
    h = Histories.from_events(np.array([0, 0, 0, 1]), np.array([5, 6, 7, 8]), np.array([10, 20, 20, 5]), 2)
    assert h.items.tolist() == [5, 6, 7, 8]
    assert h.count_before(np.array([0, 0, 0, 1, 1]), np.array([10, 20, 21, 5, 6])).tolist() == [0, 1, 3, 0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "nope"}, "split 'nope' is not one of"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"max_history": -1}, "max_history must be >= 0 or None, got -1"),
        ({"rank": 2, "world_size": 2}, "rank 2 is outside world_size 2"),
    ],
)
def test_bad_arguments_raise(data, kwargs: dict, message: str) -> None:
    args = {"split": "train", "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        CtrBatches(data, **args)


@pytest.mark.parametrize("max_history", [None, 2])
def test_trained_items_are_the_ids_training_batches_show(data, max_history) -> None:
    seen = np.zeros(data.catalog.num_items, dtype=bool)
    for batch in CtrBatches(data, "train", batch_size=7, max_history=max_history):
        seen[batch.sparse_features[ITEM_ID].values().numpy()] = True
        seen[batch.sparse_features[HISTORY_ITEM_IDS].values().numpy()] = True
    assert np.array_equal(data.trained_items(max_history), seen)


def test_cold_items_are_never_trained(ml100k_folder: Path) -> None:
    data = movielens.load(ml100k_folder).interactions(cold_frac=0.25)
    assert len(data.cold_items) and not data.trained_items()[data.cold_items].any()


def test_long_tail_split_holds_the_least_trained_test_items(data) -> None:
    tailed = data.with_long_tail(0.5)
    counts = np.bincount(data.splits["train"].items, minlength=data.catalog.num_items)
    tail, test = tailed.splits["tail"], data.splits["test"]
    assert 0 < len(tail) < len(test) and set(tail.items) <= set(test.items)
    assert counts[tail.items].max() < counts[np.setdiff1d(test.items, tail.items)].min()
    with pytest.raises(ValueError, match="fraction"):
        data.with_long_tail(1.0)


def test_int32_index_dtype_gives_the_int64_values_and_checks_they_fit(data) -> None:
    wide = next(iter(CtrBatches(data, "train", batch_size=5))).sparse_features
    narrow = next(iter(CtrBatches(data, "train", batch_size=5, index_dtype=torch.int32))).sparse_features
    assert wide.values().dtype == torch.int64 and narrow.values().dtype == narrow.lengths().dtype == torch.int32
    assert narrow.keys() == wide.keys() and torch.equal(narrow.values().long(), wide.values())
    assert torch.equal(narrow.lengths(), wide.lengths())
    h = data.histories
    late = dataclasses.replace(data, histories=Histories(h.offsets, h.items, h.timestamps + 2**31))
    with pytest.raises(ValueError, match=r"feature 'history_timestamps' has values in \[\d+, \d+\], outside int32 "
                                         r"\[-2147483648, 2147483647\]; use index_dtype=torch.int64"):
        CtrBatches(late, "train", batch_size=5, index_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"feature 'item_id__code0' has values in \[-1, 2147483648\]"):
        columns_to_kjt([("item_id__code0", np.array([-1, 2**31]), np.array([2]))], torch.int32)
    with pytest.raises(ValueError, match="index_dtype must be torch.int64 or torch.int32, got torch.int16"):
        CtrBatches(data, "train", batch_size=5, index_dtype=torch.int16)
