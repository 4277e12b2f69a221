"""Latency and throughput of the long-history blocks vs history length L (CPU, inference).

Two scenarios, random inputs (D=64). Blocks at their defaults: DMQN with N=4 codebooks of W=32 codewords (128
clusters), D'=32, 2 HSTU layers; DIN's / SIM's / CTAM's activation unit (80, 40); SIM keeps the 200 most recent
events sharing the candidate's key (20 distinct keys).

- ``one_user``: one user's history of L events, ``--candidates`` candidates (the ranking request). DMQN full
  encodes the user once and scores every candidate; DMQN cached reads the user's state from a warm
  :class:`~torchrec_sid.modules.LRUStateCache` and scores (online cost); DIN, SIM and pooling run their
  ``forward`` on the history repeated per candidate (a view), as a DLRM batch feeds them.
- ``batch``: ``--batch`` users with one candidate each (a training / scoring batch); DMQN cached scores
  pre-encoded states.

Each cell is the median over ``--repeats`` timed calls (more for fast calls, up to ``--min-seconds``) after
``--warmup`` calls. Prints a table and writes
``benchmarks/results/long_sequence.json``. Run: ``.venv/bin/python benchmarks/long_sequence.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from torchrec_sid.modules import DIN, DMQN, SIM, CachedDMQN, LRUStateCache, MeanPooling, UserHistory

D = 64
NUM_KEYS = 20  # distinct genres / SID prefixes for SIM's hard search
RESULTS = Path(__file__).parent / "results" / "long_sequence.json"
FLAT_TOLERANCE = 1.5  # DMQN cached at the longest L vs the shortest: "flat" if at most this ratio


def _inputs(users: int, length: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "history": torch.randn(users, length, D, generator=g),
        "mask": torch.ones(users, length, dtype=torch.bool),
        "history_timestamps": torch.randint(0, 10**8, (users, length), generator=g).sort(dim=1).values,
        "history_keys": torch.randint(0, NUM_KEYS, (users, length), generator=g),
    }


def _median_ms(fn: Callable[[], Tensor], warmup: int, repeats: int, min_seconds: float) -> float:
    """Median over at least ``repeats`` timed calls, more (up to 100) for fast calls until ``min_seconds``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _one_user(models: dict, length: int, candidates: int) -> dict[str, Callable[[], Tensor]]:
    user = _inputs(1, length, seed=length)
    cands = torch.randn(1, candidates, D)
    cand_keys = torch.randint(0, NUM_KEYS, (candidates,))
    per_candidate = {k: v.expand(candidates, *v.shape[1:]) for k, v in user.items()}  # views, no copies
    dmqn, serving = models["dmqn"], models["serving"]
    serving.user_states([("user", length)], lambda rows: UserHistory(user["history"], user["mask"],
                                                                     user["history_timestamps"]))
    fns = {
        "dmqn_full": lambda: dmqn.score(dmqn.encode_user(user["history"], user["mask"], user["history_timestamps"]),
                                        cands),
        "dmqn_cached": lambda: serving.score([("user", length)], cands, _never_loaded),
    }
    for name in ("din", "sim", "pooling"):
        fns[name] = partial(models[name], **per_candidate, candidate=cands[0], candidate_key=cand_keys)
    return fns


def _batch(models: dict, length: int, users: int) -> dict[str, Callable[[], Tensor]]:
    batch = _inputs(users, length, seed=length + 1)
    cands, cand_keys = torch.randn(users, D), torch.randint(0, NUM_KEYS, (users,))
    keys = [("batch user", u, length) for u in range(users)]
    models["serving"].user_states(keys, lambda rows: UserHistory(batch["history"], batch["mask"],
                                                                 batch["history_timestamps"]))
    fns = {"dmqn_full": lambda: models["dmqn"](**batch, candidate=cands),
           "dmqn_cached": lambda: models["serving"].score(keys, cands[:, None], _never_loaded)}
    for name in ("din", "sim", "pooling"):
        fns[name] = partial(models[name], **batch, candidate=cands, candidate_key=cand_keys)
    return fns


def _never_loaded(rows: list[int]) -> UserHistory:
    raise AssertionError(f"cache miss for rows {rows}: the benchmark warms the cache first")


