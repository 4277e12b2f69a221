"""Evaluation metrics of a CTR model, computed with TorchRec's metric functions on all of a split's predictions.

* ``auc``: area under the ROC curve from average ranks (Mann-Whitney), exact with tied scores.
  (``torchrec.metrics.auc.compute_auc`` orders tied scores arbitrarily: a constant predictor can score 0.67.)
* ``ne``: normalised entropy, ``torchrec.metrics.ne.compute_ne``: the log loss divided by the entropy of the label
  mean (``NE = -1/N sum [y log p + (1-y) log(1-p)] / -[p̂ log p̂ + (1-p̂) log(1-p̂)]``; < 1 beats the base rate).
* ``logloss``: mean binary cross-entropy in nats.

Predictions are gathered from every rank first, so the numbers are those of the whole split, not a mean of
per-rank values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

ETA = 1e-12


def ctr_metrics(probabilities: Tensor, labels: Tensor) -> dict[str, float]:
    """``probabilities: [N]`` in ``[0, 1]`` and ``labels: [N]`` in ``{0, 1}`` -> auc, ne, logloss, count, pos rate."""
    if probabilities.shape != labels.shape or probabilities.ndim != 1:
        raise ValueError(f"probabilities and labels must both be [N], got {tuple(probabilities.shape)} and "
                         f"{tuple(labels.shape)}")
    n = len(labels)
    if n == 0:
        return {"auc": float("nan"), "ne": float("nan"), "logloss": float("nan"), "count": 0, "positive_rate": 0.0}
    p, y = probabilities.double(), labels.double()
    weights = torch.ones_like(p)
    ce_sum = compute_cross_entropy(y, p, weights, ETA).sum()  # bits
    positives = y.sum()
    ne = compute_ne(ce_sum, weights.sum(), positives, n - positives, ETA)
    return {
        "auc": auc(p, y),
        "ne": float(ne),
        "logloss": float(ce_sum) * math.log(2) / n,
        "count": n,
        "positive_rate": float(positives) / n,
    }


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores: [N]`` for binary ``labels: [N]``; tied scores share their average rank; 0.5 when a
    class is missing."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return 0.5
    sorted_scores, order = torch.sort(scores.double())
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    average_rank = (last - (counts - 1) / 2.0)[inverse]  # 1-based rank, averaged within each tie group
    positive_rank_sum = float((average_rank * labels.double()[order]).sum())
    return (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def gather(tensor: Tensor) -> Tensor:
    """This rank's ``[n]`` predictions or labels -> every rank's, concatenated in rank order (identity on 1 process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype)
    padded[: len(tensor)] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])
