"""Serving: the Redis user-state store (against a real redis-server started here), the Scorer's cache path and
its handling of bad input, the HTTP endpoint's 4xx answers, and ``torchrec-sid serve`` refusing a dead Redis."""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from tests.test_export import CASES, eager_logits, exported, request
from torchrec_sid.cli import main
from torchrec_sid.modules import DMQNState
from torchrec_sid.serving.artifact import RankerArtifact
from torchrec_sid.serving.http import ScoringServer, make_server
from torchrec_sid.serving.scorer import BadRequest, Scorer
from torchrec_sid.serving.store import (
    RedisServer,
    RedisStateStore,
    StateFormatError,
    decode_state,
    encode_state,
    free_port,
)

HISTORY, CANDIDATES = [3, 1, 4, 1, 5], [0, 5, 11, 3]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this module's own on a free localhost port, stopped at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def dmqn(tmp_path_factory: pytest.TempPathFactory):
    return exported(*CASES[0], tmp_path_factory.mktemp("artifacts"))  # DMQN over id + SID + SIDE + soft SID


def _store(server: RedisServer, artifact: RankerArtifact, **kwargs) -> RedisStateStore:
    m = artifact.manifest
    options = {"model_version": m["model_version"], "sid_table_version": m["sid_table_version"],
               "state_shape": m["state_shape"], **kwargs}
    return RedisStateStore(server.url, **options)


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def test_state_bytes_round_trip_and_refuse_other_versions_and_shapes() -> None:
    state = DMQNState(torch.randn(6, 8), torch.tensor([True, False] * 3))
    data = encode_state(state, "m1", "s1", "5-abc")
    decoded, version = decode_state(data, "m1", "s1", (6, 8))
    assert version == "5-abc" and torch.equal(decoded.clusters, state.clusters)
    assert torch.equal(decoded.mask, state.mask)
    for args, message in ((("m2", "s1", (6, 8)), "model m1"), (("m1", "s2", (6, 8)), "SID table s1"),
                          (("m1", "s1", (6, 4)), "shape"), ):
        with pytest.raises(StateFormatError, match=message):
            decode_state(data, *args)
    for bad in (b"", b"\x00\x00\x00\x05{not", data[:-3]):
        with pytest.raises(StateFormatError):
            decode_state(bad, "m1", "s1", (6, 8))


