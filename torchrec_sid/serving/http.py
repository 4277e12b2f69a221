"""A small JSON-over-HTTP endpoint for a :class:`~torchrec_sid.serving.scorer.Scorer` (stdlib ``http.server``).

Routes:

- ``POST /score``: body :class:`~torchrec_sid.serving.scorer.ScoreRequest` as JSON -> ``{"scores": [C] click
  probabilities, "logits": [C], "cache": "hit" | "miss" | "none", "model_version", "sid_table_version"}``;
- ``GET /health``: ``{"status": "ok", "model_version", "sid_table_version", "history_block"}``;
- ``GET /stats``: the scorer's counters (hits, misses, hit ratio, the store's fallbacks...).

A malformed request gets a 4xx and ``{"error": message}``: 400 for a body that is not JSON or a request the
scorer refuses, 404 for another path, 411 without a Content-Length, 413 for a body over ``max_body_bytes``. An
unexpected failure answers 500 with the message and is logged; the server keeps serving.

Example::

    server = make_server(Scorer("ranker.pt2"), port=8080)
    server.serve_forever()  # curl -d '{"user": 7, "history": [3, 1], "candidates": [5, 9]}' localhost:8080/score
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from torchrec_sid.serving.scorer import BadRequest, Scorer, ScoreRequest

logger = logging.getLogger(__name__)

__all__ = ["ScoringServer", "make_server"]


class ScoringServer(ThreadingHTTPServer):
    """A threading HTTP server holding the scorer; each connection is served by its own thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], scorer: Scorer, max_body_bytes: int) -> None:
        super().__init__(address, _Handler)
        self.scorer, self.max_body_bytes = scorer, max_body_bytes

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: ScoringServer
    protocol_version = "HTTP/1.1"  # keep-alive: a load generator reuses its connections
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body go out at once, no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        logger.debug("%s - " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        manifest = self.server.scorer.artifact.manifest
        if self.path == "/health":
            self._send(200, {"status": "ok", "model_version": manifest["model_version"],
                             "sid_table_version": manifest["sid_table_version"],
                             "history_block": manifest["history_block"]})
        elif self.path == "/stats":
            self._send(200, self.server.scorer.stats())
        else:
            self._send(404, {"error": f"no route GET {self.path}; try POST /score, GET /health, GET /stats"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._drain()
            self._send(404, {"error": f"no route POST {self.path}; try POST /score"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._send(411, {"error": "POST /score needs a Content-Length header with the body's size in bytes"})
            return
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True
            self._send(413, {"error": f"body of {int(length)} bytes, at most {self.server.max_body_bytes}"})
            return
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._send(400, {"error": f"the body is not JSON: {e}"})
            return
        try:
            scorer = self.server.scorer
            result = scorer.score_request(ScoreRequest.from_json(body))
        except BadRequest as e:
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001  (one failed request must not stop the server)
            logger.exception("POST /score failed")
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        manifest = scorer.artifact.manifest
        logits = result.logits.float()
        self._send(200, {"scores": logits.sigmoid().tolist(), "logits": logits.tolist(), "cache": result.cache,
                         "model_version": manifest["model_version"],
                         "sid_table_version": manifest["sid_table_version"]})

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= self.server.max_body_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


def make_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 8080,
                max_body_bytes: int = 16 << 20) -> ScoringServer:
    """An HTTP server for ``scorer`` bound to ``host:port`` (port 0: any free one); call ``serve_forever()``."""
    return ScoringServer((host, port), scorer, max_body_bytes)
