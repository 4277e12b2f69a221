"""Training examples/s of the history blocks with fixed vs batch padding, on the synthetic long-history setting.

``HistoryArch`` pads a batch's histories to ``max_history`` (``model.pad_history: max``) or to the batch's longest
history (``batch``). On ``ranking_evidence.py``'s ``history_synthetic`` setting (its ``SYNTHETIC_LONG`` data: 200
users with 1,000-10,000 clicked events, ``max_history`` 10,000; its ``BASE_MODEL`` and ``HISTORY_ARMS``, id tables,
batches of 16 shuffled with seed 0), each block is built twice with the same weights, one per padding, and both
train on the same batches (BCE on the click label, Adam at 1e-3 over every parameter, eager and unsharded: the
history block is what differs). Two batchings (``--batching``) of the same samples: ``shuffled``, the train job's
batches (a batch pads to its longest of 16 random histories), and ``bucketed``, the samples grouped by history length
(what a length-bucketing sampler would give: a batch pads to about its own lengths). Steps alternate between the
two paddings, each in turn first, so that load from other processes falls on both alike; the first ``--warmup``
steps are untimed. Per batching and block: the median examples/s of each padding, the median of the per-step time
ratios (fixed / batch: the speed-up), the median padded length, the timed batches' mean history, and the largest
|logit difference| of the two models in eval mode on the first batch before training (the paddings give the same
outputs).

SIM's search key is the items' first SID level (RQ-KMeans, 3 levels of 32 codes, fitted on the synthetic content with
seed 0, as ``ranking_evidence.py`` fits seed 0's). ``--device cuda`` runs the models and batches on the GPU and
synchronises it before every clock reading (results in ``history_padding_cuda.json``). Prints a table and writes
``benchmarks/results/history_padding.json``. Run: ``.venv/bin/python benchmarks/history_padding.py --threads 1
[--device cuda] [--steps 5] [--blocks din dmqn]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the machine is shared

import argparse
import copy
import statistics
import time
from typing import Any

import numpy as np
import torch
from common import (
    add_device_argument,
    device_facts,
    format_table,
    resolve_device,
    result_name,
    set_threads,
    synchronize,
    write_json,
)
from ranking_evidence import BASE_MODEL, HISTORY_ARMS, HISTORY_TRAIN_SYNTHETIC, SYNTHETIC_LONG
from torchrec.datasets.utils import Batch

from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.data.synthetic import SyntheticConfig, generate
from torchrec_sid.models.dlrm import ModelConfig, SidDLRM
from torchrec_sid.models.factory import from_catalog
from torchrec_sid.sid import SemanticIds

PADDINGS = ("max", "batch")
BATCHINGS = ("shuffled", "bucketed")
SID_SETTINGS = {"levels": 3, "codebook_size": 32, "max_iter": 20, "seed": 0}


def semantic_ids(content: torch.Tensor) -> SemanticIds:
    """RQ-KMeans SIDs of the items' content ``[I, Dc]`` (SIM's search key is their first level)."""
    from torchrec_sid.quantizers.base import build_quantizer

    return build_quantizer("rq_kmeans", **SID_SETTINGS).fit(content, progress=False).semantic_ids(content)


def model_config(block: str, padding: str) -> ModelConfig:
    """The ``history_synthetic`` arm ``block`` (``ranking_evidence.py``'s settings) with ``pad_history=padding``."""
    settings: dict[str, Any] = {**BASE_MODEL, "item_representation": ("id",),
                                "max_history": SYNTHETIC_LONG["max_history"], **HISTORY_ARMS[block]}
    settings.update({name: tuple(settings[name]) for name in ("dense_layers", "over_layers")})
    return ModelConfig(**settings, pad_history=padding)


def twin_models(block: str, data: Any, sids: SemanticIds | None, device: torch.device) -> dict[str, SidDLRM]:
    """The block's model per padding, with the same initial weights."""
    torch.manual_seed(0)
    fixed = from_catalog(model_config(block, "max"), data.catalog, sids).to(device)
    batch = copy.deepcopy(fixed)
    assert batch.history_arch is not None
    batch.history_arch.pad_history = "batch"
    return {"max": fixed, "batch": batch}


def train_step(model: SidDLRM, optimizer: torch.optim.Optimizer, batch: Batch, device: torch.device) -> float:
    """One training step on ``batch``; its wall seconds (the device synchronised before reading the clock)."""
    synchronize(device)
    start = time.perf_counter()
    logits = model(batch.dense_features, batch.sparse_features)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def max_logit_difference(models: dict[str, SidDLRM], batch: Batch) -> float:
    """Largest |logit difference| of the two paddings on ``batch``, in eval mode."""
    with torch.no_grad():
        logits = [m.eval()(batch.dense_features, batch.sparse_features) for m in models.values()]
    for m in models.values():
        m.train()
    return float((logits[0] - logits[1]).abs().max())


def time_block(block: str, data: Any, sids: SemanticIds | None, batches: list[Batch], warmup: int,
               device: torch.device) -> dict[str, Any]:
    """Interleaved training steps of the block's two paddings over ``batches``; the table row."""
    models = twin_models(block, data, sids, device)
    difference = max_logit_difference(models, batches[0])
    optimizers = {p: torch.optim.Adam(m.parameters(), lr=1e-3) for p, m in models.items()}
    seconds: dict[str, list[float]] = {p: [] for p in PADDINGS}
    for step, batch in enumerate(batches):
        for padding in PADDINGS if step % 2 == 0 else PADDINGS[::-1]:
            elapsed = train_step(models[padding], optimizers[padding], batch, device)
            if step >= warmup:
                seconds[padding].append(elapsed)
    size = batches[0].labels.numel()
    lengths = [b.sparse_features["history_item_ids"].lengths() for b in batches[warmup:]]
    padded = [min(int(n.max()), SYNTHETIC_LONG["max_history"]) for n in lengths]
    return {"block": block, "steps": len(seconds["max"]),
            "max_examples_per_s": size / statistics.median(seconds["max"]),
            "batch_examples_per_s": size / statistics.median(seconds["batch"]),
            "speedup": statistics.median(f / b for f, b in zip(seconds["max"], seconds["batch"], strict=True)),
            "padded_length": statistics.median(padded), "mean_history": float(torch.cat(lengths).float().mean()),
            "max_abs_logit_diff": difference, "seconds": seconds}


def training_batches(data: Any, count: int, device: torch.device) -> dict[str, list[Batch]]:
    """``count`` training batches of the setting per batching, on ``device``: ``shuffled``, the samples in a seed-0
    permutation (the first batches of an epoch of the train job, shuffled with seed 0); ``bucketed``, the same
    samples sorted by history length and cut into batches (so a batch's lengths are alike), in a seed-0 order."""
    batches = CtrBatches(data, "train", HISTORY_TRAIN_SYNTHETIC["batch_size"],
                         max_history=SYNTHETIC_LONG["max_history"], shuffle=True, seed=0)
    size = batches.batch_size
    index = np.random.default_rng(0).permutation(len(batches.samples))[:count * size]
    by_length = index[np.argsort(batches.samples.history_lengths[index], kind="stable")]
    order = np.random.default_rng(0).permutation(count)
    chunks = {"shuffled": [index[i * size:(i + 1) * size] for i in range(count)],
              "bucketed": [by_length[i * size:(i + 1) * size] for i in order]}
    return {name: [batches.build(rows).to(device) for rows in chunk] for name, chunk in chunks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--blocks", nargs="+", choices=list(HISTORY_ARMS), default=list(HISTORY_ARMS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per padding and block (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    parser.add_argument("--batching", nargs="+", choices=BATCHINGS, default=list(BATCHINGS),
                        help="shuffled: the train job's batches; bucketed: the same samples grouped by history length")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    load_before = os.getloadavg()
    synthetic = generate(SyntheticConfig(**SYNTHETIC_LONG))
    data = synthetic.interactions.with_long_tail()
    sids = semantic_ids(synthetic.content) if "sim" in args.blocks else None
    batches = training_batches(data, args.warmup + args.steps, device)
    rows = []
    for batching in args.batching:
        for block in args.blocks:
            rows.append({"batching": batching,
                         **time_block(block, data, sids, batches[batching], args.warmup, device)})
            print(f"{batching} {block}: {rows[-1]['speedup']:.2f}x", flush=True)
    load_after = os.getloadavg()
    columns = [("batching", "batches", None), ("block", "block", None), ("max_examples_per_s", "max ex/s", ".1f"),
               ("batch_examples_per_s", "batch ex/s", ".1f"), ("speedup", "speed-up", ".2f"),
               ("padded_length", "batch L (median)", ",.0f"), ("mean_history", "mean history", ",.0f"),
               ("max_abs_logit_diff", "max |dlogit|", ".1e")]
    print(format_table(rows, columns, title=(
        f"history padding, {args.device}, {args.threads} thread(s), batch {HISTORY_TRAIN_SYNTHETIC['batch_size']}, "
        f"max_history {SYNTHETIC_LONG['max_history']:,}, {args.steps} timed steps (medians); load "
        f"{load_before[0]:.2f} -> {load_after[0]:.2f}")))
    path = write_json(result_name("history_padding", device), {
        "settings": {"synthetic": SYNTHETIC_LONG, "train": HISTORY_TRAIN_SYNTHETIC, "base_model": BASE_MODEL,
                     "arms": {b: HISTORY_ARMS[b] for b in args.blocks}, "batchings": args.batching,
                     "steps": args.steps, "warmup": args.warmup,
                     "threads": threads, "sids": SID_SETTINGS},
        "device": device_facts(device), "load_average": {"before": load_before, "after": load_after},
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
