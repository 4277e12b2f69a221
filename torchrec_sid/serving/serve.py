"""``torchrec-sid serve``: load an artifact, choose the user-state store, run the HTTP endpoint until stopped."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from torchrec_sid.modules.dmqn import UserStateCache
from torchrec_sid.serving.artifact import RankerArtifact
from torchrec_sid.serving.http import make_server
from torchrec_sid.serving.scorer import Scorer
from torchrec_sid.serving.store import RedisServer, RedisStateStore

logger = logging.getLogger(__name__)


def build_store(artifact: RankerArtifact, redis_url: str | None, redis_fallback: bool = False,
                state_ttl: int = 7 * 24 * 3600) -> UserStateCache | None:
    """The Redis store for ``redis_url`` (None: the scorer's in-process LRU). Redis not answering raises
    ``ConnectionError`` naming the URL, unless ``redis_fallback`` (then states are computed until it answers)."""
    if redis_url is None or not artifact.stateful:
        return None
    m = artifact.manifest
    return RedisStateStore(redis_url, m["model_version"], m["sid_table_version"], m["state_shape"],
                           ttl_seconds=state_ttl, check=not redis_fallback)


def serve(artifact_path: str | Path, host: str = "127.0.0.1", port: int = 8080, redis_url: str | None = None,
          start_redis: bool = False, redis_fallback: bool = False, state_ttl: int = 7 * 24 * 3600,
          cache: bool = True, max_concurrent: int = 2) -> None:
    """Serves ``artifact_path`` on ``host:port`` until SIGINT / SIGTERM; prints the URL and the store when ready.

    ``start_redis`` starts a local ``redis-server`` (on the port of ``redis_url``, or a free one) and stops it on
    exit.
    """
    artifact = RankerArtifact.load(artifact_path)
    redis_server = None
    if start_redis:
        port_of_url = int(redis_url.rsplit(":", 1)[1].split("/")[0]) if redis_url else None
        redis_server = RedisServer(port_of_url).start()
        redis_url = redis_server.url
    try:
        store = build_store(artifact, redis_url, redis_fallback, state_ttl)
        scorer = Scorer(artifact, store=store, cache=cache, max_concurrent=max_concurrent)
        server = make_server(scorer, host, port)

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        m = artifact.manifest
        where = ("no store (every state computed)" if artifact.stateful and not cache
                 else f"Redis {redis_url}" if store is not None
                 else "in-process LRU" if artifact.stateful else "no user state (not DMQN)")
        print(f"serving {artifact_path} ({m['history_block']}, model {m['model_version']}, SID table "
              f"{m['sid_table_version']}) on {server.url}; user states: {where}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            logger.info("stopping")
        finally:
            server.server_close()
    finally:
        if redis_server is not None:
            redis_server.stop()
