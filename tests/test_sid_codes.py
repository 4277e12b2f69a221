"""Collision handling on semantic-ID codes and the SemanticIds artifact's use of it."""

import pytest
import torch

from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.codes import add_collision_suffix, collision_rate


def test_suffix_numbers_shared_codes_in_item_order():
    codes = torch.tensor([[3, 1], [0, 2], [3, 1], [3, 1], [0, 2], [5, 5]])
    with_suffix, cardinality = add_collision_suffix(codes)
    assert with_suffix.tolist() == [[3, 1, 0], [0, 2, 0], [3, 1, 1], [3, 1, 2], [0, 2, 1], [5, 5, 0]]
    assert cardinality == 3


def test_suffix_makes_every_code_unique():
    codes = torch.randint(0, 3, (2000, 2), generator=torch.Generator().manual_seed(0))
    with_suffix, cardinality = add_collision_suffix(codes)
    assert collision_rate(codes) == 1.0
    assert len(torch.unique(with_suffix, dim=0)) == len(codes)
    assert collision_rate(with_suffix) == 0.0
    assert torch.equal(with_suffix[:, :2], codes)
    assert int(with_suffix[:, 2].max()) == cardinality - 1


def test_unique_codes_get_suffix_zero():
    codes = torch.arange(12).view(6, 2)
    with_suffix, cardinality = add_collision_suffix(codes)
    assert cardinality == 1 and with_suffix[:, 2].eq(0).all()


def test_collision_rate_counts_items_in_shared_codes():
    codes = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0]])
    assert collision_rate(codes) == 0.5
    assert collision_rate(codes[:0]) == 0.0


@pytest.mark.parametrize("bad, message", [(torch.zeros(5, dtype=torch.long), "2-D"), (torch.zeros(5, 2), "integer")])
def test_bad_codes_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        add_collision_suffix(bad)


def test_semantic_ids_with_suffix_records_rates_before_and_after():
    codes = torch.tensor([[1, 2], [1, 2], [0, 3], [1, 2]])
    sids = SemanticIds(codes, [4, 4], "rq_kmeans", {"levels": 2}, {"rmse": 0.1})
    unique = sids.with_collision_suffix()
    assert unique.num_levels == 3 and unique.num_items == 4
    assert unique.cardinalities == [4, 4, 3]
    assert unique.metrics["collision_rate_before_suffix"] == 0.75
    assert unique.metrics["collision_rate"] == 0.0
    assert unique.metrics["rmse"] == 0.1
    assert sids.num_levels == 2  # the original is unchanged


def test_semantic_ids_validate_names_the_bad_code():
    with pytest.raises(ValueError, match=r"codes\[1, 1\] = 4 is outside \[0, 4\) at level 1"):
        SemanticIds(torch.tensor([[0, 0], [1, 4]]), [4, 4], "rq_kmeans", {})
    with pytest.raises(ValueError, match="-1 is outside"):
        SemanticIds(torch.tensor([[0, -1]]), [4, 4], "rq_kmeans", {})
    with pytest.raises(ValueError, match="one column per cardinality"):
        SemanticIds(torch.zeros(3, 2, dtype=torch.long), [4, 4, 4], "rq_kmeans", {})
