"""Evaluation metrics of a CTR model, computed with TorchRec's metric functions on all of a split's predictions.

* ``auc``: :func:`torchrec_sid.metrics.auc` (exact with tied scores; NaN for a one-class split).
* ``ne``: normalised entropy, ``torchrec.metrics.ne.compute_ne``: the log loss divided by the entropy of the label
  mean (``NE = -1/N sum [y log p + (1-y) log(1-p)] / -[p̂ log p̂ + (1-p̂) log(1-p̂)]``; < 1 beats the base rate).
* ``logloss``: mean binary cross-entropy in nats.
* ``gauc`` (with ``users``): :func:`torchrec_sid.metrics.gauc`, the per-user AUC weighted by the user's
  impressions; users whose impressions are all of one class are skipped (``gauc_users`` / ``gauc_count``: the users
  and impressions it counts).

Predictions are gathered from every rank first, so the numbers are those of the whole split, not a mean of
per-rank values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

from torchrec_sid._dist import is_distributed
from torchrec_sid.metrics import auc, gauc

ETA = 1e-12


def ctr_metrics(probabilities: Tensor, labels: Tensor, users: Tensor | None = None) -> dict[str, float]:
    """``probabilities: [N]`` in ``[0, 1]`` and ``labels: [N]`` in ``{0, 1}`` -> auc, ne, logloss, count, pos rate;
    with ``users: [N]`` also gauc, gauc_users, gauc_count."""
    if probabilities.shape != labels.shape or probabilities.ndim != 1:
        raise ValueError(f"probabilities and labels must both be [N], got {tuple(probabilities.shape)} and "
                         f"{tuple(labels.shape)}")
    n = len(labels)
    grouped: dict[str, float] = {}
    if users is not None:
        value, counted_users, counted = gauc(probabilities, labels, users)
        grouped = {"gauc": value, "gauc_users": counted_users, "gauc_count": counted}
    if n == 0:
        return {"auc": float("nan"), "ne": float("nan"), "logloss": float("nan"), "count": 0, "positive_rate": 0.0,
                **grouped}
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
        **grouped,
    }


def gather(tensor: Tensor) -> Tensor:
    """This rank's ``[n]`` predictions or labels -> every rank's, concatenated in rank order (identity on 1 process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype)
    padded[: len(tensor)] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])
