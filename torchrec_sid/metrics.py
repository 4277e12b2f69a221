"""The one ROC AUC of the library (training evaluation, data oracles, benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores: [N]`` for binary ``labels: [N]`` (Mann-Whitney on average ranks, so tied scores count
    one half); NaN when a class is missing, where the AUC is undefined.

    ``torchrec.metrics.auc.compute_auc`` orders tied scores arbitrarily (a constant predictor can score 0.67), so the
    library computes every AUC here.

    Example::

        auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))  # 0.75
    """
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores.double())
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    average_rank = (last - (counts - 1) / 2.0)[inverse]  # 1-based rank, averaged within each tie group
    positive_rank_sum = float((average_rank * labels.double()[order]).sum())
    return (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
