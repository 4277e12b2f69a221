"""Serving load test: cached DMQN, uncached DMQN and DIN behind ``torchrec-sid serve`` on localhost.

For each ranker (an exported SidDLRM with id + SID-token items, d = 32, max_history = 10,000; random weights, as
latency does not depend on training) and each history length L in (1,000, 10,000): 256 candidates per request, p50
/ p99 latency and requests/s at concurrency 1, 8 and 32, and the state-cache hit ratio from the server's counters.
Cached DMQN keeps user states in a real redis-server; its cache is warmed with one request per user before the
timed requests (which then only hit). One extra run of cached DMQN (L = 1,000, concurrency 8, 15% of requests add
an event to the user's history, so they miss and write back) stops Redis and starts it again midway: it reports
failed requests (must be 0) and the fallbacks (requests whose state was computed because Redis was down).

Bounded: each cell stops issuing requests after ``--seconds`` or ``--requests`` (whichever first) and waits for
the ones in flight; the whole run takes about 5 minutes on 2 shared cores. Server: one process, 2 torch threads,
one model call at a time (``--max-concurrent 1``), so concurrency shows as queueing.

``--device cuda``: ``torchrec-sid serve`` and the exported programs have no GPU path (the artifact runs where it was
exported, on the CPU), so the rankers are exported and served on the CPU either way; a cuda run only writes its
results to ``serving_cuda[_quick].json``, so that a GPU machine's run keeps the CPU results.

    .venv/bin/python benchmarks/serving.py            # table + benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import add_device_argument, device_facts, resolve_device

from torchrec_sid.models.configs import FeatureSchema, ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import SidDLRM
from torchrec_sid.serving.export import export_ranker
from torchrec_sid.serving.store import RedisServer, free_port
from torchrec_sid.sid import SemanticIds

RESULTS = Path(__file__).parent / "results" / "serving.json"
NUM_ITEMS, DIM, MAX_HISTORY, CANDIDATES = 20_000, 32, 10_000, 256
LENGTHS = (1_000, 10_000)
CONCURRENCY = (1, 8, 32)


def build(block: str, seed: int = 0) -> tuple[SidDLRM, SemanticIds]:
    g = torch.Generator().manual_seed(seed)
    sids = SemanticIds(torch.randint(0, 32, (NUM_ITEMS, 3), generator=g), [32, 32, 32], "random", {"seed": seed})
    schema = FeatureSchema({"user_id": 1000, "genre": 20}, 4, NUM_ITEMS, "item_id", "history_item_ids",
                           "history_timestamps", "timestamp")
    config = ModelConfig(embedding_dim=DIM, item_representation=("id", "sid"), sid_tokens=SidTokenConfig(),
                         history_block=block, max_history=MAX_HISTORY)
    torch.manual_seed(seed)
    return SidDLRM.from_config(config, schema, sids).eval(), sids


def bodies(length: int, users: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    now = 1_700_000_000
    out = []
    for u in range(users):
        out.append({"user": f"u{length}-{u}", "history": rng.integers(0, NUM_ITEMS, length).tolist(),
                    "history_timestamps": np.sort(rng.integers(now - 10**8, now, length)).tolist(), "timestamp": now,
                    "candidates": rng.integers(0, NUM_ITEMS, CANDIDATES).tolist(),
                    "dense": rng.standard_normal(4).round(3).tolist(), "features": {"user_id": [u], "genre": [u % 20]}})
    return out


class Server:
    """``torchrec-sid serve`` in a subprocess."""

    def __init__(self, artifact: Path, *args: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "torchrec_sid", "serve", "--artifact", str(artifact), "--port",
                   str(self.port), "--threads", "2", "--max-concurrent", "1", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if "serving" not in line:
            self.process.kill()
            raise RuntimeError(f"torchrec-sid serve did not start: {line!r}")

    def get(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("GET", path)
        out = json.loads(conn.getresponse().read())
        conn.close()
        return out

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def load(port: int, payloads: list[bytes], concurrency: int, seconds: float, max_requests: int,
         grow: float = 0.0, seed: int = 0, during: Any = None) -> dict[str, Any]:
    """``concurrency`` client threads with keep-alive connections send ``payloads`` round robin until the time or
    count bound; returns latencies and failures. ``grow``: probability that a request appends an event first."""
    latencies: list[float] = []
    failures: list[str] = []
    caches: dict[str, int] = {}
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + seconds
    grown: dict[int, dict[str, Any]] = {}

    def next_payload(rng: np.random.Generator) -> bytes | None:
        with lock:
            if issued[0] >= max_requests or time.perf_counter() > deadline:
                return None
            i = issued[0] % len(payloads)
            issued[0] += 1
            if grow and rng.random() < grow:  # the user's history gets one more (newest) event
                body = grown.setdefault(i, json.loads(payloads[i]))
                body["history"].append(int(rng.integers(0, NUM_ITEMS)))
                body["history_timestamps"].append(body["history_timestamps"][-1] + 1)
                body["timestamp"] = body["history_timestamps"][-1] + 1
                return json.dumps(body).encode()
            return json.dumps(grown[i]).encode() if i in grown else payloads[i]

    def worker(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while (payload := next_payload(rng)) is not None:
            start = time.perf_counter()
            try:
                conn.request("POST", "/score", payload, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                cache = json.loads(data)["cache"]
                with lock:
                    latencies.append(elapsed)
                    caches[cache] = caches.get(cache, 0) + 1
            except Exception as e:  # noqa: BLE001  (every failure is counted and reported)
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5],
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "requests_per_s": len(latencies) / wall, "seconds": wall, "cache_outcomes": caches}


def bounds(block: str, length: int, concurrency: int, seconds: float) -> tuple[float, int]:
    """(seconds, max requests) of a cell: DIN at L = 10,000 takes seconds per request, so it gets one wave."""
    if block == "din" and length >= 10_000:
        return seconds, max(3, concurrency)
    return seconds, 2000


def run_cells(name: str, server: Server, length: int, payloads: list[bytes], seconds: float,
              block: str) -> list[dict[str, Any]]:
    rows = []
    for concurrency in CONCURRENCY:
        before = server.get("/stats")
        cell_seconds, max_requests = bounds(block, length, concurrency, seconds)
        result = load(server.port, payloads, concurrency, cell_seconds, max_requests, seed=concurrency)
        after = server.get("/stats")
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        result.update(ranker=name, history_length=length, concurrency=concurrency,
                      hit_ratio=hits / (hits + misses) if hits + misses else None)
        print(f"  {name:13s} L={length:>6,} c={concurrency:>2}: p50 {result['p50_ms']:9.1f} ms  p99 "
              f"{result['p99_ms']:9.1f} ms  {result['requests_per_s']:7.1f} req/s  n={result['requests']}  "
              f"failed={result['failed']}  hit ratio {result['hit_ratio']}", flush=True)
        rows.append(result)
    return rows


def outage(artifact: Path, redis: RedisServer, payloads: list[bytes], seconds: float) -> dict[str, Any]:
    """Cached DMQN with history growth; Redis is stopped at 1/4 of the run and started again at 1/2."""
    server = Server(artifact, "--redis", redis.url)
    try:
        for body in payloads:  # warm
            load(server.port, [body], 1, 60, 1)
        before = server.get("/stats")

        def chaos() -> None:
            time.sleep(seconds / 4)
            redis.stop()
            time.sleep(seconds / 4)
            redis.start()

        result = load(server.port, payloads, 8, seconds, 100_000, grow=0.15, seed=7, during=chaos)
        after = server.get("/stats")
    finally:
        server.stop()
    store = {k: after["store"][k] - before["store"][k] for k in after["store"]}
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    result.update(ranker="dmqn_cached", history_length=LENGTHS[0], concurrency=8, redis_restarted=True,
                  fallbacks=store["fallbacks"], store=store,
                  hit_ratio=hits / (hits + misses) if hits + misses else None)
    print(f"  outage run: {result['requests']} requests, failed {result['failed']}, fallbacks {store['fallbacks']}, "
          f"write failures {store['write_failures']}, hit ratio {result['hit_ratio']:.3f}, store {store}", flush=True)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ranker | L | concurrency | p50 ms | p99 ms | req/s | requests | failed | hit ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        hit = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
        lines.append(f"| {r['ranker']} | {r['history_length']:,} | {r['concurrency']} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['requests_per_s']:.1f} | {r['requests']} | {r['failed']} | {hit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="time bound of a cell (default 6)")
    parser.add_argument("--users", type=int, default=32, help="distinct users per history length (default 32)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s cells, 4 users, L = 200 and 2,000")
    add_device_argument(parser, "torchrec-sid serve has no GPU path: the rankers are served on the CPU either way, "
                                "a cuda run writes serving_cuda[_quick].json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    global LENGTHS
    if device.type == "cuda":
        args.out = args.out.with_stem(args.out.stem + "_cuda")
    if args.quick:
        args.seconds, args.users, LENGTHS = 1.0, 4, (200, 2000)
        args.out = args.out.with_stem(args.out.stem + "_quick")
    started = time.perf_counter()
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    exports = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        artifacts = {}
        for block in ("dmqn", "din"):
            model, sids = build(block)
            t = time.perf_counter()
            artifacts[block] = Path(tmp) / f"{block}.pt2"
            export_ranker(model, artifacts[block], semantic_ids=sids)
            exports[block] = round(time.perf_counter() - t, 2)
        payloads = {length: [json.dumps(b).encode() for b in bodies(length, args.users, seed=length)]
                    for length in LENGTHS}
        for name, block, extra in (("dmqn_cached", "dmqn", ("--redis", redis.url)),
                                   ("dmqn_uncached", "dmqn", ("--no-cache",)), ("din", "din", ())):
            print(f"{name}:", flush=True)
            server = Server(artifacts[block], *extra)
            try:
                for length in LENGTHS:
                    if name == "dmqn_cached":  # one request per user fills the cache (untimed)
                        for body in payloads[length]:
                            load(server.port, [body], 1, 600, 1)
                    else:
                        load(server.port, payloads[length][:1], 1, 600, 1)  # first call of the programs
                    rows += run_cells(name, server, length, payloads[length], args.seconds, block)
            finally:
                server.stop()
        print("outage:", flush=True)
        restarted = outage(artifacts["dmqn"], redis, payloads[LENGTHS[0]][:16], seconds=4.0 if args.quick else 12.0)
    p99 = {(r["ranker"], r["history_length"], r["concurrency"]): r["p99_ms"] for r in rows}
    checks = {}
    short, long = LENGTHS
    for c in CONCURRENCY:
        cached_1k, cached_10k, din_10k = (p99[("dmqn_cached", short, c)], p99[("dmqn_cached", long, c)],
                                          p99[("din", long, c)])
        checks[f"concurrency_{c}"] = {
            "cached_p99_10k_over_1k": cached_10k / cached_1k, "within_2x": cached_10k <= 2 * cached_1k,
            "din_p99_10k_over_cached_p99_10k": din_10k / cached_10k, "at_least_10x": din_10k >= 10 * cached_10k}
    print(table(rows))
    print(json.dumps(checks, indent=1))
    result = {
        "command": "python benchmarks/serving.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with 3 other engineers' jobs (timings are "
                   f"noisy and pessimistic)",
        "torch": torch.__version__,
        **device_facts(device), "computed_on": "cpu",
        "setup": {"num_items": NUM_ITEMS, "embedding_dim": DIM, "max_history": MAX_HISTORY, "candidates": CANDIDATES,
                  "item_representation": ["id", "sid"], "users_per_length": args.users,
                  "cell_seconds": args.seconds, "server": "torchrec-sid serve, 2 torch threads, --max-concurrent 1",
                  "dmqn": "defaults: 4 codebooks x 32 codewords, 2 HSTU layers; DIN: attention MLP (80, 40)",
                  "cache": "dmqn_cached: Redis, warmed with one request per user before the timed requests",
                  "export_seconds": exports},
        "rows": rows,
        "redis_restart": restarted,
        "checks": checks,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
