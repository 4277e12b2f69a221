"""Latency and throughput of the long-history blocks vs history length L (inference; CPU, or CUDA with --device).

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
``--warmup`` calls; the methods of one (scenario, L) are timed round-robin, one call each in turn, so that load
from other processes falls on all of them alike. ``--baseline FILE`` adds ``dmqn_full_baseline``: the DMQN of
another version of ``torchrec_sid/modules/dmqn.py`` (e.g. ``git show 86c187f:torchrec_sid/modules/dmqn.py >
/tmp/dmqn_old.py``, the version before the eval-encoding speed-ups) with the same weights, checked to give the same
outputs, timed in the same rounds. ``--device cuda`` puts inputs and models on the GPU and synchronises it before
every clock reading (results in ``long_sequence_cuda.json``). ``--clock cpu`` times this process's CPU time instead
of the wall time: with ``--threads 1`` a measure that other processes on a shared machine disturb far less. Prints a
table and writes ``benchmarks/results/long_sequence.json``. Run:
``.venv/bin/python benchmarks/long_sequence.py [--device cuda] [--baseline /tmp/dmqn_old.py] [--threads 1 --clock
cpu]``.
"""

from __future__ import annotations

import os

# before torch starts its OpenMP runtime: idle threads sleep instead of spinning. On this shared 2-core machine, with
# other processes running, 2-thread calls made of many short parallel regions (DMQN's eval pooling) were otherwise
# 5-20x slower and erratic; see common.OMP_WAIT_NOTE
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import add_device_argument, device_facts, resolve_device, synchronize
from torch import Tensor, nn

from torchrec_sid.modules import DIN, DMQN, SIM, CachedDMQN, LRUStateCache, MeanPooling, UserHistory

D = 64
NUM_KEYS = 20  # distinct genres / SID prefixes for SIM's hard search
RESULTS = Path(__file__).parent / "results" / "long_sequence.json"
FLAT_TOLERANCE = 1.5  # DMQN cached at the longest L vs the shortest: "flat" if at most this ratio
BASELINE_SPEEDUP_GOAL = 5.0  # issue 15: uncached DMQN (batch, longest L) >= 5x faster than the pre-speed-up version


