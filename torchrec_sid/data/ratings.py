"""Rating logs -> CTR interaction data: the temporal and cold-item splits shared by the MovieLens loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd

from torchrec_sid.data.batches import Catalog, Histories, InteractionData, Samples


def rating_histories(ratings: pd.DataFrame, num_users: int, exclude_items: np.ndarray | None = None) -> Histories:
    """Every user's rated items, oldest first (optionally without ``exclude_items``). ``ratings``: ``user_id,
    item_id, timestamp`` in chronological order."""
    r = ratings if exclude_items is None else ratings[~ratings["item_id"].isin(exclude_items)]
    return Histories.from_events(r["user_id"].to_numpy(), r["item_id"].to_numpy(), r["timestamp"].to_numpy(),
                                 num_users)


def temporal_interactions(name: str, catalog: Catalog, ratings: pd.DataFrame, valid_frac: float = 0.1,
                          test_frac: float = 0.1, cold_frac: float = 0.15, positive_threshold: float = 4,
                          seed: int = 0) -> InteractionData:
    """CTR samples (label = ``rating >= positive_threshold``) split by time, plus cold-start items.

    ``ratings``: ``user_id, item_id, rating, timestamp`` (ids from 0) in chronological order. Events are ordered by
    time: the first ``1 - valid_frac - test_frac`` go to ``train``, then ``valid``, then ``test``. A seeded
    ``cold_frac`` of the items is held out of training entirely: their events leave train/valid/test and the
    histories; those after the training period form ``cold``. Each sample's history is the user's events strictly
    before it (same-second events excluded), so no label leaks into a feature.
    """
    for setting, value in (("valid_frac", valid_frac), ("test_frac", test_frac), ("cold_frac", cold_frac)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{setting} must be in [0, 1), got {value}")
    if valid_frac + test_frac >= 1.0:
        raise ValueError(f"valid_frac + test_frac must be < 1, got {valid_frac + test_frac}")
    n = len(ratings)
    period = np.zeros(n, dtype=np.int8)  # ratings are chronological: 0 train, 1 valid, 2 test
    period[int(round(n * (1 - valid_frac - test_frac))):] = 1
    period[int(round(n * (1 - test_frac))):] = 2
    rng = np.random.default_rng(seed)
    num_items = catalog.num_items
    cold_items = np.sort(rng.choice(num_items, size=int(round(cold_frac * num_items)), replace=False))
    histories = rating_histories(ratings, catalog.num_users, exclude_items=cold_items)
    users, items = ratings["user_id"].to_numpy(np.int64), ratings["item_id"].to_numpy(np.int64)
    timestamps = ratings["timestamp"].to_numpy(np.int64)
    samples = Samples(
        users=users,
        items=items,
        labels=(ratings["rating"].to_numpy() >= positive_threshold).astype(np.float32),
        timestamps=timestamps,
        history_lengths=histories.count_before(users, timestamps),
    )
    cold = np.isin(items, cold_items)
    splits = {
        "train": samples.subset(~cold & (period == 0)),
        "valid": samples.subset(~cold & (period == 1)),
        "test": samples.subset(~cold & (period == 2)),
        "cold": samples.subset(cold & (period > 0)),
    }
    return InteractionData(name, catalog, histories, splits, cold_items)
