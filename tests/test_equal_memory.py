"""The "hashed id + SID" equal-memory arm: ``model.id_buckets`` with ``sid`` makes the hashed item id one more token
table of the SID transform, inside ``sid_tokens.row_budget``."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_sid.models.configs import FeatureSchema, ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import SidDLRM, hashed_id_transform
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds

NUM_ITEMS = 1000
SCHEMA = FeatureSchema({"user_id": 10}, 2, NUM_ITEMS, "item_id", "history_item_ids")
PREFIX = SidTokenConfig(prefix_lengths=(2, 3))


def _sids() -> SemanticIds:
    codes = torch.randint(0, 16, (NUM_ITEMS, 3), generator=torch.Generator().manual_seed(0))
    codes[1] = codes[0]  # items 0 and 1 share their SID
    return SemanticIds(codes, [16, 16, 16], "rq_kmeans", {})


def _hashed_id_and_sid(tokens: SidTokenConfig, buckets: int) -> SidDLRM:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=4, item_representation=("id", "sid"), id_buckets=buckets, sid_tokens=tokens)
    return SidDLRM.from_config(config, SCHEMA, _sids())


def _tables(model: SidDLRM) -> dict[str, int]:
    collection = model.item_arch.embedding_collection
    assert collection is not None
    return {c.name: c.num_embeddings for c in collection.embedding_configs()}


def test_the_hashed_id_is_one_more_token_table_of_the_sid_transform() -> None:
    model = _hashed_id_and_sid(PREFIX, 125)
    assert _tables(model) == {"sid_l0": 16, "sid_l1": 16, "sid_l2": 16, "sid_l3": 125, "sid_prefix2": 256,
                              "sid_prefix3": 4096}
    transform = model.item_arch.transform
    assert isinstance(transform, SidFeatureTransform)
    alone = hashed_id_transform(NUM_ITEMS, 125, ["item_id", "history_item_ids"])
    assert torch.equal(transform.item_tokens[3], alone.item_tokens[0])  # the same buckets as the id_hash arm
    assert torch.equal(transform.item_tokens[[0, 1, 2]].long(), _sids().codes.T)  # the SID levels unchanged


def test_the_row_budget_holds_the_hashed_id_table_too() -> None:
    # 3 x 16 exact per-level rows; the id (500 values), prefix2 (256) and prefix3 (4,096) share the other 77 rows
    tables = _tables(_hashed_id_and_sid(SidTokenConfig(prefix_lengths=(2, 3), row_budget=125), 500))
    assert tables == {"sid_l0": 16, "sid_l1": 16, "sid_l2": 16, "sid_l3": 25, "sid_prefix2": 25, "sid_prefix3": 25}
    assert sum(tables.values()) <= 125


def test_items_sharing_a_sid_get_distinct_vectors_from_their_hashed_ids() -> None:
    model = _hashed_id_and_sid(PREFIX, 125)
    transform = model.item_arch.transform
    assert isinstance(transform, SidFeatureTransform)
    assert int(transform.item_tokens[3, 0]) != int(transform.item_tokens[3, 1])  # distinct id buckets
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "history_item_ids"],
                                                   values=torch.tensor([0, 1, 0, 1]),
                                                   lengths=torch.tensor([1, 1, 1, 1]))
    vectors = model.item_arch(features)
    assert vectors.candidate.shape == (2, 4) and vectors.history.shape == (2, 4)
    assert not torch.allclose(vectors.candidate[0], vectors.candidate[1])
    assert torch.allclose(vectors.candidate, vectors.history)  # candidate and history read the same rows


def test_settings_that_would_join_the_hashed_id_to_sid_codes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"ngram_orders must be \[1\], got \[1, 2\]"):
        ModelConfig(item_representation=("id", "sid"), id_buckets=10, sid_tokens=SidTokenConfig(ngram_orders=(1, 2)))
    with pytest.raises(ValueError, match="not with sid_features"):
        ModelConfig(item_representation=("id", "sid"), id_buckets=10, sid_features=True)
    with pytest.raises(ValueError, match=r"prefix_lengths <= 2, got \[1\] and \[3\]"):
        _hashed_id_and_sid(SidTokenConfig(prefix_lengths=(3,), num_levels=2), 10)
    with pytest.raises(ValueError, match="without id_dropout"):
        ModelConfig(item_representation=("id", "sid"), id_buckets=10, id_dropout=0.1)
