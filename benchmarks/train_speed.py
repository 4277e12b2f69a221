"""Training throughput of the item representations (issue 15): examples/s of forward + backward + optimizer step,
each arm as a ratio to id-only on the same data and model.

The train job's path: the model is built by ``train/loop.build_model`` (DLRM, DIN history over the last 50 events
as ``examples/movielens_hist_din.yaml``, d = 32), sharded by ``loop.shard`` (DistributedModelParallel on a
1-process gloo group, nccl with ``--device cuda``; tables trained by fused row-wise Adagrad, the rest by Adam) and
trained through ``pipeline.train_pipeline`` (TrainPipelineSparseDist). Data: MovieLens-100k-shaped synthetic
interactions (1,682 items, 943 users, clicked histories of 20-200 events, 100 samples a user), batches of 512.

Arms (item representation of the candidate and of every history event):

=================== =========================================================================================
``id``              the id table; each distinct history item looked up once per batch and gathered back
``id per-event``    the id table, one lookup per history event (the id-only path before issue 15)
``id hashed``       the id table hashed into ``--id-buckets`` rows (``model.id_buckets``)
``id+sid``          id + SID n-gram tokens (per level and the 2- and 3-level prefixes of RQ-KMeans 3 x 64 SIDs,
                    the demo's ``sid_tokens``) looked up from the item ids (SidFeatureTransform)
``id+sid codes``    the same tokens from SID code features the batch carries (``model.sid_features``,
                    SidCodeTransform)
``id+side``         id + SIDE of DPCA SIDs (15 ternary digits, ``examples/movielens_side.yaml``'s quantizer)
``side``            SIDE alone
=================== =========================================================================================

Timing: every arm keeps its own model, optimizer and pipeline; the arms run round-robin (each round one
``train_steps`` call of ``--steps`` batches per arm, the start arm rotating), ``--warmup`` rounds untimed, then
``--repeats`` timed rounds; examples/s is the median over rounds, and each round's ratio to ``id`` is taken within
that round (the median of those is reported too). Batches are built once, before timing. ``--profile`` adds a
torch.profiler breakdown of one round per arm (top ops by self time). The machine is shared: the 1-minute load
average is recorded before and after.

``--per-event`` adds, for every other arm too, its peer with the history looked up per event (the paths before
issue 15's distinct-item lookups), so the speed-up of each path is measured in the same run.

Goals: ``id+sid`` >= 0.75x id-only, ``side`` (and ``id+side``) >= 0.9x id-only.

Prints a table and writes ``benchmarks/results/train_speed.json`` (``train_speed_cuda.json`` on cuda). Run:
``.venv/bin/python benchmarks/train_speed.py [--device cuda] [--threads 2] [--per-event] [--profile]``; ``--quick``
(id, id+sid, side; 5 rounds of 2 steps; nothing written) is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# as the torchrec-sid command sets it before torch loads (torchrec_sid/cli.py): huge pages for allocations >= 2 MB;
# run with THP_MEM_ALLOC_ENABLE=0 for 4 kB pages
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist
from common import (
    add_device_argument,
    device_facts,
    distributed_backend,
    format_table,
    resolve_device,
    result_name,
    stage,
    synchronize,
    write_json,
)
from torchrec.datasets.utils import Batch

from torchrec_sid.data.batches import CtrBatches, InteractionData
from torchrec_sid.data.synthetic import SyntheticConfig, generate
from torchrec_sid.models.configs import ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import SidDLRM
from torchrec_sid.quantizers.base import build_quantizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.versions import SidTable
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import build_model, shard
from torchrec_sid.train.pipeline import SidDLRMTrain, describe, train_pipeline, train_steps

GOALS = {"id+sid": 0.75, "id+sid codes": 0.75, "side": 0.9, "id+side": 0.9}
ML100K_SHAPE = {"num_items": 1682, "num_users": 943, "num_categories": 19, "min_history": 20, "max_history": 200,
                "samples_per_user": 100}
BASE_MODEL = {"embedding_dim": 32, "history_block": "din", "history_options": {"attention_hidden_dims": [64, 32]},
              "max_history": 50, "dense_layers": (64,), "over_layers": (128, 64)}
SID_TOKENS = SidTokenConfig(ngram_orders=(1,), prefix_lengths=(2, 3), num_levels=3, max_table_size=16384)


@dataclass(frozen=True)
class Arm:
    """One item representation: its model config, which SIDs it reads, whether the batch carries SID codes, and
    whether the id-only history is looked up per event (the reference arm)."""

    name: str
    model: ModelConfig
    sids: str | None = None  # "rq_kmeans" (token tables) or "dpca" (SIDE)
    codes: bool = False
    per_event: bool = False


def arms(id_buckets: int) -> list[Arm]:
    def config(**fields: Any) -> ModelConfig:
        return ModelConfig(**{**BASE_MODEL, **fields})

    return [
        Arm("id", config(item_representation=("id",))),
        Arm("id per-event", config(item_representation=("id",)), per_event=True),
        Arm("id hashed", config(item_representation=("id",), id_buckets=id_buckets)),
        Arm("id+sid", config(item_representation=("id", "sid"), sid_tokens=SID_TOKENS), sids="rq_kmeans"),
        Arm("id+sid codes", config(item_representation=("id", "sid"), sid_tokens=SID_TOKENS, sid_features=True),
            sids="rq_kmeans", codes=True),
        Arm("id+side", config(item_representation=("id", "side")), sids="dpca"),
        Arm("side", config(item_representation=("side",)), sids="dpca"),
    ]


# ----------------------------------------------------------------------------------------------------------- setup


def make_data(seed: int) -> InteractionData:
    """MovieLens-100k-shaped synthetic interactions, with the long-tail split the train job adds."""
    return generate(SyntheticConfig(**ML100K_SHAPE, seed=seed)).interactions.with_long_tail()


def fit_sids(data_seed: int, folder: Path) -> dict[str, Path]:
    """RQ-KMeans 3 x 64 SIDs with a collision suffix (token tables) and DPCA 3 x 5 ternary SIDs (SIDE) of the
    synthetic items' content, saved under ``folder``; ``{kind: path}``."""
    content = generate(SyntheticConfig(**ML100K_SHAPE, seed=data_seed)).content.float()
    rq = build_quantizer("rq_kmeans", levels=3, codebook_size=64, max_iter=10, seed=0).fit(content)
    dpca = build_quantizer("dpca", groups=3, depth=5, latent_dim=48, max_epochs=10, seed=0).fit(content)
    paths = {"rq_kmeans": folder / "rq_kmeans.safetensors", "dpca": folder / "dpca.safetensors"}
    rq.semantic_ids(content).with_collision_suffix().save(paths["rq_kmeans"])
    dpca.semantic_ids(content).save(paths["dpca"])
    return paths


