from __future__ import annotations

import math

import pytest
import torch

from torchrec_sid.metrics import auc
from torchrec_sid.train.metrics import ctr_metrics


def _pairwise_auc(p: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_metrics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(500, generator=g) < 0.3).float()
    p = torch.sigmoid(2 * y - 1 + torch.randn(500, generator=g)).round(decimals=1).clamp(0.05, 0.95)  # tied scores
    m = ctr_metrics(p, y)
    assert m["auc"] == pytest.approx(_pairwise_auc(p, y), abs=1e-9)
    logloss = -(y * p.double().log() + (1 - y) * (1 - p.double()).log()).mean().item()
    base = y.mean().item()
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert m["logloss"] == pytest.approx(logloss, rel=1e-6)
    assert m["ne"] == pytest.approx(logloss / entropy, rel=1e-6)
    assert m["count"] == 500 and m["positive_rate"] == pytest.approx(base)


def test_base_rate_predictor_has_ne_one_and_auc_half() -> None:
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    m = ctr_metrics(torch.full((5,), 0.4), y)
    assert m["ne"] == pytest.approx(1.0) and m["auc"] == pytest.approx(0.5)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"must both be \[N\], got \(3,\) and \(4,\)"):
        ctr_metrics(torch.zeros(3), torch.zeros(4))


def test_auc_of_a_one_class_split_is_nan_not_a_half() -> None:
    assert math.isnan(auc(torch.tensor([0.2, 0.9, 0.4]), torch.tensor([1, 1, 1])))
    assert math.isnan(ctr_metrics(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 0.0]))["auc"])


def test_gauc_is_the_impression_weighted_mean_of_per_user_aucs() -> None:
    from torchrec_sid.metrics import gauc

    # user 7: 4 impressions, positives 0.9 and 0.4 against negatives 0.5 and 0.1: pairs won 1 + 1 + 0 + 1 -> 3/4
    # user 3: 2 impressions, tied scores -> 1/2; user 5: clicks only, skipped (no AUC)
    scores = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3, 0.3, 0.8, 0.2])
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1])
    users = torch.tensor([7, 7, 7, 7, 3, 3, 5, 5])
    value, counted_users, counted = gauc(scores, labels, users)
    assert value == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    assert (counted_users, counted) == (2, 6)
    m = ctr_metrics(scores, labels.float(), users)
    assert m["gauc"] == pytest.approx(value) and (m["gauc_users"], m["gauc_count"]) == (2, 6)
    assert m["auc"] != pytest.approx(value)  # not the pooled AUC


def test_gauc_matches_a_per_user_loop_and_is_nan_without_two_class_users() -> None:
    from torchrec_sid.metrics import gauc

    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, 40, (600,), generator=g)
    labels = (torch.rand(600, generator=g) < 0.3).long()
    scores = (torch.rand(600, generator=g) + 0.3 * labels).round(decimals=1)  # ties within users
    total, weight = 0.0, 0
    for u in users.unique():
        mask = users == u
        if 0 < int(labels[mask].sum()) < int(mask.sum()):
            total += int(mask.sum()) * auc(scores[mask], labels[mask])
            weight += int(mask.sum())
    assert gauc(scores, labels, users)[0] == pytest.approx(total / weight, abs=1e-12)
    assert math.isnan(gauc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), torch.tensor([0, 1]))[0])
    with pytest.raises(ValueError, match="must all be"):
        gauc(torch.zeros(3), torch.zeros(3), torch.zeros(2))
