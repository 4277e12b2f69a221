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


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> tuple[float, int, int]:
    """Group AUC: the :func:`auc` of each group (e.g. each user) weighted by the group's number of impressions.

    ``scores``, ``labels``, ``groups``: ``[N]``. A group whose impressions are all of one class has no AUC and is
    skipped (neither its AUC nor its weight counts). Returns ``(gauc, groups counted, impressions counted)``; the
    GAUC is NaN when no group has both classes.

    Example::

        # user 0: auc 1.0 over 3 impressions; user 1: auc 0.5 over 2; user 2: one class, skipped
        gauc(torch.tensor([0.1, 0.9, 0.8, 0.3, 0.3, 0.7]), torch.tensor([0, 1, 1, 0, 1, 1]),
             torch.tensor([0, 0, 0, 1, 1, 2]))  # (0.8, 2, 5) = ((3 * 1.0 + 2 * 0.5) / 5, ...)
    """
    scores, labels, groups = (torch.as_tensor(t) for t in (scores, labels, groups))
    if not scores.shape == labels.shape == groups.shape or scores.ndim != 1:
        raise ValueError(f"gauc: scores, labels and groups must all be [N], got {tuple(scores.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(groups.shape)}")
    n = len(scores)
    if n == 0:
        return float("nan"), 0, 0
    s, y, g = scores.double(), labels.double(), groups.long()
    order = torch.argsort(s, stable=True)
    order = order[torch.argsort(g[order], stable=True)]  # by group, then by score
    s, y, g = s[order], y[order], g[order]
    _, group_of, group_sizes = torch.unique_consecutive(g, return_inverse=True, return_counts=True)
    group_start = (torch.cumsum(group_sizes, 0) - group_sizes)[group_of]
    new_tie = torch.ones(n, dtype=torch.bool)
    new_tie[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    tie_start = torch.nonzero(new_tie).flatten()
    tie_end = torch.cat([tie_start[1:], torch.tensor([n])])  # exclusive
    tie_of = torch.cumsum(new_tie.long(), 0) - 1
    # 1-based rank within the group, averaged over tied scores
    rank = (tie_start[tie_of] + tie_end[tie_of] + 1).double() / 2.0 - group_start.double()
    groups_n = len(group_sizes)
    positives = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, group_of, y)
    rank_sums = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, group_of, rank * y)
    negatives = group_sizes.double() - positives
    valid = (positives > 0) & (negatives > 0)
    if not bool(valid.any()):
        return float("nan"), 0, 0
    per_group = (rank_sums - positives * (positives + 1) / 2.0) / (positives * negatives).clamp(min=1.0)
    weights = group_sizes.double() * valid
    return float((per_group * weights).sum() / weights.sum()), int(valid.sum()), int(weights.sum())
