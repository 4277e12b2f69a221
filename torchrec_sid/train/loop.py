"""The train job: data -> SidDLRM sharded with DistributedModelParallel -> training -> AUC / NE per split.

One process or N (``torchrun`` / TorchX ``dist.ddp``: gloo on CPU, nccl on CUDA). The embedding tables are
sharded by TorchRec's planner and trained with row-wise Adagrad fused into their backward; the dense arches are
data-parallel (DDP, inside DMP) and trained with Adam. Each process reads every ``world_size``-th batch. The steps
run through TorchRec's ``TrainPipelineSparseDist`` (see :mod:`torchrec_sid.train.pipeline`): the input dist of
the next batch overlaps the forward / backward of this one.
Checkpoints (DCP, sharded) are written at the end of every epoch and every ``checkpoint_every`` steps; a resumed run
skips what was done and continues to the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
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
from torchrec_sid.io import atomic_write_json, check_recorded_sha256, folder_lock, sha256_bytes, sha256_file
from torchrec_sid.models.dlrm import SidDLRM, count_parameters, table_parameters
from torchrec_sid.models.factory import from_catalog
from torchrec_sid.modules import SoftSidEmbedding
from torchrec_sid.modules.soft_sid import SoftIndexTokenizer
from torchrec_sid.quantizers.metrics import perplexity, utilization
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.codes import collision_rate
from torchrec_sid.sid.semantic_ids import quantizer_path
from torchrec_sid.train import checkpoint
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.metrics import ctr_metrics, gather
from torchrec_sid.train.pipeline import SidDLRMTrain, describe, detach, train_pipeline, train_steps

logger = logging.getLogger(__name__)


def load_data(config: TrainConfig) -> tuple[InteractionData, dict[str, Tensor] | None]:
    """The run's interactions and, when the model reads them, the items' content signals ``{m: [I, D_m]}``."""
    needs_signals = config.model.content or "soft_sid" in config.model.item_representation
    if config.data == "movielens":
        from torchrec_sid.data import movielens

        ml = movielens.load(config.ml100k)
        return ml.interactions().with_long_tail(), ml.signals(progress=False) if needs_signals else None
    if config.data == "movielens_latest":
        from torchrec_sid.data import movielens_latest

        latest = movielens_latest.load()
        return latest.interactions().with_long_tail(), latest.signals(progress=False) if needs_signals else None
    from torchrec_sid.data.synthetic import generate

    synthetic = generate(config.synthetic_config())
    return synthetic.interactions.with_long_tail(), synthetic.signals() if needs_signals else None


def build_model(config: TrainConfig, data: InteractionData, signals: dict[str, Tensor] | None) -> SidDLRM:
    """The unsharded model, initialised from ``config.seed`` (so every process builds the same one); ids of items
    the training split never shows are out of its vocabulary."""
    semantic_ids = SemanticIds.load(config.semantic_ids) if config.semantic_ids else None
    if semantic_ids is not None and config.semantic_ids and config.tokenizer and (  # one quantize run's pair
            Path(config.tokenizer).resolve() == quantizer_path(config.semantic_ids).resolve()):
        check_recorded_sha256(config.tokenizer, semantic_ids.config.get("quantizer_sha256"),
                              f"the SID table {config.semantic_ids}")
    # the protocol's static types do not see MMQTokenizer's ModuleList of codebooks as a Sequence[nn.Embedding]
    tokenizer = cast(SoftIndexTokenizer, MMQ.load(config.tokenizer).model_) if config.tokenizer else None
    torch.manual_seed(config.seed)
    trained = torch.from_numpy(data.trained_items(config.model.max_history))
    return from_catalog(config.model, data.catalog, semantic_ids, signals, tokenizer, trained)


def item_rows(model: SidDLRM) -> int:
    """Embedding rows the model spends on items: the rows of its item arch's tables (id, hashed id, SID tokens;
    SIDE and soft SIDs hold none), the memory the equal-memory comparisons hold fixed."""
    collection = model.item_arch.embedding_collection
    return 0 if collection is None else sum(c.num_embeddings for c in collection.embedding_configs())


def export_semantic_ids(model: nn.Module, config: TrainConfig) -> SemanticIds:
    """Writes the fine-tuned tokenizer of ``model``'s ``soft_sid`` and its hard SIDs of every item (with a collision
    suffix level) to ``config.export_semantic_ids``; returns the SIDs."""
    if config.tokenizer is None or config.export_semantic_ids is None:
        raise ValueError("exporting fine-tuned SIDs needs train.tokenizer and train.export_semantic_ids")
    soft = next(m for m in model.modules() if isinstance(m, SoftSidEmbedding))
    quantizer = MMQ.load(config.tokenizer)
    quantizer.model_ = soft.tokenizer.eval()
    codes = soft.codes().cpu()
    metrics = {"utilization": utilization(codes, quantizer.cardinalities),
               "perplexity": perplexity(codes, quantizer.cardinalities), "collision_rate": collision_rate(codes)}
    sids = SemanticIds(codes, quantizer.cardinalities, quantizer.name,
                       {**quantizer.get_params(), "finetuned_from": config.tokenizer, "finetune_run": config.name},
                       metrics).with_collision_suffix()
    sids.save(config.export_semantic_ids)
    quantizer.save(quantizer_path(config.export_semantic_ids))
    return sids


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the process group torchrun / TorchX describe, or makes a one-process group; ``(rank, world, device)``."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() \
        else torch.device("cpu")
    return rank, dist.get_world_size(), device


def shard(model: nn.Module, config: TrainConfig, world_size: int, device: torch.device,
          ) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Plans and shards the model's embedding collections; returns it with its (fused + dense) optimizer."""
    apply_optimizer_in_backward(RowWiseAdagrad, table_parameters(model), {"lr": config.embedding_learning_rate})
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
def predict(model: nn.Module, batches: CtrBatches, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Click probabilities, labels and sample indices (rows of ``batches.samples``) of one split, ``[N]`` each,
    gathered over all processes (in rank order); every process runs the same number of forwards.

    ``model``: a (sharded) :class:`~torchrec_sid.train.pipeline.SidDLRMTrain`, not held by a train pipeline.
    """
    model.eval()
    n, b = len(batches.samples), batches.batch_size
    total = math.ceil(n / b)
    rounds = math.ceil(total / batches.world_size)
    scores, labels, rows_done = [], [], []
    for r in range(rounds):
        index = r * batches.world_size + batches.rank
        rows = np.arange(index * b, min((index + 1) * b, n)) if index < total else np.arange(min(b, n))
        batch = batches.build(rows).to(device)
        _, (_, logits, _) = model(batch)
        if index < total:  # a process without a batch left repeats the first one and drops the result
            scores.append(torch.sigmoid(logits).float().cpu())
            labels.append(batch.labels.cpu())
            rows_done.append(rows)
    model.train()
    empty = torch.zeros(0)
    probabilities = gather(torch.cat(scores) if scores else empty)
    bad = (~torch.isfinite(probabilities)).nonzero().flatten()
    if len(bad):
        raise DivergedError(f"evaluation: {len(bad)} of {len(probabilities)} scores are not finite (NaN or inf), "
                            f"first at example {int(bad[0])}; the model diverged, no metrics were computed")
    done = torch.from_numpy(np.concatenate(rows_done)) if rows_done else torch.zeros(0, dtype=torch.long)
    return probabilities, gather(torch.cat(labels) if labels else empty), gather(done)


def evaluate(model: nn.Module, batches: CtrBatches, device: torch.device) -> dict[str, float]:
    """AUC / GAUC / NE / log loss of one split over all processes (:func:`predict`, then
    :func:`~torchrec_sid.train.metrics.ctr_metrics`)."""
    probabilities, labels, rows = predict(model, batches, device)
    return ctr_metrics(probabilities, labels, torch.from_numpy(batches.samples.users)[rows])


SLICES = ("all", "head", "tail", "cold")  # the keys slice_<name> of slice_metrics


def slice_metrics(data: InteractionData, predictions: dict[str, tuple[Tensor, Tensor, Tensor]],
                  tail_impressions: int) -> dict[str, dict[str, float]]:
    """Metrics of the test period by the candidate's training impressions (its samples in ``train``).

    ``predictions``: :func:`predict`'s output of ``test`` and, when evaluated, ``cold`` (its samples from the start
    of the test period on). Slices of those samples: ``all``; ``head``, items with more than ``tail_impressions``
    training impressions; ``tail``, items with 1 to ``tail_impressions``; ``cold``, items with none (the held-out
    items and the warm items training never showed). Keys ``slice_<name>``, each a
    :func:`~torchrec_sid.train.metrics.ctr_metrics` dict with ``tail_impressions`` (k) recorded in it.
    """
    counts = torch.from_numpy(np.bincount(data.splits["train"].items, minlength=data.catalog.num_items))
    start = int(data.splits["test"].timestamps.min()) if len(data.splits["test"]) else 0
    parts = []
    for split in ("test", "cold"):
        if split not in predictions:
            continue
        p, y, rows = predictions[split]
        samples = data.splits[split]
        if split == "cold":  # the cold split also covers the validation period
            keep = torch.from_numpy(samples.timestamps)[rows] >= start
            p, y, rows = p[keep], y[keep], rows[keep]
        parts.append((p, y, torch.from_numpy(samples.users)[rows], torch.from_numpy(samples.items)[rows]))
    p, y, users, items = (torch.cat([part[k] for part in parts]) for k in range(4))
    seen = counts[items]
    masks = {"all": torch.ones_like(seen, dtype=torch.bool), "head": seen > tail_impressions,
             "tail": (seen >= 1) & (seen <= tail_impressions), "cold": seen == 0}
    return {f"slice_{name}": {**ctr_metrics(p[masks[name]], y[masks[name]], users[masks[name]]),
                              "tail_impressions": tail_impressions} for name in SLICES}


class DivergedError(ValueError):
    """The training loss or the model's scores stopped being finite numbers."""


