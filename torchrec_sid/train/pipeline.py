"""The pipelined train step: TorchRec's ``TrainPipelineSparseDist`` over a :class:`SidDLRMTrain` wrapper.

``TrainPipelineSparseDist`` keeps up to three batches in flight: while batch ``i`` runs forward / backward /
optimizer step, the input dist (the ids' all-to-all to the ranks that own their table shards) of batch ``i + 1`` is
under way and batch ``i + 2`` is being copied to the device. It finds what it can pipeline by fx-tracing the model
from the batch: a sharded module is pipelined when its KJT input is an attribute of the batch (``sparse_arch``'s
``EmbeddingBagCollection``), or the output of parameter-free modules fed from the batch (``item_arch``'s
``EmbeddingCollection``, fed by a :class:`~torchrec_sid.modules.SidFeatureTransform`: with ``pipeline_postproc``
the transform is swapped for a ``PipelinedPostproc`` that runs in the input-dist stage of the batch, ahead of its
forward, which then takes the cached result). :func:`describe` lists what was pipelined.

The pipeline needs the model fx-traceable from the batch (leaf modules and ``torch.fx.wrap`` functions aside).
When it is not, :func:`train_pipeline` says why in a warning and returns TorchRec's ``TrainPipelineBase``, which
trains the same batches in the same order with the same step, overlapping only the device copy of the next batch.

Either way batch ``i`` is trained by the ``i``-th ``progress`` call, whatever the pipeline has fetched ahead, and
nothing done ahead touches parameters, optimizer state or the RNG (the input dist and the SID transform only move
and map ids), so a checkpoint taken between two calls holds the state after exactly the batches trained so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipeline, TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.tracing import Tracer, _get_leaf_module_names
from torchrec.distributed.types import ShardedModule

logger = logging.getLogger(__name__)

StepOutput = tuple[Tensor, Tensor, Tensor]


class SidDLRMTrain(nn.Module):
    """A CTR model with its loss, in the form TorchRec's train pipelines call (as ``torchrec.models.dlrm.DLRMTrain``).

    Args:
        model: ``forward(dense_features [B, F], sparse_features KJT) -> logits [B]`` (a
            :class:`~torchrec_sid.models.dlrm.SidDLRM`).

    ``forward(batch)`` -> ``(loss, (loss, logits [B], labels [B]))``: the mean binary cross-entropy of the logits
    and, detached, what the loop reports and evaluates.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[Tensor, StepOutput]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedModelParallel) else model


def untraceable_reason(model: nn.Module) -> str | None:
    """Why ``TrainPipelineSparseDist`` cannot trace ``model`` (None when it can): the pipeline's own trace."""
    inner = _unwrapped(model)
    try:
        Tracer(leaf_modules=_get_leaf_module_names(inner)).trace(inner)
    except Exception as e:  # noqa: BLE001  (any failure of the trace is the answer)
        return f"{type(e).__name__}: {e}"
    return None


class _NoStreamWarningFilter(logging.Filter):
    """Drops ``PipelinedPostproc``'s warning that it has no CUDA streams (so "may cause race conditions"): on CPU
    there are no streams, every stage runs in order on the one thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no default stream" not in record.getMessage() and "has no dist stream" not in record.getMessage()


def train_pipeline(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainPipeline:
    """The train pipeline of ``model`` (a DMP-sharded :class:`SidDLRMTrain`): each ``progress`` zeroes the
    gradients, runs forward and backward (the fused embedding optimizers step inside it) and steps ``optimizer``.

    ``TrainPipelineSparseDist`` when the model can be traced, else ``TrainPipelineBase`` with a warning saying why.
    """
    reason = untraceable_reason(model)
    if reason is not None:
        logger.warning("TrainPipelineSparseDist cannot trace the model (%s): training with TrainPipelineBase, "
                       "which does not pipeline the embeddings' input dist", reason)
        return TrainPipelineBase(model, optimizer, device)
    if device.type == "cpu":
        postproc_logger = logging.getLogger("torchrec.distributed.train_pipeline.postproc")
        if not any(isinstance(f, _NoStreamWarningFilter) for f in postproc_logger.filters):
            postproc_logger.addFilter(_NoStreamWarningFilter())
    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True, pipeline_postproc=True)


def describe(pipeline: TrainPipeline) -> dict[str, Any]:
    """The pipeline's class, the sharded modules whose input dist it runs ahead (and the parameter-free input
    modules it runs with it), and the sharded modules it calls in the forward as usual; by fully qualified name
    in the unwrapped model. Known after the first ``progress`` (all lists are empty before)."""
    model = _unwrapped(pipeline._model)
    started = getattr(pipeline, "_batch_count", 0) > 0
    names = {id(m): name for name, m in model.named_modules()}
    sharded = sorted(name for name, m in model.named_modules() if isinstance(m, ShardedModule)) if started else []
    pipelined = sorted(names[id(m)] for m in getattr(pipeline, "_pipelined_modules", []))
    return {
        "class": type(pipeline).__name__,
        "pipelined": pipelined,
        "pipelined_inputs": sorted(p.fqn for p in getattr(pipeline, "_pipelined_postprocs", [])),
        "not_pipelined": [name for name in sharded if name not in pipelined],
    }


def detach(pipeline: TrainPipeline) -> None:
    """Gives the model its own forwards back (and its input modules), so it can be called on a batch directly."""
    if isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.detach()


class TimedIterator:
    """Wraps an iterator and adds up the seconds its ``next`` calls take (the host building the batches)."""

    def __init__(self, iterator: Iterator[Batch]) -> None:
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - start


def train_steps(pipeline: TrainPipeline, batches: Iterator[Batch]) -> Iterator[tuple[StepOutput, float]]:
    """Trains on every batch of ``batches`` through ``pipeline``, in order; yields after each step its output
    ``(loss, logits, labels)`` and its seconds, less the time ``batches`` took to build batches. The pipeline
    starts afresh (``reset``): run each call's generator to its end before the next call."""
    pipeline.reset()  # a new iterator: TrainPipelineBase would otherwise keep the end of the previous one
    batches = batches if isinstance(batches, TimedIterator) else TimedIterator(batches)
    while True:
        start, loading = time.perf_counter(), batches.seconds
        try:
            output = pipeline.progress(batches)
        except StopIteration:
            return
        yield output, time.perf_counter() - start - (batches.seconds - loading)
