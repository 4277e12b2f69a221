"""Memory and speed of the SID modules: SidFeatureTransform + EBC and SIDEmbedding vs a plain item-id EBC.

Memory: SIDE's parameters against a table over SID prefix n-grams at equal bits and dim (the SIDE paper's O(b·d)
vs O(exp(Cb)·d)): prefixes of 3 and 4 digits with 64 buckets per digit (64^3 and 64^4 rows). Counted exactly, and
measured (the modules' parameter bytes and the process's resident-memory growth) where the table fits in RAM.
Built on the CPU whatever ``--device``. Also the bytes per item of SidFeatureTransform's one per-item buffer,
``item_tokens: [T, N]`` (int32), which every rank holds whole.

Speed: forward + backward examples/s at batch ``--batch`` (4,096) with every example holding one candidate and a
history of L events (100 and 1,000), random item ids over ``--num-items`` items whose SIDs have 3 levels of 64:

- ``item-id EBC``: one table of ``--num-items`` rows for ``item_id`` and ``history_item_ids`` (sum-pooled);
- ``SID tokens EBC``: the EBC that SidFeatureTransform feeds (prefix n-grams of lengths 1, 2, 3: tables of 64,
  4,096 and 262,144 rows), on already transformed features;
- ``SidFeatureTransform``: the transform alone (no parameters, no backward);
- ``transform + EBC``: both, as a model runs them;
- ``SIDE pooled``: SIDEmbedding on packed SIDs of the same items, sum-pooled before projecting;
- ``SIDE per event``: one SIDE vector per event (what PMA reads), then sum-pooled.

``--index-dtype`` (``both`` by default) times the item-id and SID-token arms with int64 item ids and lengths and
with int32 ones (TorchRec and fbgemm's TBE take int32 indices and offsets; the transform then writes int32 tokens,
half the bytes), interleaved in the same rounds: each EBC gets the dtype the transform outputs for that arm, so
each ratio compares like with like. Before timing, the int32 arm is checked against the int64 one: equal token ids
(after ``.long()``) and equal pooled outputs of both sharded EBCs. The SIDE arms read packed SIDs, int64 always.

Every EBC is sharded by DistributedModelParallel on a 1-process group (gloo on the CPU, nccl on a GPU; table-wise,
fbgemm TBE kernels with a fused SGD step in backward), as in training; an unsharded EBC would compute dense gradients
for whole tables. Modules and batches live on ``--device`` (``cpu``, or ``cuda``: timed with
``torch.cuda.synchronize`` around every step). The configurations are timed round-robin, ``--warmup`` rounds then
``--repeats`` rounds, and the medians of wall time and of the process's CPU time are reported (on a loaded shared
machine a short step's wall time is mostly waiting for a core; on a GPU the CPU time is the host's); the 1-minute
load average is recorded. Goal: the transform adds at most 10% to the EBC lookup it feeds (``SidFeatureTransform`` /
``SID tokens EBC`` of the same index dtype, median of per-round wall-time ratios; the CPU-time ratio is printed
beside it), one goal line per L and index dtype.

``THP_MEM_ALLOC_ENABLE=1`` is set (unless already set) before torch loads, as the ``torchrec-sid`` command does:
PyTorch's CPU allocator then backs allocations of >= 2 MB with transparent huge pages. The transform's output is a
fresh ``[T * B * L]`` tensor every call (131 MB at L = 1,000 with int64 ids); with 4 kB pages about 2/3 of the
transform's time was page faults. Run with ``THP_MEM_ALLOC_ENABLE=0`` for 4 kB pages (``_4k_pages`` is appended
to the JSON's name).

Prints tables and writes ``benchmarks/results/sid_modules.json`` (``sid_modules_quick.json`` with ``--quick``,
``_cuda`` appended on a GPU).
Run: ``.venv/bin/python benchmarks/sid_modules.py [--quick] [--device cuda] [--threads 1] [--index-dtype both]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# as the torchrec-sid command sets it before torch loads (torchrec_sid/cli.py): huge pages for allocations >= 2 MB;
# run with THP_MEM_ALLOC_ENABLE=0 for 4 kB pages
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
INDEX_DTYPES = {"int64": torch.int64, "int32": torch.int32}  # item ids and lengths of the id and token arms
MAX_TABLE_SIZE = 2**20  # SidFeatureTransform's default: larger n-gram vocabularies are hashed into this many rows
K = TypeVar("K")  # a timed configuration's key


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
        row: dict[str, Any] = {"prefix_length": length, "bits": length * int(math.log2(BUCKETS)), "dim": dim,
                               "table_rows": table_rows, "table_params": table_rows * dim,
                               "table_bytes": table_rows * dim * 4,
                               "side_params": SIDEmbedding.num_parameters(radices, dim),
                               "side_bytes": SIDEmbedding.num_parameters(radices, dim) * 4,
                               "transform_rows": min(table_rows, MAX_TABLE_SIZE)}
        row["table_over_side"] = row["table_params"] / row["side_params"]
        side = _measured_bytes(functools.partial(SIDEmbedding, radices, dim))
        row["side_measured_bytes"] = side["param_bytes"]
        if row["table_bytes"] <= measure_limit_bytes:
            config = EmbeddingBagConfig(num_embeddings=table_rows, embedding_dim=dim, name="prefix",
                                        feature_names=["prefix"])
            table = _measured_bytes(functools.partial(EmbeddingBagCollection, tables=[config]))
            row |= {"table_measured_bytes": table["param_bytes"], "table_rss_growth_bytes": table["rss_growth_bytes"],
                    "table_build_s": table["build_s"]}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------- speed


def shard(ebc: EmbeddingBagCollection, device: torch.device) -> nn.Module:
    """The EBC sharded table-wise on this 1-process group, on ``device``, fbgemm TBE kernels with a fused SGD step."""
    sharders = [EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01})]
    constraints = {c.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                   for c in ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device=device.type),
                                       constraints=constraints)
    plan = planner.plan(ebc, sharders)
    return DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    device=device, plan=plan, sharders=sharders)


class SpeedSetup:
    """The artifact, the modules (on ``device``) and their inputs for one batch size; inputs are rebuilt per history
    length, drawn on the CPU (seeded) and moved to ``device``."""

    def __init__(self, num_items: int, batch_size: int, dim: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, BUCKETS, (num_items, LEVELS), generator=g)
        self.packed = pack_codes(codes, [BUCKETS] * LEVELS)  # item -> packed SID, as a pipeline would log it
        sids = SemanticIds(codes, [BUCKETS] * LEVELS, "benchmark", {})
        self.num_items, self.batch_size, self.device = num_items, batch_size, device
        self.transform = SidFeatureTransform(sids, ["item_id", "history_item_ids"], ngram_orders=[],
                                             prefix_lengths=[1, 2, 3]).to(device)
        self.sid_ebc = shard(EmbeddingBagCollection(tables=self.transform.embedding_bag_configs(dim)), device)
        item_table = EmbeddingBagConfig(num_embeddings=num_items, embedding_dim=dim, name="item",
                                        feature_names=["item_id", "history_item_ids"])
        self.id_ebc = shard(EmbeddingBagCollection(tables=[item_table]), device)
        self.side = SIDEmbedding([BUCKETS] * LEVELS, dim).to(device)
        self.generator = g

    def transform_buffer(self) -> dict[str, Any]:
        """Bytes of the transform's per-item buffer ``item_tokens: [T, N]``, in all and per item."""
        tokens = self.transform.item_tokens
        nbytes = tokens.numel() * tokens.element_size()
        return {"shape": list(tokens.shape), "dtype": str(tokens.dtype), "bytes": nbytes,
                "bytes_per_item": nbytes / self.num_items}

    def features(self, length: int, dtypes: list[str]) -> tuple[dict[str, KeyedJaggedTensor], KeyedJaggedTensor]:
        """``({dtype: item ids}, packed SIDs)`` for B candidates and B histories of ``length``: the same items in
        every index dtype of ``dtypes`` (values and lengths of that dtype); packed SIDs int64."""
        b = self.batch_size
        items = torch.randint(0, self.num_items, (b * (1 + length),), generator=self.generator)
        lengths = torch.cat([torch.ones(b, dtype=torch.long), torch.full((b,), length)])
        ids = {dtype: KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history_item_ids"], values=items.to(self.device, INDEX_DTYPES[dtype]),
            lengths=lengths.to(self.device, INDEX_DTYPES[dtype])) for dtype in dtypes}
        sids = KeyedJaggedTensor.from_lengths_sync(keys=["candidate_sid", "history_sids"],
                                                   values=self.packed[items].to(self.device),
                                                   lengths=lengths.to(self.device))
        return ids, sids

    def check_int32(self, ids: dict[str, KeyedJaggedTensor]) -> dict[str, Any]:
        """The int32 arm against the int64 one on the same items: the transform's output dtype and token ids
        (equal after ``.long()``), and the pooled outputs of both sharded EBCs (forward only: no fused SGD step).
        Raises AssertionError on a difference."""
        wide, narrow = self.transform(ids["int64"]), self.transform(ids["int32"])
        assert narrow.values().dtype == narrow.lengths().dtype == torch.int32, narrow.values().dtype
        assert narrow.keys() == wide.keys()
        assert torch.equal(narrow.values().long(), wide.values()), "int32 token ids differ from the int64 ones"
        assert torch.equal(narrow.lengths().long(), wide.lengths().long())
        out: dict[str, Any] = {"tokens_equal": True, "token_values": narrow.values().numel()}
        with torch.no_grad():
            for name, ebc, (a, b) in (("sid_ebc", self.sid_ebc, (narrow, wide)),
                                      ("id_ebc", self.id_ebc, (ids["int32"], ids["int64"]))):
                pooled32, pooled64 = ebc(a).values(), ebc(b).values()
                torch.testing.assert_close(pooled32, pooled64, rtol=0, atol=0)
                out[f"{name}_pooled_max_abs_diff"] = float((pooled32 - pooled64).abs().max())
        return out

    def steps(self, length: int, dtypes: list[str]) -> tuple[dict[tuple[str, str], Callable[[], None]],
                                                               dict[str, Any] | None]:
        """One forward (+ backward where there are parameters) per configuration and index dtype, keyed
        ``(method, dtype)``, the dtypes of one method side by side; and the int32 check (None without both)."""
        ids, sids = self.features(length, dtypes)
        check = self.check_int32(ids) if len(ids) == 2 else None
        tokens = {dtype: self.transform(kjt) for dtype, kjt in ids.items()}

        def backward(out: Tensor) -> None:
            out.sum().backward()

        example_of_event = torch.arange(self.batch_size, device=self.device).repeat_interleave(length)

        def side_per_event() -> None:
            events = self.side.sequence(sids, "history_sids").values()  # [B * L, d]
            pooled = events.new_zeros(self.batch_size, events.size(1)).index_add(0, example_of_event, events)
            backward(torch.cat([self.side.pooled(sids, "candidate_sid"), pooled], dim=1))

        per_dtype: dict[str, Callable[[str], Callable[[], None]]] = {
            "item-id EBC": lambda d: lambda: backward(self.id_ebc(ids[d]).values()),
            "SID tokens EBC": lambda d: lambda: backward(self.sid_ebc(tokens[d]).values()),
            "SidFeatureTransform": lambda d: lambda: self.transform(ids[d]),
            "transform + EBC": lambda d: lambda: backward(self.sid_ebc(self.transform(ids[d])).values()),
        }
        steps = {(method, d): make(d) for method, make in per_dtype.items() for d in dtypes}
        steps[("SIDE pooled", "int64")] = lambda: backward(torch.cat([self.side.pooled(sids, "candidate_sid"),
                                                                     self.side.pooled(sids, "history_sids")], dim=1))
        steps[("SIDE per event", "int64")] = side_per_event
        return steps, check


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[K, Callable[[], None]], warmup: int, repeats: int,
                device: torch.device) -> tuple[dict[K, list[float]], dict[K, list[float]]]:
    """Times every step once per round, so that load from other processes spreads over all of them; on a GPU each
    step is timed from an idle device to the end of its last kernel. Returns ``(wall, cpu)`` seconds per step: the
    process's CPU time as well, since on a loaded shared machine a short step's wall time is mostly waiting for a
    core (with one torch thread, CPU time is the step's own work)."""
    wall: dict[K, list[float]] = {name: [] for name in steps}
    cpu: dict[K, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def speed_rows(setup: SpeedSetup, lengths: list[int], warmup: int, repeats: int,
               dtypes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Timing rows per ``(L, method, index_dtype)``, and per L the int32 check (with both dtypes)."""
    rows, checks = [], []
    for length in lengths:
        steps, check = setup.steps(length, dtypes)
        if check is not None:
            checks.append({"L": length} | check)
        with stage(f"L={length}: {len(steps)} configurations x {warmup + repeats} rounds"):
            times, cpu_times = round_robin(steps, warmup, repeats, setup.device)
        del steps
        for (name, dtype), seconds in times.items():
            median = statistics.median(seconds)
            rows.append({"L": length, "method": name, "index_dtype": dtype, "median_ms": median * 1e3,
                         "min_ms": min(seconds) * 1e3, "cpu_median_ms": statistics.median(cpu_times[name, dtype]) * 1e3,
                         "examples_per_s": setup.batch_size / median, "times_s": seconds,
                         "cpu_times_s": cpu_times[name, dtype]})
        gc.collect()
    return rows, checks


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios ``numerators[i] / denominators[i]``."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def goal(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per L and index dtype: the transform's time over the EBC it feeds (of that dtype), and transform + EBC over
    the EBC alone; for int32, also its transform and transform + EBC over the int64 ones (CPU times).

    Medians of per-round ratios: the steps of one round run back to back, under the same load from other processes.
    Of wall times (the goal) and of CPU times (steadier on a loaded machine).
    """
    times = {(r["L"], r["method"], r["index_dtype"]): r["times_s"] for r in rows}
    cpu = {(r["L"], r["method"], r["index_dtype"]): r["cpu_times_s"] for r in rows}
    out = []
    for length, dtype in sorted({(r["L"], r["index_dtype"]) for r in rows if r["method"] == "SidFeatureTransform"},
                                key=lambda key: (key[0], list(INDEX_DTYPES).index(key[1]))):
        transform, ebc, both = ((length, method, dtype)
                                for method in ("SidFeatureTransform", "SID tokens EBC", "transform + EBC"))
        ratio = median_ratio(times[transform], times[ebc])
        row = {"L": length, "index_dtype": dtype, "transform_over_ebc": ratio, "met": ratio <= GOAL,
               "transform_over_ebc_of_minima": min(times[transform]) / min(times[ebc]),
               "transform_over_ebc_cpu": median_ratio(cpu[transform], cpu[ebc]),
               "end_to_end_over_ebc": median_ratio(times[both], times[ebc]) - 1,
               "end_to_end_over_ebc_cpu": median_ratio(cpu[both], cpu[ebc]) - 1}
        wide = (length, "SidFeatureTransform", "int64"), (length, "transform + EBC", "int64")
        if dtype == "int32" and wide[0] in cpu:
            row |= {"transform_over_int64_cpu": median_ratio(cpu[transform], cpu[wide[0]]),
                    "end_to_end_over_int64_cpu": median_ratio(cpu[both], cpu[wide[1]])}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------- main


def print_tables(memory: list[dict], speed: list[dict], goals: list[dict], args: argparse.Namespace,
                 load: tuple[float, float], buffer: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    print()
    print(format_table(memory, [
        ("prefix_length", "prefix", None), ("bits", "bits", None), ("table_rows", "table rows", ","),
        ("table_params", "table params", ","), ("side_params", "SIDE params", ","),
        ("table_over_side", "table/SIDE", ",.0f"), ("table_measured_bytes", "table MB measured", ",.1f"),
        ("table_rss_growth_bytes", "RSS growth MB", ",.1f"), ("side_measured_bytes", "SIDE bytes measured", ","),
        ("transform_rows", f"transform rows (max {MAX_TABLE_SIZE:,})", ","),
    ], title=f"memory at d={args.dim}, {BUCKETS} buckets per digit (MB = 1e6 bytes; '-': not built, too large "
             f"for --measure-limit-gb={args.measure_limit_gb})"))
    print(f"SidFeatureTransform per-item buffer item_tokens {buffer['shape']} {buffer['dtype']}: "
          f"{buffer['bytes'] / 1e6:,.1f} MB, {buffer['bytes_per_item']:.1f} bytes per item (on every rank)")
    print()
    print(format_table(speed, [("L", "L", None), ("method", "method", None), ("index_dtype", "ids", None),
                               ("median_ms", "median ms", ".1f"),
                               ("min_ms", "min ms", ".1f"), ("cpu_median_ms", "CPU median ms", ".1f"),
                               ("examples_per_s", "examples/s", ",.0f")],
                       title=f"forward + backward, batch {args.batch}, d={args.dim}, {args.num_items:,} items, "
                             f"device={args.device}, threads={args.threads}, "
                             f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
                             f"median of {args.repeats} rounds after {args.warmup}; 1-min load average before/after "
                             f"{load[0]:.2f}/{load[1]:.2f}"))
    print()
    for c in checks:
        print(f"int32 check at L={c['L']}: int32 token ids equal the int64 ones ({c['token_values']:,} values); "
              f"sharded EBC pooled outputs, int32 vs int64 KJTs: max |diff| {c['sid_ebc_pooled_max_abs_diff']:g} "
              f"(SID tokens), {c['id_ebc_pooled_max_abs_diff']:g} (item ids)")
    for g in goals:
        print(f"goal at L={g['L']}, {g['index_dtype']} ids: transform / the EBC it feeds = "
              f"{g['transform_over_ebc']:.1%} (median of per-round ratios; "
              f"{g['transform_over_ebc_of_minima']:.1%} between minima; of CPU times "
              f"{g['transform_over_ebc_cpu']:.1%}) -> <= {GOAL:.0%} {'met' if g['met'] else 'NOT met'}; "
              f"transform + EBC vs EBC alone: {g['end_to_end_over_ebc']:+.1%} "
              f"(CPU {g['end_to_end_over_ebc_cpu']:+.1%})")
        if "transform_over_int64_cpu" in g:
            print(f"  int32 vs int64 ids at L={g['L']} (CPU times, median of per-round ratios): transform "
                  f"{g['transform_over_int64_cpu']:.2f}x, transform + EBC {g['end_to_end_over_int64_cpu']:.2f}x")


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
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: modules, batches and timing on the GPU")
    parser.add_argument("--index-dtype", choices=[*INDEX_DTYPES, "both"], default="both",
                        help="item ids and lengths of the id and SID-token arms (both: the two, interleaved)")
    parser.add_argument("--measure-limit-gb", type=float, default=6.0,
                        help="build a table for the memory measurement only up to this size (and 1/3 of free RAM)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats, args.measure_limit_gb = 512, 3, min(args.measure_limit_gb, 1.0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    limit = int(min(args.measure_limit_gb * 1e9, _available_bytes() / 3))
    with stage("memory"):
        memory = memory_rows(args.dim, limit)
    with tempfile.TemporaryDirectory() as folder:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{folder}/init", rank=0, world_size=1)
        try:
            with stage("setup (artifact, transform, sharded EBCs)"):
                setup = SpeedSetup(args.num_items, args.batch, args.dim, device)
            dtypes = list(INDEX_DTYPES) if args.index_dtype == "both" else [args.index_dtype]
            speed, checks = speed_rows(setup, args.lengths, args.warmup, args.repeats, dtypes)
        finally:
            dist.destroy_process_group()
    load = (load_before, os.getloadavg()[0])
    goals, buffer = goal(speed), setup.transform_buffer()
    print_tables(_mb(memory), speed, goals, args, load, buffer, checks)
    name = (("sid_modules_quick" if args.quick else "sid_modules") + ("_cuda" if device.type == "cuda" else "")
            + ("_4k_pages" if os.environ["THP_MEM_ALLOC_ENABLE"] == "0" else ""))
    path = write_json(name, {"settings": vars(args), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                             "load_average_before_after": load, "memory": memory, "transform_buffer": buffer,
                             "speed": speed, "int32_check": checks, "goal": goals})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
