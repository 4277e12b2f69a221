"""How time and memory grow with the catalogue (issue 14): quantizer fit and encode out of memory, per-rank model
memory and 2-process training throughput of the SIDs-as-features path.

Series, on the synthetic source:

* **quantize** (N = 10^5, 10^6, 10^7): item content streamed to a ``.npy`` file (``item_content_rows``), then, in a
  fresh process each (for its peak RSS): RQ-KMeans fitted on a seeded 16,384-row sample of the memory map
  (``jobs/scale.fit_sampled``), every row encoded in one streaming pass (``encode_streaming``), and the codes
  published as version 1 of a SID store with a collision suffix.
* **train** (N = 10^5, 10^6): users and samples kept small; CTR samples written as 2 parquet shards, SIDs fitted as
  above and published to a store; 2 gloo processes train SidDLRM (``sid`` tokens, DIN history) sharded by
  DistributedModelParallel through TrainPipelineSparseDist, each rank streaming its shard and reading item codes
  from the store (``ModelConfig.sid_features``). Per-rank model memory (local table shards + replicated dense
  parameters and buffers) is measured for that model and for the id -> SID lookup model of the same config.

Each series' growth exponent ``a`` (time ∝ N^a) is the least-squares slope in log-log.

``--device cuda``: the quantize series stays on the CPU (RQ-KMeans has no GPU path); the train series would need an
nccl group with one GPU per rank, and the one multi-process harness (``tests/multiprocess.run_multiprocess``) makes
gloo groups only, so on cuda it is skipped and says why. Results then go to ``scale_cuda.json`` / ``.png``.

Usage::

    python -m benchmarks.scale            # the full run (about 10-20 minutes on 2 shared cores)
    python -m benchmarks.scale --quick    # N = 10^4, 3 * 10^4 (a smoke run, not written to results/)
    python -m benchmarks.scale --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, add_device_argument, device_facts, machine_facts, resolve_device

SAMPLE_ROWS = 16_384
LEVELS, CODEBOOK = 3, 64
DIM = 32
SHARED_NOTE = ("Times are wall-clock on a 2-core VM shared with other engineers' jobs (load average 6-10 during the "
               "run): absolute figures are noisy; the exponents and ratios come from one run.")


# ------------------------------------------------------------------------------------------- quantize series


def quantize_run(num_items: int, folder: Path) -> dict[str, Any]:
    """Writes the content, fits on a sample, encodes every row, publishes version 1; in this process."""
    from torchrec_sid.data.synthetic import SyntheticConfig, item_content_rows
    from torchrec_sid.jobs.scale import encode_streaming, fit_sampled, open_embeddings, write_embeddings
    from torchrec_sid.quantizers.base import build_quantizer
    from torchrec_sid.sid import SemanticIds
    from torchrec_sid.sid.versions import SidStore

    config = SyntheticConfig(num_items=num_items, content_dim=DIM, num_clusters=256, seed=0)
    path = folder / f"content_{num_items}.npy"
    start = time.perf_counter()
    write_embeddings(path, num_items, DIM, lambda a, b: item_content_rows(config, a, b))
    write_s = time.perf_counter() - start
    x = open_embeddings(path)
    start = time.perf_counter()
    quantizer = fit_sampled(build_quantizer("rq_kmeans", levels=LEVELS, codebook_size=CODEBOOK, max_iter=10, seed=0),
                            x, SAMPLE_ROWS, seed=0)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    codes = encode_streaming(quantizer, x)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    sids = SemanticIds(codes, quantizer.cardinalities, quantizer.name, quantizer.get_params()).with_collision_suffix()
    SidStore(folder / f"store_{num_items}").create(sids)
    publish_s = time.perf_counter() - start
    path.unlink()
    return {"num_items": num_items, "write_s": write_s, "fit_s": fit_s, "encode_s": encode_s,
            "encode_rows_per_s": num_items / encode_s, "publish_s": publish_s,
            "suffix_cardinality": sids.cardinalities[-1],
            "collision_rate_before_suffix": sids.metrics["collision_rate_before_suffix"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def quantize_series(sizes: list[int], folder: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quantize-run", str(n), "--dir",
                              str(folder)], capture_output=True, text=True, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        if out.returncode != 0:
            raise RuntimeError(f"quantize run N={n} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  quantize N={n:>10,}: {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- train series


def _model_config(sid_features: bool) -> Any:
    from torchrec_sid.models.configs import ModelConfig, SidTokenConfig

    return ModelConfig(embedding_dim=16, item_representation=("sid",), history_block="din", max_history=50,
                       dense_layers=(32,), over_layers=(32,), sid_features=sid_features,
                       sid_tokens=SidTokenConfig(ngram_orders=(1,), prefix_lengths=(2, 3), num_levels=LEVELS,
                                                 unknown_ids="oov"))


def per_rank_bytes(dmp: torch.nn.Module) -> int:
    """This rank's model memory: its shards of the sharded tables plus every replicated parameter and buffer."""
    total = 0
    for value in dmp.state_dict().values():
        shards = getattr(value, "local_shards", None)
        if shards is not None:
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in shards())
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _train_worker(rank: int, world_size: int, store: str, shards: list[str], schema: Any, batch_size: int,
                  warmup: int) -> dict[str, Any]:
    from torchrec_sid.data.parquet import ParquetCtrBatches
    from torchrec_sid.models.dlrm import SidDLRM
    from torchrec_sid.sid.versions import SidStore
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import shard
    from torchrec_sid.train.pipeline import SidDLRMTrain, train_pipeline, train_steps

    cpu = torch.device("cpu")
    table = SidStore(store).table()
    train_config = TrainConfig(batch_size=batch_size)
    lookup_model = SidDLRM.from_config(_model_config(False), schema, table.semantic_ids())
    lookup_bytes = per_rank_bytes(shard(SidDLRMTrain(lookup_model), train_config, world_size, cpu)[0])
    del lookup_model
    head = table.semantic_ids()
    torch.manual_seed(0)
    model = SidDLRM.from_config(_model_config(True), schema, type(head)(
        head.codes[:1], head.cardinalities, head.quantizer, head.config, suffix_level=head.suffix_level))
    dmp, optimizer = shard(SidDLRMTrain(model), train_config, world_size, cpu)
    feature_bytes = per_rank_bytes(dmp)
    pipeline = train_pipeline(dmp, optimizer, cpu)
    batches = ParquetCtrBatches(shards, batch_size, rank, world_size, sid_codes=SidStore(store))
    times, losses = [], []
    start = time.perf_counter()
    for step, ((loss, _, _), _) in enumerate(train_steps(pipeline, iter(batches))):
        losses.append(float(loss))
        if step + 1 == warmup:
            start = time.perf_counter()
        times.append(time.perf_counter())
    timed = len(times) - warmup
    return {"steps": len(times), "timed_steps": timed, "seconds": times[-1] - start,
            "examples_per_s": world_size * batch_size * timed / (times[-1] - start),
            "feature_path_bytes": feature_bytes, "lookup_path_bytes": lookup_bytes, "last_loss": losses[-1]}