def _warm_allocator() -> None:
    """Allocates and frees 31 MiB once, untimed: glibc then raises its mmap threshold and keeps freed memory,
    as in a long-running server, so that every cell (not only those after a large one) sees a warm allocator.
    Measured here: CTAM for 256 candidates takes ~14 ms cold and ~5 ms warm."""
    torch.empty(31 << 20, dtype=torch.uint8).fill_(0)


def _measure(args: argparse.Namespace) -> list[dict]:
    _warm_allocator()
    torch.manual_seed(0)
    dmqn = DMQN(D).eval()
    models = {"dmqn": dmqn, "serving": CachedDMQN(dmqn, LRUStateCache()), "din": DIN(D).eval(),
              "sim": SIM(D, top_k=args.sim_top_k).eval(), "pooling": MeanPooling(D).eval()}
    rows = []
    with torch.inference_mode():
        for scenario, (build, scored) in _scenarios(args).items():
            for length in args.lengths:
                for method, fn in build(models, length, scored).items():
                    ms = _median_ms(fn, args.warmup, args.repeats, args.min_seconds)
                    rows.append({"scenario": scenario, "method": method, "L": length, "scored": scored,
                                 "latency_ms": ms, "throughput_per_s": scored / ms * 1000})
                    print(f"{scenario:<9} L={length:<6} {method:<12} {ms:10.2f} ms", flush=True)
    return rows


def _scenarios(args: argparse.Namespace) -> dict[str, tuple[Callable, int]]:
    """Scenario name -> (builder of the timed calls, items scored per call)."""
    return {"one_user": (_one_user, args.candidates)} | ({"batch": (_batch, args.batch)} if args.batch else {})


def _latency(rows: list[dict], scenario: str, method: str, length: int) -> float:
    return next(r["latency_ms"] for r in rows if (r["scenario"], r["method"], r["L"]) == (scenario, method, length))


def _goal(rows: list[dict], lengths: list[int]) -> dict:
    """The issue's goal: DMQN cached >= 10x cheaper than DIN at the longest L, and flat in L."""
    longest, shortest = max(lengths), min(lengths)
    speedup = _latency(rows, "one_user", "din", longest) / _latency(rows, "one_user", "dmqn_cached", longest)
    growth = _latency(rows, "one_user", "dmqn_cached", longest) / _latency(rows, "one_user", "dmqn_cached", shortest)
    return {"L": longest, "din_over_dmqn_cached": speedup, "dmqn_cached_growth_from_shortest_L": growth,
            "met_10x_vs_din": speedup >= 10.0, "flat_in_L": growth <= FLAT_TOLERANCE}


def _print_table(rows: list[dict], args: argparse.Namespace, goal: dict, load: tuple[float, float]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nmedian latency ms (throughput: scored per second); D={D}, threads={args.threads}, "
          f"repeats>={args.repeats}, warmup={args.warmup}; 1-min load average before/after: "
          f"{load[0]:.2f}/{load[1]:.2f}")
    for scenario, (_, scored) in _scenarios(args).items():
        what = f"{scored} candidates, 1 user" if scenario == "one_user" else f"{scored} users, 1 candidate each"
        print(f"\n{scenario} ({what})\n{'L':>6} " + "".join(f"{m:>24}" for m in methods))
        for length in args.lengths:
            cells = [_latency(rows, scenario, m, length) for m in methods]
            print(f"{length:>6} " + "".join(f"{ms:10.2f} ({scored / ms * 1000:9.0f}/s)".rjust(24) for ms in cells))
    print(f"\ngoal at L={goal['L']}: DIN / DMQN cached = {goal['din_over_dmqn_cached']:.1f}x "
          f"(>= 10x: {goal['met_10x_vs_din']}); DMQN cached at L={goal['L']} vs L={min(args.lengths)}: "
          f"{goal['dmqn_cached_growth_from_shortest_L']:.2f}x (flat, <= {FLAT_TOLERANCE}x: {goal['flat_in_L']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="users in the batched scenario (0: skip it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="keep timing a fast cell this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sim-top-k", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes' load skews the timings: recorded with them
    rows = _measure(args)
    load = (load_before, os.getloadavg()[0])
    goal = _goal(rows, args.lengths)
    _print_table(rows, args, goal, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    environment = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_average_before_after": load, "embedding_dim": D}
    args.out.write_text(json.dumps({"settings": settings, "environment": environment, "goal": goal, "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
