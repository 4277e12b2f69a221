"""A seeded synthetic CTR source for scale runs, with planted content clusters as ground truth.

:func:`generate` produces the same :class:`InteractionData` as the MovieLens loader, plus the content embeddings
``[I, D]``, each item's planted cluster ``[I]`` and each sample's true click probability. The generative story:

* **Items.** ``num_clusters`` unit centres on the sphere; an item's content is its centre plus Gaussian noise,
  L2-normalised. Each cluster has one or two main categories, so the genre multi-hot follows the cluster. Items
  have a latent quality ``~ N(0, 1)`` and a Zipf popularity within their cluster (better items rank higher).
* **Users.** Categorical age bucket and gender; interests over clusters drawn from a sparse Dirichlet centred on
  the user's demographic group, drifting linearly from an early to a late interest vector over the user's life.
* **Events.** Each user draws a target of ``U[min_history, max_history]`` clicks and is shown impressions until
  their target-th click on a warm item, where the timeline ends; so a user's *clicked history* (not their
  impressions, about ``1 / positive rate`` times as many) has ``min_history`` to ``max_history`` events. An
  impression is, with probability ``explore_frac``, a popularity-weighted item from the whole catalogue, otherwise a
  popular item of a cluster drawn from the user's current interests. Click ``~ Bernoulli(sigmoid(affinity_weight *
  affinity + quality_weight * quality + click_bias))``, where affinity in ``[0, 1]`` is the user's current interest
  in the item's cluster relative to their top cluster. Interests drift over the impressions the user is expected to
  need (from the click model in expectation), so they reach the late vector about when the timeline ends. Times are
  bursty (sessions), spread over a window covering most of the global time range.
* **Histories** hold *clicked* warm events only (what DIN/DMQN-style long-sequence models consume: the clicked-item
  sequence, not raw impressions), so a sample's history is the user's clicks strictly before it.
* **Samples.** The CTR samples are a seeded uniform subset of ``samples_per_user`` of each user's impressions
  (without replacement; all of them if fewer), so long histories do not mean tens of millions of samples.
* **Splits.** Warm samples are split by global time quantiles into ``train``, ``valid``, ``test``; a seeded
  ``cold_frac`` of items is held out of all of them and of the histories, and their samples after the training
  period form ``cold``. Every split is in chronological order.
* **Dense features** count samples in ``train`` only (all and recent, per user and per item; label-free), so
  cold items get zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from torchrec_sid.data.batches import Catalog, Histories, InteractionData, Samples
from torchrec_sid.metrics import auc

START_TIMESTAMP = 1_577_836_800  # 2020-01-01 00:00:00 UTC
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of the generator; validated on construction (``ValueError`` naming the field).

    Args:
        num_items: I.
        num_users: U.
        content_dim: D of the content embeddings.
        num_clusters: C planted content clusters (``<= num_items``).
        num_categories: G genres of the item multi-hot.
        min_history, max_history: bounds of a user's clicked history: each user's timeline ends at their
            ``U[min_history, max_history]``-th click on a warm item, so ``histories.lengths()`` lies within them
            (impressions are about ``1 / positive rate`` times as many).
        samples_per_user: CTR samples per user, a uniform subset of the user's impressions without replacement
            (all of them when fewer); those on cold items before the training cutoff belong to no split.
        valid_frac, test_frac: fractions of the warm events, by time, in ``valid`` and ``test``.
        cold_frac: fraction of items held out of training entirely.
        num_age_buckets, num_genders: cardinalities of the categorical user features.
        content_noise: norm of an item's offset from its cluster centre (before normalisation).
        preference_concentration: per-cluster Dirichlet concentration of user interests (small = sparse).
        interest_drift: how far a user's late interests move from the early ones, in ``[0, 1]``.
        explore_frac: fraction of impressions drawn from global popularity instead of the user's interests.
        popularity_exponent: Zipf exponent of item popularity within a cluster.
        affinity_weight, quality_weight, click_bias: coefficients of the click logit.
        time_span_days: length of the global time range, starting 2020-01-01 UTC.
        seed: seed of every random draw.
    """

    num_items: int = 100_000
    num_users: int = 2_000
    content_dim: int = 64
    num_clusters: int = 64
    num_categories: int = 20
    min_history: int = 1_000
    max_history: int = 10_000
    samples_per_user: int = 500
    valid_frac: float = 0.1
    test_frac: float = 0.1
    cold_frac: float = 0.1
    num_age_buckets: int = 7
    num_genders: int = 2
    content_noise: float = 0.8
    preference_concentration: float = 0.1
    interest_drift: float = 0.5
    explore_frac: float = 0.3
    popularity_exponent: float = 0.8
    affinity_weight: float = 4.0
    quality_weight: float = 1.0
    click_bias: float = -3.0
    time_span_days: int = 365
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_relations()

    def _check_ranges(self) -> None:
        """Each setting on its own."""
        for name in ("num_items", "num_users", "content_dim", "num_clusters", "num_categories", "min_history",
                     "samples_per_user", "num_age_buckets", "num_genders", "time_span_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("valid_frac", "test_frac", "cold_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("interest_drift", "explore_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("content_noise", "popularity_exponent"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preference_concentration <= 0.0:
            raise ValueError(f"preference_concentration must be > 0, got {self.preference_concentration}")

    def _check_relations(self) -> None:
        """Settings against each other."""
        if self.num_clusters > self.num_items:
            raise ValueError(f"num_clusters ({self.num_clusters}) must be <= num_items ({self.num_items})")
        if self.min_history > self.max_history:
            raise ValueError(f"min_history ({self.min_history}) must be <= max_history ({self.max_history})")
        if 0.6 * self.time_span_days * SECONDS_PER_DAY < 2 * self.max_history:
            raise ValueError(f"time_span_days ({self.time_span_days}) is too short for max_history "
                             f"({self.max_history}) events of at least one second each")
        if self.valid_frac + self.test_frac >= 1.0:
            raise ValueError(f"valid_frac + test_frac must be < 1, got {self.valid_frac + self.test_frac}")
        if round(self.cold_frac * self.num_items) >= self.num_items:
            raise ValueError(f"cold_frac ({self.cold_frac}) leaves no warm item out of {self.num_items}")


@dataclass(frozen=True)
class SyntheticData:
    """What :func:`generate` returns.

    Args:
        config: the configuration it was generated from.
        interactions: catalogue, click histories and splits (name ``"synthetic"``).
        content: content embeddings ``[I, D]`` float32, L2-normalised rows.
        item_clusters: planted cluster of each item ``[I]`` int64 (ground truth for quantizer benchmarks).
        click_probability: split name -> true click probability of each sample ``[S]`` float32 (the oracle).
    """

    config: SyntheticConfig
    interactions: InteractionData
    content: torch.Tensor
    item_clusters: np.ndarray
    click_probability: dict[str, np.ndarray]

    def signals(self) -> dict[str, torch.Tensor]:
        """The content signals quantizers and models read: ``text`` (the content ``[I, D]``) and ``meta`` (genre
        multi-hot ``[I, G]``)."""
        return {"text": self.content, "meta": torch.from_numpy(self.interactions.catalog.item_genres).float()}


@dataclass(frozen=True)
class SyntheticItems:
    """The catalogue side of the generator: what quantizers are fitted on.

    Args:
        content: content embeddings ``[I, D]`` float32, L2-normalised rows.
        clusters: planted cluster of each item ``[I]`` int64.
        genres: genre multi-hot ``[I, G]`` bool, following the clusters.
    """

    content: torch.Tensor
    clusters: np.ndarray
    genres: np.ndarray

    def signals(self) -> dict[str, torch.Tensor]:
        """``text`` (the content ``[I, D]``) and ``meta`` (genre multi-hot ``[I, G]``), as
        :meth:`SyntheticData.signals`."""
        return {"text": self.content, "meta": torch.from_numpy(self.genres).float()}


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Generates the catalogue, events, histories and splits of ``config``; same config, identical arrays."""
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    num_users, num_items, num_clusters = cfg.num_users, cfg.num_items, cfg.num_clusters
    clusters, content, genres, quality, popularity = _items(rng, cfg)

    # users: demographics and early / late interests [U, C]
    age = rng.choice(cfg.num_age_buckets, size=num_users, p=_normalise(rng.uniform(0.5, 1.5, cfg.num_age_buckets)))
    gender = rng.integers(0, cfg.num_genders, size=num_users)
    group_taste = (rng.lognormal(0.0, 1.0, (cfg.num_age_buckets, num_clusters))[age]
                   * rng.lognormal(0.0, 0.5, (cfg.num_genders, num_clusters))[gender])
    alpha = cfg.preference_concentration * num_clusters * group_taste / group_taste.sum(1, keepdims=True)
    early = _dirichlet(rng, alpha)
    late = (1.0 - cfg.interest_drift) * early + cfg.interest_drift * _dirichlet(rng, alpha)

    # cold items: held out of the histories and of the warm splits
    cold_items = np.sort(rng.choice(num_items, size=int(round(cfg.cold_frac * num_items)), replace=False))
    warm = np.ones(num_items, dtype=bool)
    warm[cold_items] = False

    # impressions, user-major and chronological within each user, each timeline ending at its target-th warm click
    targets = rng.integers(cfg.min_history, cfg.max_history + 1, size=num_users)
    users, items, probability, labels = _events(rng, cfg, targets, early, late, clusters, quality, popularity, warm)
    lengths = np.bincount(users, minlength=num_users)
    span = cfg.time_span_days * SECONDS_PER_DAY
    if lengths.max() > 0.6 * span:
        raise ValueError(f"time_span_days ({cfg.time_span_days}) is too short for the {lengths.max():,} impressions "
                         f"of the busiest user, of at least one second each")
    timestamps = _timestamps(rng, lengths, np.cumsum(lengths) - lengths, span)

    # click histories: the warm clicks, already grouped by user and chronological
    clicked = labels & warm[items]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users[clicked], minlength=num_users))]).astype(np.int64)
    histories = Histories(offsets, items[clicked], timestamps[clicked])
    del clicked

    # CTR samples: a uniform subset of each user's impressions; temporal splits over the warm ones
    keep = _sample_per_user(rng, users, lengths, cfg.samples_per_user)
    users, items, labels, timestamps, probability = (a[keep] for a in (users, items, labels, timestamps, probability))
    del keep
    history_lengths = histories.count_before(users, timestamps)  # fast while queries are user-major, sorted
    cold = ~warm[items]
    warm_times = np.sort(timestamps[~cold])
    valid_start = _time_quantile(warm_times, 1.0 - cfg.valid_frac - cfg.test_frac)
    test_start = _time_quantile(warm_times, 1.0 - cfg.test_frac)

    order = np.argsort(timestamps, kind="stable")  # chronological, ties by user
    samples = Samples(users, items, labels.astype(np.float32), timestamps, history_lengths).subset(order)
    probability, cold = probability[order], cold[order]
    timestamps = samples.timestamps
    masks = {
        "train": ~cold & (timestamps < valid_start),
        "valid": ~cold & (timestamps >= valid_start) & (timestamps < test_start),
        "test": ~cold & (timestamps >= test_start),
        "cold": cold & (timestamps >= valid_start),
    }
    splits = {name: samples.subset(mask) for name, mask in masks.items()}
    train = splits["train"]

    catalog = Catalog(
        num_users=num_users,
        num_items=num_items,
        user_features={"user_age_bucket": age.astype(np.int64), "user_gender": gender.astype(np.int64)},
        user_feature_cardinalities={"user_age_bucket": cfg.num_age_buckets, "user_gender": cfg.num_genders},
        item_genres=genres,
        genre_names=[f"category {g}" for g in range(cfg.num_categories)],
        dense_user=_activity_features(train.users, num_users),
        dense_item=_activity_features(train.items, num_items),
        item_titles=[f"item {i} (cluster {c})" for i, c in enumerate(clusters.tolist())],
    )
    return SyntheticData(
        config=cfg,
        interactions=InteractionData("synthetic", catalog, histories, splits, cold_items),
        content=torch.from_numpy(content),
        item_clusters=clusters,
        click_probability={name: probability[mask] for name, mask in masks.items()},
    )


def generate_items(config: SyntheticConfig = SyntheticConfig()) -> SyntheticItems:
    """The items of ``generate(config)`` alone (the same arrays), without users or events: fast at any size."""
    clusters, content, genres, _, _ = _items(np.random.default_rng(config.seed), config)
    return SyntheticItems(torch.from_numpy(content), clusters, genres)


CONTENT_BLOCK_ROWS = 1 << 16


def item_content_rows(config: SyntheticConfig, start: int, stop: int) -> np.ndarray:
    """Content ``[stop - start, D]`` float32 of items ``[start, stop)`` of a catalogue of ``config.num_items``,
    generated block by block (block b of :data:`CONTENT_BLOCK_ROWS` rows from the seed ``(seed, b)``), so any size
    streams to disk in bounded memory (:func:`torchrec_sid.jobs.scale.write_embeddings`). The story of
    :func:`generate_items`' content (noisy cluster centres, L2-normalised; clusters drawn with the same Dirichlet
    weights), not its arrays: use it for the 10^6-10^8-item quantizer series, where only the content matters.
    """
    if not 0 <= start <= stop <= config.num_items:
        raise ValueError(f"rows [{start}, {stop}) are outside the {config.num_items} items")
    rng = np.random.default_rng(config.seed)
    centres = rng.standard_normal((config.num_clusters, config.content_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(config.num_clusters, 5.0))
    blocks = []
    for block in range(start // CONTENT_BLOCK_ROWS, (stop - 1) // CONTENT_BLOCK_ROWS + 1 if stop > start else 0):
        first = block * CONTENT_BLOCK_ROWS
        rows = min(CONTENT_BLOCK_ROWS, config.num_items - first)
        block_rng = np.random.default_rng((config.seed, block))
        clusters = block_rng.choice(config.num_clusters, size=rows, p=weights)
        x = centres[clusters] + block_rng.standard_normal((rows, config.content_dim)) * (
            config.content_noise / np.sqrt(config.content_dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        blocks.append(x[max(start - first, 0):stop - first])
    return np.concatenate(blocks) if blocks else np.zeros((0, config.content_dim), dtype=np.float32)


def _items(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, ...]:
    """Cluster ``[I]``, content ``[I, D]``, genres ``[I, G]``, quality ``[I]`` and popularity ``[I]`` of the items."""
    clusters = _item_clusters(rng, cfg.num_items, cfg.num_clusters)
    content = _content(rng, clusters, cfg.num_clusters, cfg.content_dim, cfg.content_noise)
    genres = _genres(rng, clusters, cfg.num_clusters, cfg.num_categories)
    quality = rng.standard_normal(cfg.num_items).astype(np.float32)
    popularity = _popularity(rng, clusters, quality, cfg.num_clusters, cfg.popularity_exponent)
    return clusters, content, genres, quality, popularity


def _normalise(weights: np.ndarray) -> np.ndarray:
    """Rows (last axis) scaled to sum to 1."""
    return weights / weights.sum(-1, keepdims=True)


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` ``[N, K]``; safe for tiny concentrations (no all-zero row)."""
    return _normalise(rng.gamma(alpha) + np.finfo(np.float64).tiny)


def _time_quantile(sorted_times: np.ndarray, q: float) -> int:
    """The first timestamp after the first ``q`` fraction of ``sorted_times`` (past the last one when q = 1)."""
    k = int(len(sorted_times) * q)
    return int(sorted_times[k]) if k < len(sorted_times) else int(sorted_times[-1]) + 1


def _item_clusters(rng: np.random.Generator, num_items: int, num_clusters: int) -> np.ndarray:
    """Cluster of each item ``[I]``: every cluster non-empty, sizes mildly unequal (Dirichlet weights)."""
    rest = rng.choice(num_clusters, size=num_items - num_clusters, p=rng.dirichlet(np.full(num_clusters, 5.0)))
    return rng.permutation(np.concatenate([np.arange(num_clusters), rest])).astype(np.int64)


def _content(rng: np.random.Generator, clusters: np.ndarray, num_clusters: int, dim: int, noise: float) -> np.ndarray:
    """Unit centres plus isotropic noise of norm about ``noise``, rows L2-normalised: ``[I, D]`` float32."""
    centres = rng.standard_normal((num_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[clusters] + rng.standard_normal((len(clusters), dim)) * (noise / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _genres(rng: np.random.Generator, clusters: np.ndarray, num_clusters: int, num_genres: int) -> np.ndarray:
    """Genre multi-hot ``[I, G]``: the cluster's main genre (always), its second genre (if any, p=0.6), plus
    about 1.5 random genres per item out of G."""
    main = rng.integers(0, num_genres, size=num_clusters)
    second = np.where(rng.random(num_clusters) < 0.5, rng.integers(0, num_genres, size=num_clusters), -1)
    out = rng.random((len(clusters), num_genres)) < 1.5 / max(num_genres, 2)
    rows = np.arange(len(clusters))
    out[rows, main[clusters]] = True
    has_second = (second[clusters] >= 0) & (rng.random(len(clusters)) < 0.6)
    out[rows[has_second], second[clusters][has_second]] = True
    return out


def _popularity(rng: np.random.Generator, clusters: np.ndarray, quality: np.ndarray, num_clusters: int,
                exponent: float) -> np.ndarray:
    """Zipf weight ``(rank + 1) ** -exponent`` of each item ``[I]``, ranked within its cluster by noisy quality."""
    order = np.lexsort((-(quality + rng.standard_normal(len(quality))), clusters))
    sizes = np.bincount(clusters, minlength=num_clusters)
    rank = np.empty(len(clusters), dtype=np.int64)
    rank[order] = np.arange(len(clusters)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return (rank + 1.0) ** -exponent


def _timestamps(rng: np.random.Generator, lengths: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """Strictly increasing unix seconds per user ``[E]`` (user-major), bursty: one gap in ten starts a new
    session (1000x the mean in-session gap). A user's events fill a window starting in the first 20% of the global
    range and ending in the last 20%."""
    num_users, total = len(lengths), int(lengths.sum())
    first = rng.uniform(0.0, 0.2, num_users) * span
    last = rng.uniform(0.8, 1.0, num_users) * span
    gaps = rng.exponential(1.0, total) * np.where(rng.random(total) < 0.1, 1.0, 1e-3)
    gaps_per_user = np.add.reduceat(gaps, starts)
    users = np.repeat(np.arange(num_users), lengths)
    scale = (last - first - lengths) / gaps_per_user  # leaves >= 1 s per event
    steps = 1 + np.floor(gaps * scale[users]).astype(np.int64)
    within = np.cumsum(steps) - np.repeat(np.cumsum(steps)[starts] - steps[starts], lengths)
    return START_TIMESTAMP + first.astype(np.int64)[users] + within


def _impressions(rng: np.random.Generator, users: np.ndarray, drift: np.ndarray, early: np.ndarray,
                 late: np.ndarray, clusters: np.ndarray, popularity: np.ndarray, explore_frac: float) -> np.ndarray:
    """Impressed item of each event ``[E]``: with probability ``explore_frac`` by global popularity, otherwise a
    cluster from the user's early (probability ``1 - drift``) or late interests, then an item by popularity."""
    total = len(users)
    num_users, num_clusters = early.shape
    # cluster draw: inverse CDF over the stacked [2U, C] interest table, rows offset by their index
    cdf = np.cumsum(np.concatenate([early, late]), axis=1)
    cdf = (cdf / cdf[:, -1:] + np.arange(2 * num_users)[:, None]).ravel()
    row = users + num_users * (rng.random(total, dtype=np.float32) < drift)
    flat = np.searchsorted(cdf, row + rng.random(total), side="right")
    cluster = np.clip(flat - row * num_clusters, 0, num_clusters - 1)
    # item within the cluster: inverse CDF over popularity, items grouped by cluster
    by_cluster = np.argsort(clusters, kind="stable")
    cum = np.cumsum(popularity[by_cluster])
    sizes = np.bincount(clusters, minlength=num_clusters)
    end = np.cumsum(sizes)
    begin = end - sizes
    base = np.concatenate([[0.0], cum])[begin]
    pos = np.searchsorted(cum, base[cluster] + rng.random(total) * (cum[end - 1] - base)[cluster], side="right")
    items = by_cluster[np.clip(pos, begin[cluster], end[cluster] - 1)]
    # exploration: any item by global popularity
    explore = rng.random(total) < explore_frac
    global_pos = np.searchsorted(cum, rng.random(int(explore.sum())) * cum[-1], side="right")
    items[explore] = by_cluster[np.minimum(global_pos, len(cum) - 1)]
    return items


def _events(rng: np.random.Generator, cfg: SyntheticConfig, targets: np.ndarray, early: np.ndarray, late: np.ndarray,
            clusters: np.ndarray, quality: np.ndarray, popularity: np.ndarray,
            warm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Impressions of every user up to and including their ``targets[u]``-th warm click, user-major and
    chronological: ``users`` int64, ``items`` int64, true click ``probability`` float32, ``labels`` bool, all ``[E]``.

    A user's drift runs from 0 to 1 over the ``targets[u] / rate`` impressions they are expected to need (``rate``:
    expected warm clicks per impression, :func:`_warm_click_rates`) and stays at 1 after. The first round draws that
    many plus enough for three standard deviations of the click count; the few users still short get further rounds
    appended to their timelines; then every timeline is cut right after its target-th warm click.
    """
    num_users = len(targets)
    early_affinity = (early / early.max(1, keepdims=True)).astype(np.float32)
    late_affinity = (late / late.max(1, keepdims=True)).astype(np.float32)
    steps = 16  # midpoint rule over the drift
    rates = _warm_click_rates(cfg, early, late, early_affinity, late_affinity, clusters, quality, popularity, warm,
                              np.append((np.arange(steps) + 0.5) / steps, 1.0))
    expected = targets / rates[:, :steps].mean(1)  # impressions over which the drift runs
    final_rate = rates[:, steps]  # warm clicks per impression once the drift is over
    if expected.sum() > 5e8:
        raise ValueError(f"the click model gives {targets.sum() / expected.sum():.2g} warm clicks per impression, so "
                         f"about {expected.sum():.2g} impressions for the histories: raise click_bias or lower "
                         f"max_history")
    need = targets.astype(np.float64)  # warm clicks still to come
    done = np.zeros(num_users, dtype=np.int64)  # impressions drawn so far
    rounds: list[tuple[np.ndarray, ...]] = []
    while (need > 0).any():
        who = np.flatnonzero(need > 0)
        shortfall = need[who] if rounds else 0.0  # the first round's drift ramp is expected to bring the targets
        n = np.ceil(np.maximum(expected[who] - done[who], 0.0)
                    + (shortfall + 3.0 * np.sqrt(need[who]) + 3.0) / final_rate[who]).astype(np.int64)
        users = np.repeat(who, n)
        position = np.arange(len(users), dtype=np.int64) + np.repeat(done[who] - (np.cumsum(n) - n), n)
        drift = np.minimum(position / expected[users], 1.0).astype(np.float32)
        del position
        items = _impressions(rng, users, drift, early, late, clusters, popularity, cfg.explore_frac)
        probability = _click_probability(cfg, users, items, drift, early_affinity, late_affinity, clusters, quality)
        del drift
        labels = rng.random(len(items), dtype=np.float32) < probability
        need -= np.bincount(users, weights=labels & warm[items], minlength=num_users)
        done[who] += n
        rounds.append((users, items, probability, labels))
    if len(rounds) == 1:
        users, items, probability, labels = rounds[0]
    else:  # later rounds continue their users' timelines: a stable sort by user restores user-major order
        users = np.concatenate([r[0] for r in rounds])
        order = np.argsort(users, kind="stable")
        users = users[order]
        items, probability, labels = (np.concatenate([r[k] for r in rounds])[order] for k in (1, 2, 3))
    del rounds
    # cut each timeline right after its target-th warm click
    warm_click = labels & warm[items]
    before = np.cumsum(warm_click) - warm_click  # warm clicks strictly before each event, all users so far
    lengths = np.bincount(users, minlength=num_users)
    keep = before - np.repeat(before[np.cumsum(lengths) - lengths], lengths) < np.repeat(targets, lengths)
    del before, warm_click
    return users[keep], items[keep], probability[keep], labels[keep]


def _click_probability(cfg: SyntheticConfig, users: np.ndarray, items: np.ndarray, drift: np.ndarray,
                       early_affinity: np.ndarray, late_affinity: np.ndarray, clusters: np.ndarray,
                       quality: np.ndarray) -> np.ndarray:
    """True click probability of each impression ``[E]`` float32; affinities ``[U, C]`` are relative to the user's
    top cluster."""
    cluster = clusters[items]
    affinity = (1.0 - drift) * early_affinity[users, cluster] + drift * late_affinity[users, cluster]
    logit = cfg.affinity_weight * affinity + cfg.quality_weight * quality[items] + cfg.click_bias
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def _warm_click_rates(cfg: SyntheticConfig, early: np.ndarray, late: np.ndarray, early_affinity: np.ndarray,
                      late_affinity: np.ndarray, clusters: np.ndarray, quality: np.ndarray, popularity: np.ndarray,
                      warm: np.ndarray, drifts: np.ndarray) -> np.ndarray:
    """Expected warm clicks per impression of each user at each drift, ``[U, len(drifts)]``: the impression model of
    :func:`_impressions` and the click model of :func:`_click_probability` in expectation, exact up to a linear
    interpolation over 65 affinity levels."""
    num_clusters = early.shape[1]
    levels = np.linspace(0.0, 1.0, 65)
    mass = np.bincount(clusters, weights=popularity, minlength=num_clusters)
    # [C, K]: probability that a popularity-weighted item of the cluster is warm and clicked, at each affinity level
    logit = cfg.affinity_weight * levels + (cfg.quality_weight * quality + cfg.click_bias)[:, None]
    weighted = (warm * popularity / mass[clusters])[:, None] / (1.0 + np.exp(-logit))
    by_cluster = np.argsort(clusters, kind="stable")
    sizes = np.bincount(clusters, minlength=num_clusters)
    table = np.add.reduceat(weighted[by_cluster], np.cumsum(sizes) - sizes, axis=0)
    del logit, weighted
    explore = cfg.explore_frac * mass / mass.sum()  # cluster mix of the exploration impressions
    column = np.arange(num_clusters)
    out = np.empty((len(early), len(drifts)))
    for j, d in enumerate(drifts):
        share = (1.0 - cfg.explore_frac) * ((1.0 - d) * early + d * late) + explore  # [U, C] cluster of an impression
        x = ((1.0 - d) * early_affinity + d * late_affinity) * (len(levels) - 1)
        low = np.minimum(x.astype(np.int64), len(levels) - 2)
        frac = x - low
        click = (1.0 - frac) * table[column, low] + frac * table[column, low + 1]
        out[:, j] = (share * click).sum(1)
    return out


def _sample_per_user(rng: np.random.Generator, users: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of a uniform random subset of ``min(k, lengths[u])`` of each user's events, without
    replacement, from user-major ``users`` ``[E]``: the events with the k smallest of iid uniform keys, found among
    the keys under a per-user threshold that leaves about ``k`` plus four standard deviations of them (exactly all
    of a user's events when that is too few)."""
    keys = rng.random(len(users))
    threshold = np.minimum((k + 4.0 * np.sqrt(k) + 8.0) / np.maximum(lengths, 1), 1.0)
    candidates = np.flatnonzero(keys < threshold[users])
    short = np.bincount(users[candidates], minlength=len(lengths)) < np.minimum(k, lengths)
    if short.any():
        threshold[short] = 1.0  # above every key
        candidates = np.flatnonzero(keys < threshold[users])
    candidates = candidates[np.lexsort((keys[candidates], users[candidates]))]  # by user, then key
    owner = users[candidates]
    counts = np.bincount(owner, minlength=len(lengths))
    rank = np.arange(len(candidates)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.sort(candidates[rank < k])


def _activity_features(ids: np.ndarray, n: int) -> np.ndarray:
    """Standardised ``[log1p(train samples), log1p(samples in the last tenth of train)]`` per id from the
    chronological train ``ids`` ``[S]``: ``[n, 2]`` float32. Label-free, so no target leaks into train features."""
    recent = ids[int(0.9 * len(ids)):]
    x = np.log1p(np.stack([np.bincount(ids, minlength=n), np.bincount(recent, minlength=n)], axis=1))
    return ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)


def oracle_auc(data: SyntheticData, split: str) -> float:
    """ROC AUC of the true click probabilities on ``split``: what a Bayes-optimal model scores there."""
    return auc(torch.as_tensor(data.click_probability[split]), torch.as_tensor(data.interactions.splits[split].labels))


def describe(data: SyntheticData) -> str:
    """The interaction summary, the config, and the oracle AUC of every split."""
    cfg = ", ".join(f"{f.name}={getattr(data.config, f.name)}" for f in fields(data.config))
    lines = [data.interactions.summary(), f"  config: {cfg}"]
    lines += [f"  oracle AUC {name:<6} {oracle_auc(data, name):.3f}" for name in data.interactions.splits]
    return "\n".join(lines)
