"""Memory and speed of the SID modules: SidFeatureTransform + EBC and SIDEmbedding vs a plain item-id EBC (CPU).

Memory: SIDE's parameters against a table over SID prefix n-grams at equal bits and dim (the SIDE paper's O(b·d)
vs O(exp(Cb)·d)): prefixes of 3 and 4 digits with 64 buckets per digit (64^3 and 64^4 rows). Counted exactly, and
measured (the modules' parameter bytes and the process's resident-memory growth) where the table fits in RAM.

Speed: forward + backward examples/s at batch ``--batch`` (4,096) with every example holding one candidate and a
history of L events (100 and 1,000), random item ids over ``--num-items`` items whose SIDs have 3 levels of 64:

- ``item-id EBC``: one table of ``--num-items`` rows for ``item_id`` and ``history_item_ids`` (sum-pooled);
- ``SID tokens EBC``: the EBC that SidFeatureTransform feeds (prefix n-grams of lengths 1, 2, 3: tables of 64,
  4,096 and 262,144 rows), on already transformed features;
- ``SidFeatureTransform``: the transform alone (no parameters, no backward);
- ``transform + EBC``: both, as a model runs them;
- ``SIDE pooled``: SIDEmbedding on packed SIDs of the same items, sum-pooled before projecting;
- ``SIDE per event``: one SIDE vector per event (what PMA reads), then sum-pooled.

Every EBC is sharded by DistributedModelParallel on a 1-process gloo group (table-wise, fbgemm TBE kernels with a
fused SGD step in backward), as in training; an unsharded EBC would compute dense gradients for whole tables. The
configurations are timed round-robin, ``--warmup`` rounds then ``--repeats`` rounds, and the median is reported;
the machine is shared, so the 1-minute load average is recorded. Goal: the transform adds at most 10% to the EBC
lookup it feeds (``SidFeatureTransform`` / ``SID tokens EBC``).

Prints tables and writes ``benchmarks/results/sid_modules.json`` (``sid_modules_quick.json`` with ``--quick``).
Run: ``.venv/bin/python benchmarks/sid_modules.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import format_table, stage, write_json
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.modules import SIDEmbedding, SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import pack_codes

BUCKETS = 64  # scalar buckets per digit, as in the SIDE paper's prefix-length experiment
LEVELS = 3
GOAL = 0.10  # the transform may add at most this fraction to the EBC it feeds
MAX_TABLE_SIZE = 2**20  # SidFeatureTransform's default: larger n-gram vocabularies are hashed into this many rows


# ------------------------------------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _measured_bytes(build: Callable[[], nn.Module]) -> dict[str, Any]:
    """Builds a module: its parameter bytes, the process's resident-memory growth, and the build time."""
    gc.collect()
    rss, start = _rss_bytes(), time.perf_counter()
    module = build()
    seconds = time.perf_counter() - start
    measured = {"param_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
                "rss_growth_bytes": _rss_bytes() - rss, "build_s": seconds}
    del module
    gc.collect()
    return measured


def memory_rows(dim: int, measure_limit_bytes: int) -> list[dict[str, Any]]:
    """SIDE vs a table over prefix n-grams of 3 and 4 digits of 64 buckets, counted and (where it fits) measured."""
    rows = []
    for length in (3, 4):
        radices = [BUCKETS] * length
        table_rows = BUCKETS**length
        row = {"prefix_length": length, "bits": length * int(math.log2(BUCKETS)), "dim": dim,
               "table_rows": table_rows, "table_params": table_rows * dim, "table_bytes": table_rows * dim * 4,
               "side_params": SIDEmbedding.num_parameters(radices, dim),
               "side_bytes": SIDEmbedding.num_parameters(radices, dim) * 4,
               "transform_rows": min(table_rows, MAX_TABLE_SIZE)}
        row["table_over_side"] = row["table_params"] / row["side_params"]
        side = _measured_bytes(lambda radices=radices: SIDEmbedding(radices, dim))
        row["side_measured_bytes"] = side["param_bytes"]
        if row["table_bytes"] <= measure_limit_bytes:
            config = EmbeddingBagConfig(num_embeddings=table_rows, embedding_dim=dim, name="prefix",
                                        feature_names=["prefix"])
            table = _measured_bytes(lambda config=config: EmbeddingBagCollection(tables=[config]))
            row |= {"table_measured_bytes": table["param_bytes"], "table_rss_growth_bytes": table["rss_growth_bytes"],
                    "table_build_s": table["build_s"]}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------- speed