def train_skipped(device: torch.device) -> str | None:
    """Why the train series cannot run on ``device`` (None: it can)."""
    if device.type == "cuda":
        return (f"2-rank training on cuda needs an nccl group, one GPU per rank ({torch.cuda.device_count()} "
                "visible), and tests/multiprocess.run_multiprocess makes gloo groups only")
    return None


def train_run(num_items: int, folder: Path, num_users: int, batch_size: int) -> dict[str, Any]:
    from tests.multiprocess import run_multiprocess
    from torchrec_sid.data.batches import CtrBatches
    from torchrec_sid.data.parquet import write_shards
    from torchrec_sid.data.synthetic import SyntheticConfig, generate
    from torchrec_sid.jobs.scale import encode_streaming, fit_sampled
    from torchrec_sid.models.factory import catalog_schema
    from torchrec_sid.quantizers.base import build_quantizer
    from torchrec_sid.sid import SemanticIds
    from torchrec_sid.sid.versions import SidStore

    start = time.perf_counter()
    data = generate(SyntheticConfig(num_items=num_items, num_users=num_users, min_history=20, max_history=60,
                                    samples_per_user=40, content_dim=DIM, num_clusters=256, time_span_days=60,
                                    seed=0))
    content = data.content.numpy()
    quantizer = fit_sampled(build_quantizer("rq_kmeans", levels=LEVELS, codebook_size=CODEBOOK, max_iter=10, seed=0),
                            content, SAMPLE_ROWS)
    sids = SemanticIds(encode_streaming(quantizer, content), quantizer.cardinalities, "rq_kmeans",
                       {}).with_collision_suffix()
    store = folder / f"train_store_{num_items}"
    SidStore(store).create(sids)
    interactions = data.interactions
    shards = write_shards(CtrBatches(interactions, "train", 1024, max_history=50, shuffle=True), folder /
                          f"shards_{num_items}", num_files=2)
    setup_s = time.perf_counter() - start
    results = run_multiprocess(_train_worker, world_size=2, store=str(store), shards=[str(s) for s in shards],
                               schema=catalog_schema(interactions.catalog), batch_size=batch_size, warmup=3)
    rank0 = results[0]
    return {"num_items": num_items, "num_users": num_users, "train_samples": len(interactions.splits["train"]),
            "batch_size_per_rank": batch_size, "setup_s": setup_s, **rank0,
            "feature_path_bytes_per_rank": [r["feature_path_bytes"] for r in results],
            "lookup_path_bytes_per_rank": [r["lookup_path_bytes"] for r in results]}


# --------------------------------------------------------------------------------------------------- report