def test_redis_store_caches_and_writes_back_when_the_history_grows(redis_server, dmqn) -> None:
    model, artifact = dmqn
    store = _store(redis_server, artifact, ttl_seconds=600)
    scorer = Scorer(artifact, store=store)
    first = scorer.score("grow", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
    second = scorer.score("grow", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
    assert store.stats()["misses"] == 1 and store.stats()["hits"] == 1
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(second, torch.sigmoid(eager_logits(model, 2, HISTORY, CANDIDATES)), rtol=1e-5,
                               atol=1e-6)
    key = store.redis_key("grow")
    assert artifact.manifest["model_version"] in key and artifact.manifest["sid_table_version"] in key
    assert 0 < _client(redis_server).ttl(key) <= 600
    grown = [*HISTORY, 7]
    got = scorer.score("grow", grown, CANDIDATES, **request(2, grown, CANDIDATES))
    assert store.stats()["misses"] == 2  # the stored state is of the shorter history: recomputed, written back
    torch.testing.assert_close(got, torch.sigmoid(eager_logits(model, 2, grown, CANDIDATES)), rtol=1e-5, atol=1e-6)
    _, version = decode_state(_client(redis_server).get(key), store.model_version, store.sid_table_version,
                              store.shape)
    assert version.startswith(f"{len(grown)}-")
    scorer.score("grow", grown, CANDIDATES, **request(2, grown, CANDIDATES))
    assert store.stats()["hits"] == 2


def test_a_state_of_another_model_or_shape_is_never_read(redis_server, dmqn) -> None:
    model, artifact = dmqn
    ours = _store(redis_server, artifact)
    theirs = _store(redis_server, artifact, model_version="another-model")
    scorer = Scorer(artifact, store=ours)
    Scorer(artifact, store=theirs).score("u-version", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
    assert theirs.redis_key("u-version") != ours.redis_key("u-version")
    expected = torch.sigmoid(eager_logits(model, 2, HISTORY, CANDIDATES))
    torch.testing.assert_close(scorer.score("u-version", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES)),
                               expected, rtol=1e-5, atol=1e-6)
    assert ours.stats()["misses"] == 1  # their state was not read
    # a foreign value under our key (another model's header, a wrong shape, garbage): refused, recomputed, replaced
    m, d = ours.shape
    for value in (encode_state(DMQNState(torch.randn(m, d), torch.ones(m, dtype=torch.bool)), "another-model",
                               ours.sid_table_version, "x"),
                  encode_state(DMQNState(torch.randn(m + 1, d), torch.ones(m + 1, dtype=torch.bool)),
                               ours.model_version, ours.sid_table_version, "x"), b"garbage"):
        _client(redis_server).set(ours.redis_key("u-version"), value)
        got = scorer.score("u-version", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ours.stats()["rejected"] == 3


def test_requests_fall_back_to_computing_while_redis_is_down(dmqn) -> None:
    model, artifact = dmqn
    with RedisServer() as server:
        store = _store(server, artifact, retry_after=0.0)
        scorer = Scorer(artifact, store=store)
        expected = torch.sigmoid(eager_logits(model, 2, HISTORY, CANDIDATES))
        scorer.score("u-down", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
        server.stop()
        got = scorer.score("u-down", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert store.stats()["fallbacks"] == 1 and store.stats()["write_failures"] == 1
        server.start()  # empty again (no persistence): a miss, then written back and hit
        scorer.score("u-down", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
        scorer.score("u-down", HISTORY, CANDIDATES, **request(2, HISTORY, CANDIDATES))
        assert store.stats()["hits"] == 1 and store.stats()["misses"] == 2


def test_redis_unreachable_at_start_is_a_clear_error_or_an_explicit_fallback(dmqn, tmp_path: Path, capsys) -> None:
    _, artifact = dmqn
    url = f"redis://127.0.0.1:{free_port()}/0"
    m = artifact.manifest
    with pytest.raises(ConnectionError, match=f"Redis at {url} does not answer"):
        RedisStateStore(url, m["model_version"], m["sid_table_version"], m["state_shape"])
    store = RedisStateStore(url, m["model_version"], m["sid_table_version"], m["state_shape"], check=False)
    assert Scorer(artifact, store=store).score("u", HISTORY, CANDIDATES).shape == (4,)
    assert store.stats()["fallbacks"] == 1
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--artifact", str(artifact.path), "--redis", url, "--port", "0"])
    assert exit_.value.code == 2 and f"Redis at {url} does not answer" in capsys.readouterr().err


def test_bad_input_is_a_clear_error_or_a_documented_fallback(dmqn) -> None:
    model, artifact = dmqn
    scorer = Scorer(artifact)
    # an unknown user and an empty history: scored (a user without events)
    empty = scorer.score("never-seen", [], CANDIDATES, **request(2, [], CANDIDATES))
    torch.testing.assert_close(empty, torch.sigmoid(eager_logits(model, 2, [], CANDIDATES)), rtol=1e-5, atol=1e-6)
    for kwargs, message in (
        ({"candidates": [0, 12]}, r"candidates\[1\] = 12 is outside the SID table's items \[0, 12\)"),
        ({"candidates": [-1]}, r"candidates\[0\] = -1 is outside"),
        ({"history": [3, 99]}, r"history\[1\] = 99 is outside"),
        ({"candidates": []}, "'candidates' is empty"),
        ({"dense": [1.0]}, "'dense' must be 2 finite numbers"),
        ({"dense": [1.0, float("nan")]}, "'dense' must be 2 finite numbers"),
        ({"features": {"country": [1]}}, r"unknown pooled feature\(s\) \['country'\]"),
        ({"features": {"user_id": [9]}}, r"features\['user_id'\] id 9 is outside its table \[0, 5\)"),
        ({"features": {"genre": [[1], [2]]}}, "has 2 bags, one per candidate needs 4"),
        ({"history_timestamps": [1, 2]}, "'history_timestamps' has 2 values, 'history' 5"),
    ):
        inputs = {"history": HISTORY, "candidates": CANDIDATES, **kwargs}
        with pytest.raises(BadRequest, match=message):
            scorer.score("u", inputs.pop("history"), inputs.pop("candidates"), **inputs)


@pytest.fixture
def http_server(dmqn) -> Iterator[ScoringServer]:
    server = make_server(Scorer(dmqn[1]), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _call(server: ScoringServer, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_http_scores_json_and_answers_malformed_requests_with_4xx(http_server, dmqn) -> None:
    model, _ = dmqn
    body = {"user": 7, "history": HISTORY, "candidates": CANDIDATES, **request(2, HISTORY, CANDIDATES)}
    status, out = _call(http_server, "POST", "/score", json.dumps(body).encode())
    assert status == 200 and out["cache"] == "miss"
    torch.testing.assert_close(torch.tensor(out["scores"]), torch.sigmoid(eager_logits(model, 2, HISTORY, CANDIDATES)),
                               rtol=1e-5, atol=1e-6)
    assert _call(http_server, "POST", "/score", json.dumps(body).encode())[1]["cache"] == "hit"
    for raw, message in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object"),
                         (json.dumps({"user": 7, "history": [1]}).encode(), "missing field 'candidates'"),
                         (json.dumps({**body, "history": [1, "2"]}).encode(), "'history' must be a list of integers"),
                         (json.dumps({**body, "history": [1.5]}).encode(), "'history' must be a list of integers"),
                         (json.dumps({**body, "user": None}).encode(), "'user' must be"),
                         (json.dumps({**body, "extra": 1}).encode(), r"unknown field\(s\) \['extra'\]"),
                         (json.dumps({**body, "candidates": [100]}).encode(), "outside the SID table")):
        status, out = _call(http_server, "POST", "/score", raw)
        assert status == 400
        assert re.search(message, out["error"]), out["error"]
    assert _call(http_server, "POST", "/elsewhere", b"{}")[0] == 404
    assert _call(http_server, "GET", "/nothing")[0] == 404
    http_server.max_body_bytes = 10
    assert _call(http_server, "POST", "/score", json.dumps(body).encode())[0] == 413
    http_server.max_body_bytes = 1 << 20
    status, out = _call(http_server, "GET", "/health")  # still serving after every error
    assert status == 200 and out["status"] == "ok" and out["history_block"] == "DMQN"
    stats = _call(http_server, "GET", "/stats")[1]
    assert stats["hits"] == 1 and stats["misses"] == 1
