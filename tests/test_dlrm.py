from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchrec_sid.data import movielens
from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.models.dlrm import ModelConfig, SidDLRM, count_parameters
from torchrec_sid.quantizers import SemanticIds


@pytest.fixture
def data(ml100k_folder: Path):
    return movielens.load(ml100k_folder).interactions(cold_frac=0.0)


@pytest.fixture
def ternary_sids() -> SemanticIds:
    """Ordinal SIDs for the fixture's 8 items: 3 ternary digits each, as DPCA writes them."""
    codes = torch.tensor([[i % 3, (i // 3) % 3, 1] for i in range(8)])
    return SemanticIds(codes, [3, 3, 3], "dpca", {}, digit_centres=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("representation", [("id",), ("sid",), ("side",), ("id", "sid", "side")])
@pytest.mark.parametrize("block", ["none", "pooling", "pma", "din", "sim", "dmqn"])
def test_every_representation_and_block_trains(data, ternary_sids, representation, block) -> None:
    torch.manual_seed(0)
    content = torch.randn(8, 6)
    config = ModelConfig(embedding_dim=8, item_representation=representation, history_block=block, content=True,
                         max_history=4, dense_layers=(8,), over_layers=(8, 4))
    model = SidDLRM(config, data.catalog, ternary_sids, content)
    batch = next(iter(CtrBatches(data, "train", batch_size=6, max_history=4)))
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("over_arch"))
    assert count_parameters(model)["total"] == sum(p.numel() for p in model.parameters())


def test_side_refuses_categorical_codes(data) -> None:
    sids = SemanticIds(torch.zeros(8, 2, dtype=torch.long), [4, 4], "rq_kmeans", {})
    with pytest.raises(ValueError, match="digit"):
        SidDLRM(ModelConfig(item_representation=("side",)), data.catalog, sids)
