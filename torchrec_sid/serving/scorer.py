"""The online scoring path: one user, their history and C candidates -> C scores, from an exported ranker.

For DMQN the candidate-independent user state is taken from a store (:class:`~torchrec_sid.modules.LRUStateCache`
in process by default, :class:`~torchrec_sid.serving.store.RedisStateStore` across processes) under the key
``(user, history_version)``; on a miss it is computed from the request's history and stored. Any other history
block scores from the history each time.

What the scorer does with unusual input (never a crash of the server; :class:`BadRequest` is a 4xx over HTTP):

- an unknown user: a cache miss; the state is computed from the history of the request and stored;
- an empty history: scored as a user without events (DMQN: every cluster empty, the history vector is zero);
- a history longer than the model's ``max_history``: its most recent ``max_history`` events, as in training;
- an item id (candidate or history) outside ``[0, num_items)`` of the SID table, an unknown pooled feature, an id
  outside a pooled table, a ``dense`` of the wrong width or not finite, no candidate: :class:`BadRequest`;
- no ``history_timestamps``: every event is taken to happen at the request time (age 0);
- a stored state of another model / SID table version or shape: a miss (recomputed, overwritten);
- the store unreachable: the state is computed (counted as a fallback), see the store.

Example::

    scorer = Scorer(RankerArtifact.load("ranker.pt2"))  # in-process LRU; or store=RedisStateStore(...)
    scorer.score("user 7", history=[3, 1, 4], candidates=[5, 9, 2])  # tensor([p, p, p]) click probabilities
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from torchrec_sid.modules.dmqn import DMQNState, LRUStateCache, UserStateCache
from torchrec_sid.serving.artifact import RankerArtifact

__all__ = ["BadRequest", "ScoreRequest", "ScoreResult", "Scorer", "history_version"]

MAX_CANDIDATES = 10_000


class BadRequest(ValueError):
    """A request the scorer refuses; the message names the field, the value and the limit."""


@dataclass(frozen=True)
class ScoreRequest:
    """One user's request, as the JSON body of ``POST /score`` gives it (see :meth:`from_json`)."""

    user: str
    history: Sequence[int] | np.ndarray
    candidates: Sequence[int] | np.ndarray
    history_timestamps: Sequence[int] | np.ndarray | None = None
    timestamp: int | None = None
    dense: Sequence[float] | None = None
    features: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, body: Any) -> ScoreRequest:
        """Checks the JSON types: ``{"user": str | int, "history": [int], "candidates": [int],
        "history_timestamps": [int]?, "timestamp": int?, "dense": [float]?, "features": {name: [int] | [[int]]}?}``."""
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - {"user", "history", "candidates", "history_timestamps", "timestamp", "dense",
                                      "features"})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}")
        for name in ("user", "history", "candidates"):
            if name not in body:
                raise BadRequest(f"missing field {name!r}")
        user = body["user"]
        if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
            raise BadRequest(f"'user' must be a non-empty string or an integer, got {user!r}")
        return cls(str(user), _ints("history", body["history"]), _ints("candidates", body["candidates"]),
                   None if body.get("history_timestamps") is None else _ints("history_timestamps",
                                                                             body["history_timestamps"]),
                   None if body.get("timestamp") is None else _int("timestamp", body["timestamp"]),
                   None if body.get("dense") is None else _floats("dense", body["dense"]),
                   _features(body.get("features")))


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name!r} must be an integer, got {value!r}")
    return value


def _ints(name: str, value: Any) -> np.ndarray:
    """A JSON list of integers -> int64 ``[n]`` (checked in C: a 10,000-event history costs well under 1 ms)."""
    if not isinstance(value, list):
        raise BadRequest(f"{name!r} must be a list of integers, got {type(value).__name__}")
    try:
        array = np.asarray(value) if value else np.zeros(0, dtype=np.int64)
    except (ValueError, TypeError):
        array = np.asarray(None)
    if array.ndim != 1 or array.dtype.kind not in "iu":  # floats, bools, strings, nested lists, ints beyond int64
        raise BadRequest(f"{name!r} must be a list of integers (64-bit)")
    return array.astype(np.int64, copy=False)


def _floats(name: str, value: Any) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise BadRequest(f"{name!r} must be a list of numbers")
    return [float(v) for v in value]