def _inputs(users: int, length: int, seed: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "history": torch.randn(users, length, D, generator=g),
        "mask": torch.ones(users, length, dtype=torch.bool),
        "history_timestamps": torch.randint(0, 10**8, (users, length), generator=g).sort(dim=1).values,
        "history_keys": torch.randint(0, NUM_KEYS, (users, length), generator=g),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def _candidates(shape: tuple[int, ...], seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Candidate embeddings ``[*shape, D]`` and SIM keys ``[shape[-1]]``, seeded, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    cands, keys = torch.randn(*shape, D, generator=g), torch.randint(0, NUM_KEYS, shape[-1:], generator=g)
    return cands.to(device), keys.to(device)


def _needs_more(times: list[float], repeats: int, min_seconds: float) -> bool:
    """At least ``repeats`` timed calls, more (up to 100) for fast calls until ``min_seconds``."""
    return len(times) < repeats or (sum(times) < min_seconds and len(times) < 100)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _round_robin_ms(fns: dict[str, Callable[[], Tensor]], warmup: int, repeats: int, min_seconds: float,
                    device: torch.device, clock: Callable[[], float]) -> dict[str, float]:
    """Median ms per method; rounds call each method that still needs samples once, in turn, the device
    synchronised before each clock reading."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while pending := [name for name in fns if _needs_more(times[name], repeats, min_seconds)]:
        for name in pending:
            synchronize(device)
            start = clock()
            fns[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _one_user(models: dict, length: int, candidates: int, device: torch.device) -> dict[str, Callable[[], Tensor]]:
    user = _inputs(1, length, seed=length, device=device)
    cands, cand_keys = _candidates((1, candidates), seed=length, device=device)
    per_candidate = {k: v.expand(candidates, *v.shape[1:]) for k, v in user.items()}  # views, no copies
    serving = models["serving"]
    serving.user_states([("user", length)], lambda rows: UserHistory(user["history"], user["mask"],
                                                                     user["history_timestamps"]))
    fns: dict[str, Callable[[], Tensor]] = {}
    for name, dmqn in _dmqn_versions(models).items():
        fns[name] = partial(_encode_and_score, dmqn, user, cands)
    fns["dmqn_cached"] = lambda: serving.score([("user", length)], cands, _never_loaded)
    for name in ("din", "sim", "pooling"):
        fns[name] = partial(models[name], **per_candidate, candidate=cands[0], candidate_key=cand_keys)
    return fns


def _encode_and_score(dmqn: Any, user: dict[str, Tensor], cands: Tensor) -> Tensor:
    return dmqn.score(dmqn.encode_user(user["history"], user["mask"], user["history_timestamps"]), cands)


def _batch(models: dict, length: int, users: int, device: torch.device) -> dict[str, Callable[[], Tensor]]:
    batch = _inputs(users, length, seed=length + 1, device=device)
    cands, cand_keys = _candidates((users,), seed=length + 1, device=device)
    keys = [("batch user", u, length) for u in range(users)]
    models["serving"].user_states(keys, lambda rows: UserHistory(batch["history"], batch["mask"],
                                                                 batch["history_timestamps"]))
    fns: dict[str, Callable[[], Tensor]] = {
        name: partial(dmqn, **batch, candidate=cands) for name, dmqn in _dmqn_versions(models).items()}
    fns["dmqn_cached"] = lambda: models["serving"].score(keys, cands[:, None], _never_loaded)
    for name in ("din", "sim", "pooling"):
        fns[name] = partial(models[name], **batch, candidate=cands, candidate_key=cand_keys)
    return fns


def _dmqn_versions(models: dict) -> dict[str, nn.Module]:
    """``dmqn_full`` and, with ``--baseline``, ``dmqn_full_baseline``."""
    return {"dmqn_full": models["dmqn"]} | ({"dmqn_full_baseline": models["baseline"]} if "baseline" in models else {})


def _load_baseline(path: Path, dmqn: DMQN, device: torch.device) -> tuple[nn.Module, float]:
    """The ``DMQN`` class of the file ``path`` with ``dmqn``'s weights, and the largest absolute difference of the
    two outputs on a small seeded batch; refuses a baseline whose outputs differ by more than 1e-4."""
    spec = importlib.util.spec_from_file_location("dmqn_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    baseline = module.DMQN(D).to(device).eval()
    baseline.load_state_dict(dmqn.state_dict())
    batch = _inputs(4, 300, seed=12345, device=device)
    batch["mask"][1, 100:] = False
    cands, _ = _candidates((4,), seed=12345, device=device)
    difference = (baseline(**batch, candidate=cands) - dmqn(**batch, candidate=cands)).abs().max().item()
    if not difference <= 1e-4:
        raise SystemExit(f"--baseline {path}: outputs differ from this version's by {difference:.3g} (limit 1e-4)")
    return baseline, difference


def _never_loaded(rows: list[int]) -> UserHistory:
    raise AssertionError(f"cache miss for rows {rows}: the benchmark warms the cache first")


def _warm_allocator() -> None:
    """Allocates and frees 31 MiB once, untimed: glibc then raises its mmap threshold and keeps freed memory,
    as in a long-running server, so that every cell (not only those after a large one) sees a warm allocator.
    Measured here: CTAM for 256 candidates takes ~14 ms cold and ~5 ms warm."""
    torch.empty(31 << 20, dtype=torch.uint8).fill_(0)


def _measure(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float | None]:
    """The rows of every (scenario, L, method) cell, and the baseline's largest output difference (None without
    ``--baseline``)."""
    _warm_allocator()
    torch.manual_seed(0)
    dmqn = DMQN(D).to(device).eval()
    models: dict[str, object] = {
        "dmqn": dmqn, "serving": CachedDMQN(dmqn, LRUStateCache()), "din": DIN(D).to(device).eval(),
        "sim": SIM(D, top_k=args.sim_top_k).to(device).eval(), "pooling": MeanPooling(D).to(device).eval()}
    rows, difference = [], None
    with torch.inference_mode():
        if args.baseline is not None:
            models["baseline"], difference = _load_baseline(args.baseline, dmqn, device)
        for scenario, (build, scored) in _scenarios(args).items():
            for length in args.lengths:
                cell = _round_robin_ms(build(models, length, scored, device), args.warmup, args.repeats,
                                       args.min_seconds, device, CLOCKS[args.clock])
                for method, ms in cell.items():
                    rows.append({"scenario": scenario, "method": method, "L": length, "scored": scored,
                                 "latency_ms": ms, "throughput_per_s": scored / ms * 1000})
                    print(f"{scenario:<9} L={length:<6} {method:<18} {ms:10.2f} ms", flush=True)
    return rows, difference


def _scenarios(args: argparse.Namespace) -> dict[str, tuple[Callable, int]]:
    """Scenario name -> (builder of the timed calls, items scored per call)."""
    return {"one_user": (_one_user, args.candidates)} | ({"batch": (_batch, args.batch)} if args.batch else {})


def _latency(rows: list[dict], scenario: str, method: str, length: int) -> float:
    return next(r["latency_ms"] for r in rows if (r["scenario"], r["method"], r["L"]) == (scenario, method, length))


def _goal(rows: list[dict], lengths: list[int]) -> dict:
    """The goals: DMQN cached >= 10x cheaper than DIN at the longest L, and flat in L; with a baseline, uncached
    DMQN (the batch scenario where run, else one user) >= 5x faster than it at the longest L."""
    longest, shortest = max(lengths), min(lengths)
    speedup = _latency(rows, "one_user", "din", longest) / _latency(rows, "one_user", "dmqn_cached", longest)
    growth = _latency(rows, "one_user", "dmqn_cached", longest) / _latency(rows, "one_user", "dmqn_cached", shortest)
    goal: dict[str, Any] = {"L": longest, "din_over_dmqn_cached": speedup, "dmqn_cached_growth_from_shortest_L": growth,
            "met_10x_vs_din": speedup >= 10.0, "flat_in_L": growth <= FLAT_TOLERANCE}
    if any(r["method"] == "dmqn_full_baseline" for r in rows):
        scenario = "batch" if any(r["scenario"] == "batch" for r in rows) else "one_user"
        ratio = (_latency(rows, scenario, "dmqn_full_baseline", longest)
                 / _latency(rows, scenario, "dmqn_full", longest))
        goal |= {"baseline_scenario": scenario, "baseline_over_dmqn_full": ratio,
                 f"met_{BASELINE_SPEEDUP_GOAL:g}x_vs_baseline": ratio >= BASELINE_SPEEDUP_GOAL}
    return goal


def _print_table(rows: list[dict], args: argparse.Namespace, goal: dict, load: tuple[float, float]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nmedian latency ms, {args.clock} clock (throughput: scored per second); device={args.device}, D={D}, "
          f"threads={args.threads}, repeats>={args.repeats}, warmup={args.warmup}, methods of a row timed "
          f"round-robin; 1-min load average before/after: {load[0]:.2f}/{load[1]:.2f}")
    for scenario, (_, scored) in _scenarios(args).items():
        what = f"{scored} candidates, 1 user" if scenario == "one_user" else f"{scored} users, 1 candidate each"
        print(f"\n{scenario} ({what})\n{'L':>6} " + "".join(f"{m:>24}" for m in methods))
        for length in args.lengths:
            cells = [_latency(rows, scenario, m, length) for m in methods]
            print(f"{length:>6} " + "".join(f"{ms:10.2f} ({scored / ms * 1000:9.0f}/s)".rjust(24) for ms in cells))
    print(f"\ngoal at L={goal['L']}: DIN / DMQN cached = {goal['din_over_dmqn_cached']:.1f}x "
          f"(>= 10x: {goal['met_10x_vs_din']}); DMQN cached at L={goal['L']} vs L={min(args.lengths)}: "
          f"{goal['dmqn_cached_growth_from_shortest_L']:.2f}x (flat, <= {FLAT_TOLERANCE}x: {goal['flat_in_L']})")
    if "baseline_over_dmqn_full" in goal:
        met = goal[f"met_{BASELINE_SPEEDUP_GOAL:g}x_vs_baseline"]
        print(f"goal at L={goal['L']} ({goal['baseline_scenario']}): DMQN full baseline / DMQN full = "
              f"{goal['baseline_over_dmqn_full']:.2f}x (>= {BASELINE_SPEEDUP_GOAL:g}x: {met})")


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
    parser.add_argument("--baseline", type=Path, help="a dmqn.py of another version whose DMQN is timed beside "
                        "this one (dmqn_full_baseline), e.g. git show 86c187f:torchrec_sid/modules/dmqn.py")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: this process's CPU time, which other processes' load inflates "
                             "far less than the wall time on a shared machine (meant for --threads 1, where no thread "
                             "spins waiting for another; CPU runs only)")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, help=f"result file (default {RESULTS}; with --device cuda "
                        f"{RESULTS.with_stem(RESULTS.stem + '_cuda')}; --quick: ..._quick.json, git-ignored)")
    parser.add_argument("--quick", action="store_true", help="smoke run: L = 100 and 1,000, 4 users in the batch "
                        "scenario, 1 timed call per cell")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.batch, args.repeats, args.min_seconds = [100, 1000], 4, 1, 0.0
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error(f"--clock cpu times CPU work only, not --device {args.device}")
    if args.out is None:
        args.out = RESULTS.with_stem(RESULTS.stem + ("_cuda" if device.type == "cuda" else "")
                                     + ("_quick" if args.quick else ""))
    load_before = os.getloadavg()[0]  # other processes' load skews the timings: recorded with them
    rows, difference = _measure(args, device)
    load = (load_before, os.getloadavg()[0])
    goal = _goal(rows, args.lengths)
    _print_table(rows, args, goal, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    environment = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_average_before_after": load, "embedding_dim": D, **device_facts(device),
                   "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                   "baseline_sha256": args.baseline and hashlib.sha256(args.baseline.read_bytes()).hexdigest(),
                   "baseline_max_abs_output_difference": difference}
    args.out.write_text(json.dumps({"settings": settings, "environment": environment, "goal": goal, "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
