import dataclasses

import numpy as np
import pytest
import torch

from torchrec_sid.data import synthetic
from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.data.synthetic import SyntheticConfig, SyntheticData, describe, generate, oracle_auc
from torchrec_sid.metrics import auc

# 100 to 300 clicks, so about 250 to 800 impressions per user, of which 200 become samples
SMALL = SyntheticConfig(num_items=2_000, num_users=50, min_history=100, max_history=300, samples_per_user=200)
ALL = dataclasses.replace(SMALL, num_users=20, samples_per_user=1_000_000)  # every impression is a sample
WARM_SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(SMALL)


@pytest.fixture(scope="module")
def full() -> SyntheticData:
    return generate(ALL)


def _samples_per_user(d: SyntheticData) -> np.ndarray:
    return sum(np.bincount(s.users, minlength=d.config.num_users) for s in d.interactions.splits.values())


def _arrays(d: SyntheticData) -> dict[str, np.ndarray]:
    """Every array of a generated data set, by name."""
    it, cat = d.interactions, d.interactions.catalog
    out = {
        "content": d.content.numpy(), "item_clusters": d.item_clusters, "cold_items": it.cold_items,
        "genres": cat.item_genres, "dense_user": cat.dense_user, "dense_item": cat.dense_item,
        **{f"user_{k}": v for k, v in cat.user_features.items()},
        "hist_offsets": it.histories.offsets, "hist_items": it.histories.items, "hist_ts": it.histories.timestamps,
    }
    for name, s in it.splits.items():
        for f in dataclasses.fields(s):
            out[f"{name}.{f.name}"] = getattr(s, f.name)
        out[f"{name}.p"] = d.click_probability[name]
    return out


def test_deterministic(data):
    again, other = generate(SMALL), generate(dataclasses.replace(SMALL, seed=1))
    a, b = _arrays(data), _arrays(again)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert data.interactions.catalog.item_titles == again.interactions.catalog.item_titles
    assert not np.array_equal(a["train.items"], _arrays(other)["train.items"])


def test_shapes_and_dtypes(data):
    cfg, it = SMALL, data.interactions
    cat, num_items, num_users = it.catalog, SMALL.num_items, SMALL.num_users
    assert it.name == "synthetic"
    assert data.content.shape == (num_items, cfg.content_dim) and data.content.dtype == torch.float32
    torch.testing.assert_close(data.content.norm(dim=1), torch.ones(num_items))
    assert data.item_clusters.shape == (num_items,) and data.item_clusters.dtype == np.int64
    assert set(np.unique(data.item_clusters)) == set(range(cfg.num_clusters))
    assert (cat.num_users, cat.num_items) == (num_users, num_items)
    assert cat.item_genres.shape == (num_items, cfg.num_categories) and cat.item_genres.dtype == bool
    assert cat.item_genres.any(1).all() and len(cat.genre_names) == cfg.num_categories
    assert cat.dense_user.dtype == cat.dense_item.dtype == np.float32
    assert cat.dense_user.shape[0] == num_users and cat.dense_item.shape[0] == num_items
    assert np.isfinite(cat.dense_user).all() and np.isfinite(cat.dense_item).all()
    assert len(cat.item_titles) == num_items and cat.item_titles[3] == f"item 3 (cluster {data.item_clusters[3]})"
    assert cat.user_feature_cardinalities == {"user_age_bucket": cfg.num_age_buckets, "user_gender": cfg.num_genders}
    for name, ids in cat.user_features.items():
        assert ids.shape == (num_users,) and ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < cat.user_feature_cardinalities[name]
    h = it.histories
    assert h.offsets.shape == (num_users + 1,) and h.offsets[0] == 0 and h.offsets[-1] == len(h.items)
    assert h.items.dtype == h.timestamps.dtype == h.offsets.dtype == np.int64
    assert set(it.splits) == {"train", "valid", "test", "cold"}
    for name, s in it.splits.items():
        assert len(s) > 0 and data.click_probability[name].shape == (len(s),)
        assert s.users.dtype == s.items.dtype == s.timestamps.dtype == s.history_lengths.dtype == np.int64
        assert set(np.unique(s.labels)) <= {0.0, 1.0}


def test_clicked_histories_within_bounds(data, full):
    for d in (data, full):
        lengths = d.interactions.histories.lengths()
        assert lengths.min() >= d.config.min_history and lengths.max() <= d.config.max_history
        assert lengths.max() - lengths.min() > 0.5 * (d.config.max_history - d.config.min_history)  # spread out