def _features(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'features' must be an object {feature: [ids]} or {feature: [[ids] per candidate]}")
    for name, bags in value.items():
        if not isinstance(bags, list):
            raise BadRequest(f"features[{name!r}] must be a list of ids or a list of lists of ids")
        if bags and isinstance(bags[0], list):
            for bag in bags:
                _ints(f"features[{name!r}][...]", bag)
        else:
            _ints(f"features[{name!r}]", bags)
    return value


def history_version(history: np.ndarray, timestamps: np.ndarray | None) -> str:
    """A short digest of the (kept) history's ids and times: it changes when the history grows or changes."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(np.ascontiguousarray(history, dtype=np.int64).tobytes())
    if timestamps is not None:
        digest.update(np.ascontiguousarray(timestamps, dtype=np.int64).tobytes())
    return f"{len(history)}-{digest.hexdigest()}"


class ScoreResult(NamedTuple):
    logits: Tensor  # [C]
    cache: str  # "hit", "miss" (computed and stored) or "none" (not a stateful model, or caching off)


class Scorer:
    """Scores candidates for one user with an exported ranker, caching DMQN user states.

    Args:
        artifact: a :class:`RankerArtifact` or the path of one.
        store: where DMQN states live (default: a new in-process :class:`LRUStateCache`); unused by other blocks.
        cache: False computes every state (uncached DMQN).
        max_concurrent: model calls run at once (further requests wait); threads of an HTTP server share them.
    """

    def __init__(self, artifact: RankerArtifact | str | Path, store: UserStateCache | None = None,
                 cache: bool = True, max_concurrent: int = 2) -> None:
        self.artifact = artifact if isinstance(artifact, RankerArtifact) else RankerArtifact.load(artifact)
        m = self.artifact.manifest
        self.num_items, self.max_history, self.min_history = m["num_items"], m["max_history"], m["min_history"]
        self.pooled, self.pooled_sizes = list(m["pooled_features"]), dict(m["pooled_sizes"])
        self.dense_width = m["dense_in_features"]
        self.store: UserStateCache | None = None
        if self.artifact.stateful and cache:
            self.store = store if store is not None else LRUStateCache()
        self._store_lock = threading.Lock() if isinstance(self.store, LRUStateCache) else None
        self._compute = threading.Semaphore(max_concurrent)
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "hits": 0, "misses": 0, "uncached": 0}

    def score(self, user: str | int, history: Sequence[int] | np.ndarray, candidates: Sequence[int] | np.ndarray,
              **inputs: Any) -> Tensor:
        """Click probabilities ``[C]`` of ``candidates`` for ``user`` with ``history`` (item ids, oldest first).

        ``inputs``: ``history_timestamps``, ``timestamp`` (the request's time), ``dense`` ``[F]`` and ``features``
        (pooled feature -> one bag of ids for every candidate, or one bag per candidate), as in :class:`ScoreRequest`.
        """
        request = ScoreRequest(str(user), history, candidates, **inputs)
        return torch.sigmoid(self.score_request(request).logits)

    def score_request(self, request: ScoreRequest) -> ScoreResult:
        """Logits of a checked request and whether its state came from the store."""
        candidate_ids = self._candidates(request.candidates)
        history, timestamps = self._history(request)
        c = candidate_ids.size(0)
        pooled_values, pooled_lengths = self._pooled(request.features, c)
        dense = self._dense(request.dense, c)
        ids, mask, ages = self._padded(history, timestamps, request.timestamp)
        padded_c = max(c, 2)  # an exported dynamic size is never 1: score a copy of the only candidate too
        if padded_c != c:
            candidate_ids, dense = candidate_ids.repeat(2), dense.repeat(2, 1)
            pooled_values, pooled_lengths = _repeat_pooled(pooled_values, pooled_lengths, len(self.pooled))
        with self._compute:
            if not self.artifact.stateful:
                logits = self.artifact.score_history(candidate_ids, ids, mask, ages, pooled_values, pooled_lengths,
                                                     dense)
                outcome = "none"
            else:
                state, outcome = self._state(request.user, history, timestamps, ids, mask, ages)
                logits = self.artifact.score_state(candidate_ids, state.clusters[None], state.mask[None],
                                                   pooled_values, pooled_lengths, dense)
        with self._lock:
            self.counts["requests"] += 1
            self.counts[{"hit": "hits", "miss": "misses", "none": "uncached"}[outcome]] += 1
        return ScoreResult(logits[:c], outcome)

    def _state(self, user: str, history: np.ndarray, timestamps: np.ndarray | None, ids: Tensor, mask: Tensor,
               ages: Tensor) -> tuple[DMQNState, str]:
        if self.store is None:
            clusters, cluster_mask = self.artifact.encode(ids, mask, ages)
            return DMQNState(clusters[0], cluster_mask[0]), "none"
        key: Hashable = (user, history_version(history, timestamps))
        state = self._store_call(lambda: self.store.get(key))
        expected = tuple(self.artifact.manifest["state_shape"])
        if state is not None and tuple(state.clusters.shape) == expected:
            return state, "hit"
        clusters, cluster_mask = self.artifact.encode(ids, mask, ages)
        state = DMQNState(clusters[0], cluster_mask[0])
        self._store_call(lambda: self.store.put(key, state))
        return state, "miss"

    def _store_call(self, call: Any) -> Any:
        if self._store_lock is None:
            return call()
        with self._store_lock:
            return call()

    def stats(self) -> dict[str, Any]:
        """Request counts (``hits``, ``misses``, ``uncached``) and the store's own counters, if it has any."""
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
        looked_up = out["hits"] + out["misses"]
        out["hit_ratio"] = out["hits"] / looked_up if looked_up else None
        store_stats = getattr(self.store, "stats", None)
        if callable(store_stats):
            out["store"] = store_stats()
        return out

    # -- request -> tensors ------------------------------------------------------------------------------------------

    def _candidates(self, candidates: Sequence[int] | np.ndarray) -> Tensor:
        if len(candidates) == 0:
            raise BadRequest("'candidates' is empty; give at least one item id")
        if len(candidates) > MAX_CANDIDATES:
            raise BadRequest(f"{len(candidates)} candidates, at most {MAX_CANDIDATES} per request")
        ids = np.asarray(candidates, dtype=np.int64)
        self._check_items("candidates", ids)
        return torch.from_numpy(ids)

    def _check_items(self, field: str, ids: np.ndarray) -> None:
        bad = np.flatnonzero((ids < 0) | (ids >= self.num_items))
        if len(bad):
            raise BadRequest(f"{field}[{bad[0]}] = {ids[bad[0]]} is outside the SID table's items [0, "
                             f"{self.num_items}) ({len(bad)} such id(s))")

    def _history(self, request: ScoreRequest) -> tuple[np.ndarray, np.ndarray | None]:
        history = np.asarray(request.history, dtype=np.int64)
        self._check_items("history", history)
        timestamps = None
        if request.history_timestamps is not None:
            timestamps = np.asarray(request.history_timestamps, dtype=np.int64)
            if timestamps.shape != history.shape:
                raise BadRequest(f"'history_timestamps' has {len(timestamps)} values, 'history' {len(history)}")
        if self.max_history and len(history) > self.max_history:  # the most recent max_history, as in training
            history = history[-self.max_history:]
            timestamps = None if timestamps is None else timestamps[-self.max_history:]
        return history, timestamps

    def _padded(self, history: np.ndarray, timestamps: np.ndarray | None,
                now: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """``[1, L]`` ids, mask, ages with ``L = max(len, min_history)``; padding reads item 0, masked."""
        n = len(history)
        length = max(n, self.min_history)
        ids = torch.zeros(1, length, dtype=torch.long)
        ids[0, :n] = torch.from_numpy(history)
        mask = (torch.arange(length) < n)[None]
        ages = torch.zeros(1, length)
        if timestamps is not None and n:
            reference = int(now) if now is not None else int(timestamps[-1])
            ages[0, :n] = torch.from_numpy(timestamps - reference).float()
        return ids, mask, ages

    def _pooled(self, features: Mapping[str, Any] | None, c: int) -> tuple[Tensor, Tensor]:
        """KJT values and lengths ``[P * C]`` of the pooled features (feature-major); absent ones are empty."""
        features = features or {}
        unknown = sorted(set(features) - set(self.pooled))
        if unknown:
            raise BadRequest(f"unknown pooled feature(s) {unknown}; this model reads {self.pooled}")
        values: list[int] = []
        lengths: list[int] = []
        for name in self.pooled:
            bags = features.get(name, [])
            per_candidate = bool(bags) and isinstance(bags[0], list)
            if per_candidate and len(bags) != c:
                raise BadRequest(f"features[{name!r}] has {len(bags)} bags, one per candidate needs {c}")
            flat = [i for bag in bags for i in bag] if per_candidate else list(bags)
            size = self.pooled_sizes[name]
            bad = [i for i in flat if not 0 <= i < size]
            if bad:
                raise BadRequest(f"features[{name!r}] id {bad[0]} is outside its table [0, {size})")
            if per_candidate:
                for bag in bags:
                    values += bag
                    lengths.append(len(bag))
            else:
                values += flat * c
                lengths += [len(flat)] * c
        return torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.int32)

    def _dense(self, dense: Sequence[float] | None, c: int) -> Tensor:
        if dense is None:
            return torch.zeros(c, self.dense_width)
        if len(dense) != self.dense_width or not all(math.isfinite(x) for x in dense):
            raise BadRequest(f"'dense' must be {self.dense_width} finite numbers, got {len(dense)} value(s)")
        return torch.tensor(dense, dtype=torch.float32).expand(c, -1).contiguous()


def _repeat_pooled(values: Tensor, lengths: Tensor, num_features: int) -> tuple[Tensor, Tensor]:
    """Pooled KJT values / lengths of C rows -> the same for the rows repeated twice (2C), feature-major."""
    out_values, out_lengths, start = [], [], 0
    for per_feature in lengths.view(num_features, -1):
        n = int(per_feature.sum())
        chunk = values[start:start + n]
        out_values += [chunk, chunk]
        out_lengths += [per_feature, per_feature]
        start += n
    if not out_values:
        return values, lengths
    return torch.cat(out_values), torch.cat(out_lengths)
