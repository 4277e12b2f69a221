"""The train job: data -> SidDLRM sharded with DistributedModelParallel -> training -> AUC / NE per split.

One process or N (``torchrun`` / TorchX ``dist.ddp``: gloo on CPU, nccl on CUDA). The embedding tables are
sharded by TorchRec's planner and trained with row-wise Adagrad fused into their backward; the dense arches are
data-parallel (DDP, inside DMP) and trained with Adam. Each process reads every ``world_size``-th batch.
Checkpoints (DCP, sharded) are written at the end of every epoch and every ``checkpoint_every`` steps; a resumed run
skips what was done and continues to the same result as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from torchrec_sid.data.batches import CtrBatches, InteractionData
from torchrec_sid.io import atomic_write_json
from torchrec_sid.models.dlrm import SidDLRM, count_parameters
from torchrec_sid.quantizers.base import SemanticIds
from torchrec_sid.train import checkpoint
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.metrics import ctr_metrics, gather

logger = logging.getLogger(__name__)


def load_data(config: TrainConfig) -> tuple[InteractionData, Tensor | None]:
    """The run's interactions and, when the model uses them, the items' content embeddings ``[I, Dc]``."""
    if config.data == "movielens":
        from torchrec_sid.data import movielens

        ml = movielens.load(config.ml100k)
        content = ml.content(progress=False).text if config.model.content else None
        return ml.interactions(), content
    from torchrec_sid.data.synthetic import generate

    synthetic = generate(config.synthetic_config())
    return synthetic.interactions, synthetic.content


def build_model(config: TrainConfig, data: InteractionData, content: Tensor | None) -> SidDLRM:
    """The unsharded model, initialised from ``config.seed`` (so every process builds the same one)."""
    semantic_ids = SemanticIds.load(config.semantic_ids) if config.semantic_ids else None
    torch.manual_seed(config.seed)
    return SidDLRM(config.model, data.catalog, semantic_ids, content)


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the process group torchrun / TorchX describe, or makes a one-process group; ``(rank, world, device)``."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            store = tempfile.NamedTemporaryFile(prefix="torchrec_sid_pg_", delete=False).name
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() \
        else torch.device("cpu")
    return rank, dist.get_world_size(), device


def shard(model: nn.Module, config: TrainConfig, world_size: int, device: torch.device,
          ) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Plans and shards the model's embedding collections; returns it with its (fused + dense) optimizer."""
    tables = [p for name, p in model.named_parameters()
              if "embedding_collection" in name or "embedding_bag_collection" in name]
    apply_optimizer_in_backward(RowWiseAdagrad, tables, {"lr": config.embedding_learning_rate})
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    topology = Topology(world_size=world_size, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=config.batch_size)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=device, sharders=sharders, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=config.learning_rate))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


@torch.no_grad()
def evaluate(model: nn.Module, batches: CtrBatches, device: torch.device) -> dict[str, float]:
    """AUC / NE / log loss of one split over all processes; every process runs the same number of forwards."""
    model.eval()
    n, b = len(batches.samples), batches.batch_size
    total = math.ceil(n / b)
    rounds = math.ceil(total / batches.world_size)
    scores, labels = [], []
    for r in range(rounds):
        index = r * batches.world_size + batches.rank
        rows = np.arange(index * b, min((index + 1) * b, n)) if index < total else np.arange(min(b, n))
        batch = batches.build(rows).to(device)
        logits = model(batch.dense_features, batch.sparse_features)
        if index < total:  # a process without a batch left repeats the first one and drops the result
            scores.append(torch.sigmoid(logits).float().cpu())
            labels.append(batch.labels.cpu())
    model.train()
    empty = torch.zeros(0)
    return ctr_metrics(gather(torch.cat(scores) if scores else empty), gather(torch.cat(labels) if labels else empty))


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Trains and evaluates; rank 0 writes ``<out>/results.json`` and returns the results (None elsewhere)."""
    rank, world_size, device = init_distributed()
    data, content = load_data(config)
    model = build_model(config, data, content)
    parameters = count_parameters(model)
    dmp, optimizer = shard(model, config, world_size, device)
    out = Path(config.out)
    writer = SummaryWriter(str(out / "tensorboard")) if rank == 0 else None
    train = CtrBatches(data, "train", config.batch_size, max_history=config.model.max_history, shuffle=True,
                       seed=config.seed, rank=rank, world_size=world_size)
    progress = {"epoch": 0, "batch": 0, "step": 0}
    found = checkpoint.latest(out / "checkpoints") if config.resume else None
    if found is not None:
        optimizer.init_state()  # Adam has no state before its first step: create it, so DCP can load into it
        state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
        progress = checkpoint.load(found, state)
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        logger.info("resumed from %s at epoch %d, batch %d", found, progress["epoch"], progress["batch"])

    steps_per_epoch = len(train)
    total_steps = config.epochs * steps_per_epoch if config.max_steps is None else config.max_steps
    examples, train_seconds = 0, 0.0
    with tqdm(total=total_steps, initial=progress["step"], desc=config.name, disable=rank != 0) as bar:
        for epoch in range(progress["epoch"], config.epochs):
            train.set_epoch(epoch, progress["batch"] if epoch == progress["epoch"] else 0)
            for batch in train:
                if progress["step"] >= total_steps:
                    break
                start = time.perf_counter()
                batch = batch.to(device)
                loss = F.binary_cross_entropy_with_logits(dmp(batch.dense_features, batch.sparse_features),
                                                          batch.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                train_seconds += time.perf_counter() - start
                examples += len(batch.labels) * world_size
                progress = {"epoch": epoch, "batch": progress["batch"] + 1 if epoch == progress["epoch"] else 1,
                            "step": progress["step"] + 1}
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), progress["step"])
                if config.checkpoint_every and progress["step"] % config.checkpoint_every == 0:
                    _checkpoint(dmp, optimizer, out, progress)
            else:  # the epoch ran to its end
                progress = {"epoch": epoch + 1, "batch": 0, "step": progress["step"]}
                _checkpoint(dmp, optimizer, out, progress)
                continue
            break  # max_steps reached

    metrics = {}
    for split in config.eval_splits:
        batches = CtrBatches(data, split, config.batch_size, max_history=config.model.max_history, rank=rank,
                             world_size=world_size)
        metrics[split] = evaluate(dmp, batches, device)
        if writer is not None:
            for key in ("auc", "ne", "logloss"):
                writer.add_scalar(f"{split}/{key}", metrics[split][key], progress["step"])
    if writer is not None:
        writer.close()
    if rank != 0:
        return None
    results = {
        "name": config.name,
        "config": config.to_dict(),
        "world_size": world_size,
        "steps": progress["step"],
        "parameters": parameters,
        "train_examples_per_second": examples / train_seconds if train_seconds else float("nan"),
        "metrics": metrics,
    }
    atomic_write_json(out / "results.json", results)
    return results


def _checkpoint(dmp: nn.Module, optimizer: CombinedOptimizer, out: Path, progress: dict[str, int]) -> None:
    checkpoint.save(out / "checkpoints", progress["step"],
                    {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}, progress)