def run(config: TrainConfig, resume_anyway: bool = False) -> dict[str, Any] | None:
    """Trains and evaluates; rank 0 writes ``<out>/results.json`` and returns the results (None elsewhere).

    Rank 0 holds the lock of ``config.out`` for the whole run (a second run on the same folder fails at once).
    A resumed run refuses a checkpoint written under another config, data or world size unless ``resume_anyway``.
    A loss or score that is not finite stops the run with :class:`DivergedError`; nothing is written then.
    """
    rank, world_size, device = init_distributed()
    with folder_lock(config.out, "training run") if rank == 0 else contextlib.nullcontext():
        return _run(config, rank, world_size, device, resume_anyway)


def run_identity(config: TrainConfig, data: InteractionData) -> dict[str, str]:
    """What a checkpoint must share with the run that resumes it: the SHA-256 of the settings that shape training
    (not ``name``, ``out``, ``resume``, ``max_steps``, ``epochs``, ``eval_splits``, ``checkpoint_every``,
    ``tail_impressions``), and a
    fingerprint of the training split and of the SID / tokenizer files."""
    settings = {k: v for k, v in config.to_dict().items()
                if k not in {"name", "out", "resume", "max_steps", "epochs", "eval_splits", "checkpoint_every",
                             "tail_impressions"}}
    train = data.splits["train"]
    digest = hashlib.sha256()
    for array in (train.users, train.items, train.labels, train.timestamps):
        digest.update(np.ascontiguousarray(array).tobytes())
    for path in (config.semantic_ids, config.tokenizer):
        digest.update((sha256_file(path) if path else "-").encode())
    return {"config_sha256": sha256_bytes(json.dumps(settings, sort_keys=True, default=str).encode()),
            "data_fingerprint": digest.hexdigest()}