def test_timelines_end_at_the_last_history_click(full):
    # with every impression a sample, each user's last sample is their last history event, a warm click
    it, s = full.interactions, full.interactions.splits
    merged = {f: np.concatenate([getattr(s[n], f) for n in s]) for f in ("users", "items", "labels", "timestamps")}
    last = np.zeros(ALL.num_users, dtype=np.int64)
    np.maximum.at(last, merged["users"], merged["timestamps"])
    h = it.histories
    assert (h.timestamps[h.offsets[1:] - 1] == last).all()
    # impressions are about 1 / positive rate times the clicks
    ratio = _samples_per_user(full).sum() / h.lengths().sum()
    assert 1.5 < ratio < 5.0


def test_samples_per_user(data, full):
    per_user = _samples_per_user(data)
    k = SMALL.samples_per_user
    assert per_user.max() <= k  # cold samples before the training cutoff belong to no split
    assert per_user.min() >= 0.7 * k
    exact = generate(dataclasses.replace(SMALL, num_users=10, cold_frac=0.0))
    assert (_samples_per_user(exact) == k).all()  # every user has more than k impressions
    assert _samples_per_user(full).min() > k and len(full.interactions.splits["train"]) > 0
    # a uniform subset over each user's timeline: samples sit on average halfway through the history
    lengths = data.interactions.histories.lengths()
    position = np.concatenate([s.history_lengths / lengths[s.users] for s in data.interactions.splits.values()])
    assert position.mean() == pytest.approx(0.5, abs=0.05)


def test_histories_are_chronological_clicks_strictly_before_each_sample(data, full):
    for d in (data, full):
        it = d.interactions
        h = it.histories
        owner = np.repeat(np.arange(d.config.num_users), h.lengths())
        same_user = owner[1:] == owner[:-1]
        assert (np.diff(h.timestamps)[same_user] > 0).all()
        for s in it.splits.values():
            start, end = h.offsets[s.users], h.offsets[s.users + 1]
            last = start + s.history_lengths - 1
            assert (s.history_lengths >= 0).all() and (last < end).all()
            has = s.history_lengths > 0
            assert (h.timestamps[last[has]] < s.timestamps[has]).all()  # no leakage
            after = last + 1 < end
            assert (h.timestamps[last[after] + 1] >= s.timestamps[after]).all()  # nothing earlier left out
            assert (np.diff(s.timestamps) >= 0).all()  # splits are chronological
        history = set(zip(owner.tolist(), h.items.tolist(), h.timestamps.tolist()))
        clicked = {(u, i, t) for name in WARM_SPLITS for s in [it.splits[name]]
                   for u, i, t, y in zip(s.users.tolist(), s.items.tolist(), s.timestamps.tolist(), s.labels) if y == 1}
        assert clicked <= history  # every clicked warm sample is a history event
        if d is full:  # and with every impression a sample, the history is exactly the clicked warm samples
            assert len(history) == len(h.items) and clicked == history


def test_top_up_rounds(monkeypatch):
    # overestimated click rates leave every user short after the first round: later rounds must top up
    rates = synthetic._warm_click_rates
    monkeypatch.setattr(synthetic, "_warm_click_rates", lambda *args: 3.0 * rates(*args))
    cfg = dataclasses.replace(ALL, num_users=5, min_history=150, max_history=150)
    d = generate(cfg)
    h = d.interactions.histories
    assert (h.lengths() == 150).all()
    owner = np.repeat(np.arange(cfg.num_users), h.lengths())
    assert (np.diff(h.timestamps)[owner[1:] == owner[:-1]] > 0).all()
    s = d.interactions.splits["train"]
    assert (s.history_lengths == d.interactions.histories.count_before(s.users, s.timestamps)).all()


def test_cold_items_only_in_cold_split(data):
    it = data.interactions
    cold = it.cold_items
    assert len(cold) == round(SMALL.cold_frac * SMALL.num_items) and (np.diff(cold) > 0).all()
    assert not np.isin(it.histories.items, cold).any()
    for name in WARM_SPLITS:
        assert not np.isin(it.splits[name].items, cold).any()
    assert np.isin(it.splits["cold"].items, cold).all()
    assert it.splits["cold"].timestamps.min() > it.splits["train"].timestamps.max()


def test_temporal_split(data):
    s = data.interactions.splits
    assert s["train"].timestamps.max() < s["valid"].timestamps.min()
    assert s["valid"].timestamps.max() < s["test"].timestamps.min()
    n = sum(len(s[name]) for name in WARM_SPLITS)
    assert len(s["valid"]) / n == pytest.approx(SMALL.valid_frac, abs=0.02)
    assert len(s["test"]) / n == pytest.approx(SMALL.test_frac, abs=0.02)
    assert s["test"].history_lengths.mean() > s["train"].history_lengths.mean()