def shard(ebc: EmbeddingBagCollection) -> nn.Module:
    """The EBC sharded table-wise on this 1-process group, fbgemm TBE kernels with a fused SGD step."""
    sharders = [EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01})]
    constraints = {c.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                   for c in ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints)
    plan = planner.plan(ebc, sharders)
    return DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    device=torch.device("cpu"), plan=plan, sharders=sharders)


class SpeedSetup:
    """The artifact, the modules and their inputs for one batch size; inputs are rebuilt per history length."""

    def __init__(self, num_items: int, batch_size: int, dim: int) -> None:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, BUCKETS, (num_items, LEVELS), generator=g)
        self.packed = pack_codes(codes, [BUCKETS] * LEVELS)  # item -> packed SID, as a pipeline would log it
        sids = SemanticIds(codes, [BUCKETS] * LEVELS, "benchmark", {})
        self.num_items, self.batch_size = num_items, batch_size
        self.transform = SidFeatureTransform(sids, ["item_id", "history_item_ids"], ngram_orders=[],
                                             prefix_lengths=[1, 2, 3])
        self.sid_ebc = shard(EmbeddingBagCollection(tables=self.transform.embedding_bag_configs(dim)))
        item_table = EmbeddingBagConfig(num_embeddings=num_items, embedding_dim=dim, name="item",
                                        feature_names=["item_id", "history_item_ids"])
        self.id_ebc = shard(EmbeddingBagCollection(tables=[item_table]))
        self.side = SIDEmbedding([BUCKETS] * LEVELS, dim)
        self.generator = g

    def features(self, length: int) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor, KeyedJaggedTensor]:
        """``(item ids, their SID tokens, their packed SIDs)`` for B candidates and B histories of ``length``."""
        b = self.batch_size
        items = torch.randint(0, self.num_items, (b * (1 + length),), generator=self.generator)
        lengths = torch.cat([torch.ones(b, dtype=torch.long), torch.full((b,), length)])
        ids = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "history_item_ids"], values=items, lengths=lengths)
        sids = KeyedJaggedTensor.from_lengths_sync(keys=["candidate_sid", "history_sids"], values=self.packed[items],
                                                   lengths=lengths)
        return ids, self.transform(ids), sids

    def steps(self, length: int) -> dict[str, Callable[[], None]]:
        """One forward (+ backward where there are parameters) per configuration."""
        ids, tokens, sids = self.features(length)

        def backward(out: Tensor) -> None:
            out.sum().backward()

        example_of_event = torch.arange(self.batch_size).repeat_interleave(length)

        def side_per_event() -> None:
            events = self.side.sequence(sids, "history_sids").values()  # [B * L, d]
            pooled = events.new_zeros(self.batch_size, events.size(1)).index_add(0, example_of_event, events)
            backward(torch.cat([self.side.pooled(sids, "candidate_sid"), pooled], dim=1))

        return {
            "item-id EBC": lambda: backward(self.id_ebc(ids).values()),
            "SID tokens EBC": lambda: backward(self.sid_ebc(tokens).values()),
            "SidFeatureTransform": lambda: self.transform(ids),
            "transform + EBC": lambda: backward(self.sid_ebc(self.transform(ids)).values()),
            "SIDE pooled": lambda: backward(torch.cat([self.side.pooled(sids, "candidate_sid"),
                                                      self.side.pooled(sids, "history_sids")], dim=1)),
            "SIDE per event": side_per_event,
        }


