"""User-state stores for serving DMQN: a Redis store behind :class:`~torchrec_sid.modules.UserStateCache`, the
state wire format, and a local ``redis-server`` for tests, benchmarks and the demo.

A state is stored as bytes without pickle: a 4-byte big-endian header length, a JSON header (``model_version``,
``sid_table_version``, ``history_version``, ``shape`` ``[M, d]``, ``dtype``), then the clusters (float32,
little-endian, ``M*d`` values) and the cluster mask (``M`` bytes, 0 or 1). The Redis key names the model version,
the SID table version and the user (``<prefix>:<model>:<sid table>:<user>``), so a state written by another model
or SID table is never read; the header's versions and shape are checked again on read (a foreign or corrupt value
is a miss and is overwritten). One entry per user: when the user's history grows the state's
``history_version`` no longer matches, the scorer recomputes it and writes it back over the old one.

Redis being down is never an error of a request: :meth:`RedisStateStore.get` answers None (a miss, counted as a
``fallback``), :meth:`~RedisStateStore.put` drops the write (``write_failures``), and the store stops trying for
``retry_after`` seconds after a failure, so a dead server costs one refused connection per ``retry_after``.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from torchrec_sid.modules.dmqn import DMQNState

logger = logging.getLogger(__name__)

__all__ = ["RedisServer", "RedisStateStore", "StateFormatError", "decode_state", "encode_state", "free_port"]

_LENGTH = struct.Struct(">I")


class StateFormatError(ValueError):
    """Bytes that are not a state of the expected model, SID table and shape."""


def encode_state(state: DMQNState, model_version: str, sid_table_version: str, history_version: str) -> bytes:
    """One user's state (``clusters [M, d]``, ``mask [M]``) -> bytes (header + raw little-endian tensors)."""
    clusters = state.clusters.detach().to("cpu", torch.float32).contiguous()
    mask = state.mask.detach().to("cpu", torch.bool).contiguous()
    if clusters.dim() != 2 or tuple(mask.shape) != (clusters.size(0),):
        raise ValueError(f"encode_state: expected clusters [M, d] and mask [M], got {tuple(clusters.shape)} and "
                         f"{tuple(mask.shape)}")
    header = json.dumps({"model_version": model_version, "sid_table_version": sid_table_version,
                         "history_version": history_version, "shape": list(clusters.shape),
                         "dtype": "float32<"}, separators=(",", ":")).encode()
    body = clusters.numpy().astype("<f4", copy=False).tobytes() + mask.numpy().astype(np.uint8).tobytes()
    return _LENGTH.pack(len(header)) + header + body


def decode_state(data: bytes, model_version: str, sid_table_version: str,
                 shape: tuple[int, int]) -> tuple[DMQNState, str]:
    """Bytes of :func:`encode_state` -> ``(state, history_version)``; raises :class:`StateFormatError` naming the
    mismatch for bytes of another model version, SID table version or shape, or truncated / foreign bytes."""
    try:
        (n,) = _LENGTH.unpack_from(data)
        header = json.loads(data[_LENGTH.size:_LENGTH.size + n])
        found = tuple(header["shape"])
        versions = (header["model_version"], header["sid_table_version"])
        history_version = str(header["history_version"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise StateFormatError(f"not a torchrec-sid user state ({type(e).__name__}: {e})") from None
    if versions != (model_version, sid_table_version):
        raise StateFormatError(f"state of model {versions[0]} / SID table {versions[1]}, this scorer serves model "
                               f"{model_version} / SID table {sid_table_version}")
    if found != tuple(shape) or header.get("dtype") != "float32<":
        raise StateFormatError(f"state shape {list(found)} {header.get('dtype')}, expected {list(shape)} float32<")
    m, d = shape
    body = data[_LENGTH.size + n:]
    if len(body) != 4 * m * d + m:
        raise StateFormatError(f"state body is {len(body)} bytes, expected {4 * m * d + m} for shape {list(shape)}")
    clusters = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=m * d).astype(np.float32).reshape(m, d))
    mask = torch.from_numpy(np.frombuffer(body, dtype=np.uint8, offset=4 * m * d).copy()).bool()
    return DMQNState(clusters, mask), history_version