def init_group(device: torch.device) -> None:
    """A 1-process group (gloo on CPU, nccl on CUDA), as the train job makes outside torchrun."""
    if not dist.is_initialized():
        dist.init_process_group(distributed_backend(device), store=dist.HashStore(), rank=0, world_size=1)


def per_event_history(model: SidDLRM) -> None:
    """The path before issue 15's distinct lookups: the item arch looks every history event up (tables, SIDE), as
    ``ItemArch(..., distinct_history=False)`` with a transform without ``distinct_features`` (the model config has
    no setting for it)."""
    item_arch = model.item_arch
    if item_arch.transform is not None:
        item_arch.transform.distinct_features = []
    item_arch.distinct = None
    item_arch.distinct_tables = item_arch.distinct_history = False


@dataclass
class Trainer:
    """One arm's sharded model, its pipeline and its batches (cycled)."""

    arm: Arm
    pipeline: Any
    batches: list[Batch]
    pipelined: dict[str, Any]
    position: int = 0

    def next_batches(self, steps: int) -> list[Batch]:
        out = [self.batches[(self.position + i) % len(self.batches)] for i in range(steps)]
        self.position += steps
        return out


def build_trainer(arm: Arm, data: InteractionData, sid_paths: dict[str, Path], device: torch.device,
                  batch_size: int, num_batches: int) -> Trainer:
    config = TrainConfig(name=arm.name, data="synthetic", semantic_ids=str(sid_paths[arm.sids]) if arm.sids else None,
                         model=arm.model, batch_size=batch_size, seed=0)
    model = build_model(config, data, None)
    if arm.per_event:
        per_event_history(model)
    dmp, optimizer = shard(SidDLRMTrain(model), config, 1, device)
    pipeline = train_pipeline(dmp, optimizer, device)
    codes = SidTable.from_semantic_ids(SemanticIds.load(sid_paths[arm.sids])) if arm.codes and arm.sids else None
    source = CtrBatches(data, "train", batch_size, max_history=arm.model.max_history, shuffle=True, seed=0,
                        drop_last=True, sid_codes=codes)
    batches = list(itertools.islice(iter(source), num_batches))
    for _ in train_steps(pipeline, iter(batches[:2])):  # traces the model: the pipelined modules are known after
        pass
    return Trainer(arm, pipeline, batches, describe(pipeline))