def _run(config: TrainConfig, rank: int, world_size: int, device: torch.device,
         resume_anyway: bool) -> dict[str, Any] | None:
    data, signals = load_data(config)
    model = build_model(config, data, signals)  # first: it names a missing SID / tokenizer file
    identity = run_identity(config, data)
    parameters = count_parameters(model)
    rows = item_rows(model)
    dmp, optimizer = shard(SidDLRMTrain(model), config, world_size, device)
    out = Path(config.out)
    writer = SummaryWriter(str(out / "tensorboard")) if rank == 0 else None
    train = CtrBatches(data, "train", config.batch_size, max_history=config.model.max_history, shuffle=True,
                       seed=config.seed, rank=rank, world_size=world_size, index_dtype=config.torch_index_dtype())
    progress = (_resume(dmp, optimizer, out, identity, resume_anyway) if config.resume
                else {"epoch": 0, "batch": 0, "step": 0})
    steps_per_epoch = len(train)
    total_steps = config.epochs * steps_per_epoch if config.max_steps is None else config.max_steps
    # the training figures of the whole run: a resumed run continues those its checkpoint recorded
    examples, train_seconds = int(progress.get("examples", 0)), float(progress.get("train_seconds", 0.0))
    first_step = progress["step"]
    if config.resume and (progress["epoch"] >= config.epochs or first_step >= total_steps):
        logger.info("resume: the checkpoint is the end of the run (step %d); nothing left to train, evaluating it",
                    first_step)
    pipeline = train_pipeline(dmp, optimizer, device)
    soft_sid = next((m for m in dmp.modules() if isinstance(m, SoftSidEmbedding)), None)
    with tqdm(total=total_steps, initial=progress["step"], desc=config.name, disable=rank != 0) as bar:
        for epoch in range(progress["epoch"], config.epochs):
            train.set_epoch(epoch, progress["batch"] if epoch == progress["epoch"] else 0)
            # exactly the batches to train: the pipeline fetches ahead, never past max_steps or the epoch's end
            batches = islice(train, max(0, min(steps_per_epoch - train.start_batch, total_steps - progress["step"])))
            for (loss, _, labels), seconds in train_steps(pipeline, batches):  # zero_grad, forward, backward, step
                train_seconds += seconds
                examples += len(labels) * world_size
                progress = {"epoch": epoch, "batch": progress["batch"] + 1 if epoch == progress["epoch"] else 1,
                            "step": progress["step"] + 1}
                value = loss.item()
                if not math.isfinite(value):
                    raise DivergedError(f"step {progress['step']}: the training loss is {value}, the run diverged "
                                        f"(learning_rate {config.learning_rate}, embedding_learning_rate "
                                        f"{config.embedding_learning_rate}); no results were written")
                bar.update()
                bar.set_postfix(loss=f"{value:.4f}")
                if writer is not None:
                    writer.add_scalar("train/loss", value, progress["step"])
                    if soft_sid is not None and soft_sid.last_regulariser is not None:  # MMQ stage 2: the
                        # tokenizer's reconstruction terms, also minimised
                        writer.add_scalar("train/tokenizer_regulariser", soft_sid.last_regulariser.item(),
                                          progress["step"])
                if config.checkpoint_every and progress["step"] % config.checkpoint_every == 0:
                    _checkpoint(dmp, optimizer, out, {**progress, **_figures(examples, train_seconds, pipeline)},
                                identity)
            if progress["epoch"] == epoch and progress["batch"] == steps_per_epoch:  # the epoch ran to its end
                progress = {"epoch": epoch + 1, "batch": 0, "step": progress["step"]}
                _checkpoint(dmp, optimizer, out, {**progress, **_figures(examples, train_seconds, pipeline)},
                            identity)
                continue
            break  # max_steps reached
    # a resumed run that had nothing left to train reports the pipeline its checkpoint recorded
    pipelined = describe(pipeline) if progress["step"] > first_step else progress.get("train_pipeline",
                                                                                    describe(pipeline))
    logger.info("train pipeline: %s", pipelined)
    detach(pipeline)  # the model's own forwards again, for evaluation

    metrics = _evaluate_splits(dmp, data, config, rank, world_size, device, writer, progress["step"])
    if writer is not None:
        writer.close()
    if rank != 0:
        return None
    exported = export_semantic_ids(dmp, config) if config.export_semantic_ids else None
    results = {
        "name": config.name,
        "config": config.to_dict(),
        "world_size": world_size,
        "steps": progress["step"],
        "parameters": parameters,
        "item_rows": rows,
        "train_examples_per_second": examples / train_seconds if train_seconds else None,  # None: no step ran
        "train_pipeline": pipelined,
        "metrics": metrics,
    }
    if exported is not None:
        results["exported_semantic_ids"] = {"path": config.export_semantic_ids, "metrics": exported.metrics}
    atomic_write_json(out / "results.json", _json_safe(results))  # an undefined metric is null, never NaN
    return results