class RedisStateStore:
    """A :class:`~torchrec_sid.modules.UserStateCache` in Redis, keyed by ``(user, history_version)``.

    Args:
        url: e.g. ``redis://127.0.0.1:6379/0``.
        model_version, sid_table_version: of the artifact served (from its manifest); part of every key.
        state_shape: ``[M, d]`` of a state (the manifest's ``state_shape``).
        ttl_seconds: expiry of a state; every write renews it.
        prefix: first part of every key.
        socket_timeout: seconds a Redis call may take before it counts as a failure.
        retry_after: seconds without Redis calls after a failure.
        check: ping at construction and raise ``ConnectionError`` naming the URL when Redis does not answer.

    ``stats()``: ``hits``, ``misses`` (no state, or one of an older history), ``rejected`` (a value of another
    version or shape under the key), ``fallbacks`` (Redis unreachable: the state is computed instead),
    ``write_failures``.
    """

    def __init__(self, url: str, model_version: str, sid_table_version: str, state_shape: tuple[int, int] | list[int],
                 ttl_seconds: int = 7 * 24 * 3600, prefix: str = "tsid", socket_timeout: float = 0.25,
                 retry_after: float = 0.5, check: bool = True) -> None:
        import redis  # the `serve` extra

        if ttl_seconds <= 0:
            raise ValueError(f"RedisStateStore: ttl_seconds must be positive, got {ttl_seconds}")
        m, d = (int(x) for x in state_shape)
        self.url, self.ttl_seconds, self.retry_after = url, ttl_seconds, retry_after
        self.model_version, self.sid_table_version, self.shape = model_version, sid_table_version, (m, d)
        self.prefix = f"{prefix}:{model_version}:{sid_table_version}:"
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                            retry_on_timeout=False)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("hits", "misses", "rejected", "fallbacks", "write_failures"), 0)
        if check:
            try:
                self._client.ping()
            except self._errors as e:
                raise ConnectionError(f"Redis at {url} does not answer ({type(e).__name__}: {e}); start "
                                      f"redis-server or pass another URL") from None

    def redis_key(self, user: Hashable) -> str:
        return f"{self.prefix}{user}"

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _failed(self, what: str, error: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            logger.warning("Redis %s failed (%s: %s); computing states for %.1f s", what, type(error).__name__,
                           error, self.retry_after)
        self._down_until = time.monotonic() + self.retry_after

    def get(self, key: Hashable) -> DMQNState | None:
        """The state of ``key = (user, history_version)``; None when absent, stale, foreign or Redis is down."""
        user, history_version = _split(key)
        if time.monotonic() < self._down_until:
            self._count("fallbacks")
            return None
        try:
            data = self._client.get(self.redis_key(user))
        except self._errors as e:
            self._failed("get", e)
            self._count("fallbacks")
            return None
        if data is None:
            self._count("misses")
            return None
        try:
            raw = data.encode() if isinstance(data, str) else bytes(data)
            state, stored_version = decode_state(raw, self.model_version, self.sid_table_version, self.shape)
        except StateFormatError as e:
            logger.warning("Redis key %s: %s; recomputing the state", self.redis_key(user), e)
            self._count("rejected")
            return None
        if stored_version != history_version:  # the history grew: recompute, then put() writes it back
            self._count("misses")
            return None
        self._count("hits")
        return state

    def put(self, key: Hashable, state: DMQNState) -> None:
        """Writes (or overwrites) the user's state with a fresh TTL; a Redis failure only counts."""
        user, history_version = _split(key)
        if time.monotonic() < self._down_until:
            self._count("write_failures")
            return
        data = encode_state(state, self.model_version, self.sid_table_version, history_version)
        try:
            self._client.set(self.redis_key(user), data, ex=self.ttl_seconds)
        except self._errors as e:
            self._failed("set", e)
            self._count("write_failures")

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)


def _split(key: Hashable) -> tuple[str, str]:
    if not isinstance(key, tuple) or len(key) != 2:
        raise ValueError(f"RedisStateStore: a key is (user, history_version), got {key!r}")
    return str(key[0]), str(key[1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throw-away ``redis-server`` on ``127.0.0.1:port`` (no persistence), for tests, benchmarks and the demo.

    Example::

        with RedisServer() as server:
            store = RedisStateStore(server.url, "model", "sids", (128, 32))
    """

    def __init__(self, port: int | None = None, executable: str = "redis-server") -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(f"{executable} is not installed (Debian: apt-get install -y redis-server; "
                                    f"`make setup` installs it when run as root)")
        self.executable, self.port = path, port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Starts the server and waits until it answers PING."""
        import redis

        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start: {err.strip()}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