# ---------------------------------------------------------------------------------------------------------- timing


def timed_round(trainer: Trainer, steps: int, device: torch.device) -> tuple[float, float]:
    """Trains ``steps`` batches; ``(seconds, last loss)``, the device synchronised at both ends."""
    batches = trainer.next_batches(steps)
    synchronize(device)
    start = time.perf_counter()
    losses = [loss for (loss, _, _), _ in train_steps(trainer.pipeline, iter(batches))]
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, float(losses[-1]) if losses else float("nan")


def run_rounds(trainers: Sequence[Trainer], steps: int, warmup: int, repeats: int, batch_size: int,
               device: torch.device) -> dict[str, dict[str, Any]]:
    """Round-robin rounds (the start arm rotates); per arm the examples/s of every timed round and the ratio to
    ``id`` within each round."""
    rates: dict[str, list[float]] = {t.arm.name: [] for t in trainers}
    losses: dict[str, float] = {}
    for round_ in range(warmup + repeats):
        k = round_ % len(trainers)
        for trainer in [*trainers[k:], *trainers[:k]]:
            seconds, loss = timed_round(trainer, steps, device)
            losses[trainer.arm.name] = loss
            if round_ >= warmup:
                rates[trainer.arm.name].append(steps * batch_size / seconds)
    base = rates["id"]
    out = {}
    for name, values in rates.items():
        per_round = [v / b for v, b in zip(values, base, strict=True)]
        out[name] = {"examples_per_s": statistics.median(values), "examples_per_s_rounds": values,
                     "ratio_to_id": statistics.median(values) / statistics.median(base),
                     "ratio_to_id_per_round_median": statistics.median(per_round),
                     "ratio_to_id_per_event": statistics.median(values) / statistics.median(rates["id per-event"])
                     if "id per-event" in rates else None,
                     "last_loss": losses[name]}
    return out