def round_robin(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Times every step once per round, so that load from other processes spreads over all of them."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def speed_rows(setup: SpeedSetup, lengths: list[int], warmup: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        steps = setup.steps(length)
        with stage(f"L={length}: {len(steps)} configurations x {warmup + repeats} rounds"):
            times = round_robin(steps, warmup, repeats)
        del steps
        for name, seconds in times.items():
            median = statistics.median(seconds)
            rows.append({"L": length, "method": name, "median_ms": median * 1e3, "min_ms": min(seconds) * 1e3,
                         "examples_per_s": setup.batch_size / median, "times_s": seconds})
        gc.collect()
    return rows


def goal(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per L: the transform's time over the EBC it feeds, and transform + EBC over the EBC alone.

    Medians of per-round ratios: the steps of one round run back to back, under the same load from other processes.
    """
    times = {(r["L"], r["method"]): r["times_s"] for r in rows}
    out = []
    for length in sorted({r["L"] for r in rows}):
        transform, ebc, both = (times[length, m] for m in ("SidFeatureTransform", "SID tokens EBC", "transform + EBC"))
        ratio = statistics.median(t / e for t, e in zip(transform, ebc, strict=True))
        out.append({"L": length, "transform_over_ebc": ratio, "met": ratio <= GOAL,
                    "transform_over_ebc_of_minima": min(transform) / min(ebc),
                    "end_to_end_over_ebc": statistics.median(b / e for b, e in zip(both, ebc, strict=True)) - 1})
    return out


# ------------------------------------------------------------------------------------------------------- main


def print_tables(memory: list[dict], speed: list[dict], goals: list[dict], args: argparse.Namespace,
                 load: tuple[float, float]) -> None:
    print()
    print(format_table(memory, [
        ("prefix_length", "prefix", None), ("bits", "bits", None), ("table_rows", "table rows", ","),
        ("table_params", "table params", ","), ("side_params", "SIDE params", ","),
        ("table_over_side", "table/SIDE", ",.0f"), ("table_measured_bytes", "table MB measured", ",.1f"),
        ("table_rss_growth_bytes", "RSS growth MB", ",.1f"), ("side_measured_bytes", "SIDE bytes measured", ","),
        ("transform_rows", f"transform rows (max {MAX_TABLE_SIZE:,})", ","),
    ], title=f"memory at d={args.dim}, {BUCKETS} buckets per digit (MB = 1e6 bytes; '-': not built, too large "
             f"for --measure-limit-gb={args.measure_limit_gb})"))
    print()
    print(format_table(speed, [("L", "L", None), ("method", "method", None), ("median_ms", "median ms", ".1f"),
                               ("min_ms", "min ms", ".1f"), ("examples_per_s", "examples/s", ",.0f")],
                       title=f"forward + backward, batch {args.batch}, d={args.dim}, {args.num_items:,} items, "
                             f"threads={args.threads}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
                             f"median of {args.repeats} rounds after {args.warmup}; 1-min load average before/after "
                             f"{load[0]:.2f}/{load[1]:.2f}"))
    print()
    for g in goals:
        print(f"goal at L={g['L']}: transform / the EBC it feeds = {g['transform_over_ebc']:.1%} (median of "
              f"per-round ratios; {g['transform_over_ebc_of_minima']:.1%} between minima) -> <= {GOAL:.0%} "
              f"{'met' if g['met'] else 'NOT met'}; transform + EBC vs EBC alone: {g['end_to_end_over_ebc']:+.1%}")


def _mb(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Byte columns in MB for printing."""
    keys = ("table_measured_bytes", "table_rss_growth_bytes")
    return [{k: (v / 1e6 if k in keys else v) for k, v in row.items()} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 512, 3 rounds, no table over 1 GB")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--num-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads stall on each other)")
    parser.add_argument("--measure-limit-gb", type=float, default=6.0,
                        help="build a table for the memory measurement only up to this size (and 1/3 of free RAM)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats, args.measure_limit_gb = 512, 3, min(args.measure_limit_gb, 1.0)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    limit = int(min(args.measure_limit_gb * 1e9, _available_bytes() / 3))
    with stage("memory"):
        memory = memory_rows(args.dim, limit)
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=0, world_size=1)
        try:
            with stage("setup (artifact, transform, sharded EBCs)"):
                setup = SpeedSetup(args.num_items, args.batch, args.dim)
            speed = speed_rows(setup, args.lengths, args.warmup, args.repeats)
        finally:
            dist.destroy_process_group()
    load = (load_before, os.getloadavg()[0])
    goals = goal(speed)
    print_tables(_mb(memory), speed, goals, args, load)
    path = write_json("sid_modules_quick" if args.quick else "sid_modules",
                      {"settings": vars(args), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                       "load_average_before_after": load, "memory": memory, "speed": speed, "goal": goals})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