def exponent(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def table(quantize: list[dict[str, Any]], train: list[dict[str, Any]], exponents: dict[str, float]) -> str:
    lines = ["quantize (RQ-KMeans 3 x 64, sample fit on 16,384 rows, streaming encode), D = 32",
             f"{'N':>12}  {'fit s':>7}  {'encode s':>9}  {'rows/s':>10}  {'publish s':>9}  {'peak RSS MiB':>12}"]
    for r in quantize:
        lines.append(f"{r['num_items']:>12,}  {r['fit_s']:>7.1f}  {r['encode_s']:>9.1f}  "
                     f"{r['encode_rows_per_s']:>10,.0f}  {r['publish_s']:>9.1f}  {r['peak_rss_mib']:>12,.0f}")
    lines += ["", "2-process sharded training, SIDs as features (sid tokens, DIN), parquet shards",
              f"{'N':>12}  {'examples/s':>10}  {'per-rank MiB (features)':>24}  {'per-rank MiB (lookup)':>22}"]
    for r in train:
        lines.append(f"{r['num_items']:>12,}  {r['examples_per_s']:>10,.0f}  "
                     f"{max(r['feature_path_bytes_per_rank']) / 2**20:>24.2f}  "
                     f"{max(r['lookup_path_bytes_per_rank']) / 2**20:>22.2f}")
    lines += ["", "growth exponents a (value ∝ N^a): " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items())]
    return "\n".join(lines)


def plot(quantize: list[dict[str, Any]], train: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    n = [r["num_items"] for r in quantize]
    for key, label in (("fit_s", "fit (s)"), ("encode_s", "encode (s)"), ("publish_s", "publish v1 (s)")):
        left.loglog(n, [r[key] for r in quantize], "o-", label=label)
    left.set_xlabel("items N")
    left.set_title("quantize: time")
    left.legend()
    right.loglog(n, [r["peak_rss_mib"] for r in quantize], "o-", label="quantize peak RSS (MiB)")
    if train:
        m = [r["num_items"] for r in train]
        right.loglog(m, [max(r["feature_path_bytes_per_rank"]) / 2**20 for r in train], "s-",
                     label="model per rank, SIDs as features (MiB)")
        right.loglog(m, [max(r["lookup_path_bytes_per_rank"]) / 2**20 for r in train], "s--",
                     label="model per rank, id -> SID lookup (MiB)")
    right.set_xlabel("items N")
    right.set_title("memory")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written to results/")
    parser.add_argument("--quantize-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--skip-train", action="store_true", help="the quantize series only")
    parser.add_argument("--quantize-sizes", type=int, nargs="*", help="N of the quantize series (default 1e5 1e6 1e7)")
    parser.add_argument("--quantize-from", metavar="JSON", help="reuse the quantize rows of an earlier run's JSON")
    add_device_argument(parser, "the quantize series stays on the CPU (RQ-KMeans has no GPU path) and the 2-rank "
                                "train series is skipped on cuda (see the module docstring)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.quantize_run:
        torch.set_num_threads(2)
        print(json.dumps(quantize_run(args.quantize_run, Path(args.dir))))
        return
    q_sizes = [10_000, 30_000] if args.quick else (args.quantize_sizes or [100_000, 1_000_000, 10_000_000])
    t_sizes = [10_000, 30_000] if args.quick else [100_000, 1_000_000]
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        if args.quantize_from:
            quantize = json.loads(Path(args.quantize_from).read_text())["quantize"]
            q_sizes = [r["num_items"] for r in quantize]
        else:
            quantize = quantize_series(q_sizes, Path(tmp))
        skipped = "--skip-train" if args.skip_train else train_skipped(device)
        if skipped:
            print(f"train series skipped: {skipped}")
        train = [] if skipped else [train_run(n, Path(tmp), num_users=200, batch_size=128) for n in t_sizes]
    exponents = {f"{key}": exponent(q_sizes, [r[key] for r in quantize])
                 for key in ("fit_s", "encode_s", "publish_s", "peak_rss_mib")}
    if train:
        exponents["train_feature_bytes_per_rank"] = exponent(t_sizes, [max(r["feature_path_bytes_per_rank"])
                                                                        for r in train])
        exponents["train_lookup_bytes_per_rank"] = exponent(t_sizes, [max(r["lookup_path_bytes_per_rank"])
                                                                       for r in train])
        exponents["train_examples_per_s"] = exponent(t_sizes, [r["examples_per_s"] for r in train])
    print(table(quantize, train, exponents))
    print(SHARED_NOTE)
    if args.quick:
        return
    result = {"benchmark": "scale", "note": SHARED_NOTE, "machine": machine_facts(), "quantize": quantize,
              "train": train, "train_skipped": skipped, "exponents": exponents, **device_facts(device),
              "settings": {"quantizer": f"rq_kmeans levels={LEVELS} codebook_size={CODEBOOK} max_iter=10",
                           "sample_rows": SAMPLE_ROWS, "content_dim": DIM}}
    RESULTS_DIR.mkdir(exist_ok=True)
    name = "scale" if device.type == "cpu" else "scale_cuda"
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(quantize, train, RESULTS_DIR / f"{name}.png")
    print(f"wrote {RESULTS_DIR / f'{name}.json'} and {RESULTS_DIR / f'{name}.png'}")


if __name__ == "__main__":
    main()