def _figures(examples: int, train_seconds: float, pipeline: Any) -> dict[str, Any]:
    """The training figures a checkpoint records with its progress, so a resumed run reports those of the whole
    run (examples trained, seconds spent in training steps, the pipeline's description)."""
    return {"examples": examples, "train_seconds": train_seconds, "train_pipeline": describe(pipeline)}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined metric, e.g. the AUC of a one-class split) as None."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _resume(dmp: nn.Module, optimizer: CombinedOptimizer, out: Path, identity: dict[str, str],
            resume_anyway: bool) -> dict[str, Any]:
    """Loads the newest checkpoint under ``out`` into ``dmp`` and ``optimizer``; its progress (zeros if none) and
    the training figures it recorded (:func:`_figures`)."""
    found = checkpoint.latest(out / "checkpoints")
    if found is None:
        logger.warning("resume: no checkpoint in %s, so this run starts from step 0", out / "checkpoints")
        return {"epoch": 0, "batch": 0, "step": 0}
    optimizer.init_state()  # Adam has no state before its first step: create it, so DCP can load into it
    state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
    progress = checkpoint.load(found, state, identity, allow_mismatch=resume_anyway)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from %s at epoch %d, batch %d", found, progress["epoch"], progress["batch"])
    return progress


def _evaluate_splits(dmp: nn.Module, data: InteractionData, config: TrainConfig, rank: int, world_size: int,
                     device: torch.device, writer: SummaryWriter | None, step: int) -> dict[str, dict[str, float]]:
    """:func:`evaluate` on every split of ``config.eval_splits`` and, when ``test`` is one, the test period's
    :func:`slice_metrics` (head / tail / cold items by training impressions), logged to ``writer`` at ``step``."""
    metrics = {}
    predictions = {}
    for split in config.eval_splits:
        batches = CtrBatches(data, split, config.batch_size, max_history=config.model.max_history, rank=rank,
                             world_size=world_size, index_dtype=config.torch_index_dtype())
        predictions[split] = predict(dmp, batches, device)
        p, y, rows = predictions[split]
        metrics[split] = ctr_metrics(p, y, torch.from_numpy(batches.samples.users)[rows])
    if "test" in predictions:
        metrics.update(slice_metrics(data, predictions, config.tail_impressions))
    if writer is not None:
        for split, values in metrics.items():
            for key in ("auc", "gauc", "ne", "logloss"):
                writer.add_scalar(f"{split}/{key}", values[key], step)
    return metrics


def _checkpoint(dmp: nn.Module, optimizer: CombinedOptimizer, out: Path, progress: dict[str, int],
                identity: dict[str, str]) -> None:
    checkpoint.save(out / "checkpoints", progress["step"],
                    {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}, progress, identity)