def profile_round(trainer: Trainer, steps: int, device: torch.device, top: int) -> list[dict[str, Any]]:
    """torch.profiler over one round of ``trainer``: the ``top`` ops by self time (CPU, or the GPU's on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed_round(trainer, steps, device)

    def self_us(event: Any) -> float:
        return float(event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total)

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    return [{"op": e.key, "self_ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total if total else 0.0,
             "calls_per_step": e.count / steps} for e in events[:top]]


# ---------------------------------------------------------------------------------------------------------- report


def print_profiles(profiles: dict[str, list[dict[str, Any]]]) -> None:
    for name, rows in profiles.items():
        print(format_table(rows, [("op", "op", None), ("self_ms_per_step", "self ms/step", ".2f"),
                                  ("share", "share", ".1%"), ("calls_per_step", "calls/step", ".0f")],
                           title=f"\nprofile: {name} (top ops by self time)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="batches per arm per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (medians over these)")
    parser.add_argument("--id-buckets", type=int, default=1024, help="rows of the hashed id table")
    parser.add_argument("--arms", nargs="*", help="a subset of the arms (id is always run)")
    parser.add_argument("--per-event", action="store_true", help="add every arm's per-event history peer")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown per arm")
    parser.add_argument("--top", type=int, default=12, help="ops per arm in the profile")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 arms, 5 rounds of 2 steps, not written")
    args = parser.parse_args()
    if args.quick:
        args.arms, args.steps, args.warmup, args.repeats = ["id+sid", "side"], 2, 1, 5
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 (medians over repeats), got {args.repeats}")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    selected = [a for a in arms(args.id_buckets) if args.arms is None or a.name in {"id", *args.arms}]
    if args.per_event:
        selected += [dataclasses.replace(a, name=f"{a.name} per-event", per_event=True) for a in selected
                     if not a.per_event and a.name != "id"]
    unknown = set(args.arms or ()) - {a.name for a in arms(args.id_buckets)}
    if unknown:
        parser.error(f"--arms: unknown arm(s) {sorted(unknown)}; known: {[a.name for a in arms(args.id_buckets)]}")
    load_before = os.getloadavg()[0]
    init_group(device)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        with stage("data and SIDs (RQ-KMeans 3 x 64, DPCA 15 ternary digits)"):
            data = make_data(args.seed)
            sid_paths = fit_sids(args.seed, Path(tmp))
        trainers = []
        for arm in selected:
            with stage(f"build, shard and trace {arm.name}"):
                trainers.append(build_trainer(arm, data, sid_paths, device, args.batch_size,
                                              num_batches=args.steps * 4))
    with stage(f"{args.warmup} + {args.repeats} rounds of {args.steps} steps x {len(trainers)} arms"):
        results = run_rounds(trainers, args.steps, args.warmup, args.repeats, args.batch_size, device)
    profiles = ({t.arm.name: profile_round(t, args.steps, device, args.top) for t in trainers}
                if args.profile else {})
    load_after = os.getloadavg()[0]
    rows = [{"arm": name, **r, "goal": GOALS.get(name), "pipeline": t.pipelined["class"],
             "pipelined_inputs": ", ".join(t.pipelined["pipelined_inputs"]) or "-"}
            for name, r in results.items() for t in trainers if t.arm.name == name]
    print(format_table(rows, [("arm", "arm", None), ("examples_per_s", "examples/s", ",.0f"),
                              ("ratio_to_id", "x id", ".3f"), ("ratio_to_id_per_round_median", "x id (rounds)", ".3f"),
                              ("ratio_to_id_per_event", "x id per-event", ".3f"), ("goal", "goal", ".2f"),
                              ("pipeline", "pipeline", None), ("pipelined_inputs", "pipelined inputs", None)],
                       title=f"\ntraining examples/s, {args.device}, {args.threads} threads, batch {args.batch_size}, "
                             f"median of {args.repeats} rounds x {args.steps} steps (load average {load_before:.2f} "
                             f"-> {load_after:.2f})"))
    print_profiles(profiles)
    if args.quick:
        return
    path = write_json(result_name("train_speed", device), {
        "benchmark": "train_speed", "settings": vars(args), "device": device_facts(device),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "data": {**ML100K_SHAPE, "seed": args.seed},
        "model": {**BASE_MODEL, "sid_tokens": dataclasses.asdict(SID_TOKENS)},
        "load_average_1m": {"before": load_before, "after": load_after}, "goals": GOALS, "results": results,
        "pipelines": {t.arm.name: t.pipelined for t in trainers}, "profiles": profiles})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
