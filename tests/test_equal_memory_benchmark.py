"""The data views of ``benchmarks/ranking_evidence.py``'s history experiments: the longest users' samples, and what
the blocks see of their histories (nothing truncated)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from torchrec_sid.data.synthetic import SyntheticConfig, generate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = SyntheticConfig(num_items=300, num_users=30, num_clusters=6, content_dim=8, min_history=5, max_history=60,
                       samples_per_user=20, cold_frac=0.2, seed=3)


@pytest.fixture(scope="module")
def evidence() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling ``common``
    try:
        import ranking_evidence
    finally:
        sys.path.remove(str(BENCHMARKS))
    return ranking_evidence


def test_longest_users_keeps_the_samples_of_the_users_with_the_longest_histories(evidence: ModuleType) -> None:
    data = generate(TINY).interactions
    lengths = data.histories.lengths()
    view = evidence.longest_users(data, 5)
    kept = set(np.concatenate([s.users for s in view.splits.values()]).tolist())
    assert len(kept) <= 5 and min(lengths[sorted(kept)]) >= np.sort(lengths)[-5]
    for name, samples in data.splits.items():  # every sample of those users, none of the others
        assert len(view.splits[name]) == int(np.isin(samples.users, sorted(kept)).sum())
    assert view.histories is data.histories
    with pytest.raises(ValueError, match=r"longest_users must be in \[1, 30\]"):
        evidence.longest_users(data, 31)


def test_describe_histories_says_whether_max_history_truncates(evidence: ModuleType) -> None:
    data = generate(TINY).interactions
    longest = max(int(s.history_lengths.max()) for s in data.splits.values())
    assert not evidence.describe_histories(data, longest)["truncated"]
    seen = evidence.describe_histories(data, longest - 1)
    assert seen["truncated"] and seen["longest_sample_history"] == longest
    assert TINY.min_history <= seen["user_history_min"] <= seen["user_history_max"] <= TINY.max_history