def test_zero_fractions_give_empty_splits():
    d = generate(dataclasses.replace(SMALL, num_users=5, test_frac=0.0, cold_frac=0.0))
    s = d.interactions.splits
    assert len(s["test"]) == len(s["cold"]) == 0 and len(d.interactions.cold_items) == 0
    assert len(s["train"]) > 0 and len(s["valid"]) > 0


def test_labels_depend_on_content(data):
    it, clusters = data.interactions, data.item_clusters
    for name, s in it.splits.items():
        assert 0.2 <= s.positive_rate() <= 0.5, name
        assert oracle_auc(data, name) > 0.6, name
    # a learnable signal: the user's train click rate on the candidate's content cluster ranks test and cold events
    train, c = it.splits["train"], SMALL.num_clusters
    key = train.users * c + clusters[train.items]
    shows = np.bincount(key, minlength=SMALL.num_users * c)
    clicks = np.bincount(key, weights=train.labels, minlength=SMALL.num_users * c)
    rate = (clicks + 2 * train.positive_rate()) / (shows + 2)
    for name in ("test", "cold"):
        s = it.splits[name]
        assert auc(torch.as_tensor(rate[s.users * c + clusters[s.items]]), torch.as_tensor(s.labels)) > 0.6, name
    assert "oracle AUC test" in describe(data)


def test_genres_follow_clusters(data):
    genres, clusters = data.interactions.catalog.item_genres, data.item_clusters
    for c in range(SMALL.num_clusters):
        assert genres[clusters == c].mean(0).max() == 1.0  # the cluster's main genre is always on


def test_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = (rng.random(500) < 0.3).astype(np.float32)
    scores = np.round(rng.random(500) + labels * 0.3, 1)  # ties
    assert auc(torch.as_tensor(scores), torch.as_tensor(labels)) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_ctr_batches(data):
    it = data.interactions
    batches = CtrBatches(it, "train", batch_size=64)
    batch = next(iter(batches))
    kjt = batch.sparse_features
    assert kjt.keys() == ["user_id", "user_age_bucket", "user_gender", "item_id", "item_genres",
                          "history_item_ids", "history_timestamps", "timestamp"]
    assert set(it.catalog.sparse_cardinalities()) <= set(kjt.keys())
    lengths = kjt.lengths().view(len(kjt.keys()), 64)
    assert int(lengths.sum()) == len(kjt.values())
    for key in ("user_id", "user_age_bucket", "user_gender", "item_id", "timestamp"):
        assert (kjt[key].lengths() == 1).all()
    s = it.splits["train"].subset(np.arange(64))
    assert kjt["history_item_ids"].lengths().tolist() == s.history_lengths.tolist()
    assert torch.equal(kjt["history_timestamps"].lengths(), kjt["history_item_ids"].lengths())
    genre_counts = it.catalog.item_genres[s.items].sum(1)
    assert kjt["item_genres"].lengths().tolist() == genre_counts.tolist()
    for key, card in it.catalog.sparse_cardinalities().items():
        values = kjt[key].values()
        assert len(values) == 0 or (values.min() >= 0 and values.max() < card), key
    assert batch.dense_features.shape == (64, it.catalog.num_dense)
    torch.testing.assert_close(batch.labels, torch.from_numpy(s.labels))


@pytest.mark.parametrize("change, field", [
    ({"min_history": 500, "max_history": 100}, "min_history"),
    ({"num_clusters": 3_000}, "num_clusters"),
    ({"num_items": 0}, "num_items"),
    ({"content_dim": 0}, "content_dim"),
    ({"valid_frac": -0.1}, "valid_frac"),
    ({"test_frac": 1.0}, "test_frac"),
    ({"valid_frac": 0.5, "test_frac": 0.5}, "valid_frac \\+ test_frac"),
    ({"cold_frac": 1.0}, "cold_frac"),
    ({"cold_frac": 0.9999}, "cold_frac"),
    ({"explore_frac": 1.5}, "explore_frac"),
    ({"interest_drift": -1.0}, "interest_drift"),
    ({"preference_concentration": 0.0}, "preference_concentration"),
    ({"content_noise": -1.0}, "content_noise"),
    ({"time_span_days": 1, "max_history": 100_000}, "time_span_days"),
    ({"samples_per_user": 0}, "samples_per_user"),
])
def test_bad_config(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **change)


@pytest.mark.parametrize("change, message", [
    ({"min_history": 20_000, "max_history": 20_000, "time_span_days": 1}, "time_span_days"),  # impressions > clicks
    ({"click_bias": -40.0}, "click_bias"),  # next to no clicks: the histories would need ~1e18 impressions
])
def test_unreachable_histories(change, message):
    with pytest.raises(ValueError, match=message):
        generate(dataclasses.replace(SMALL, num_users=2, **change))
