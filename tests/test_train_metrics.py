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
