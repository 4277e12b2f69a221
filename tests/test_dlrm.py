from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.fx import symbolic_trace

from torchrec_sid.data import movielens
from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.models.dlrm import ModelConfig, SidDLRM, count_parameters
from torchrec_sid.quantizers.mmq import MMQ, MMQTokenizer
from torchrec_sid.sid import SemanticIds


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
    model = SidDLRM(config, data.catalog, ternary_sids, {"text": content})
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


@pytest.fixture
def tokenizer() -> tuple[MMQTokenizer, dict[str, torch.Tensor]]:
    """A stage-1 MMQ tokenizer over two signals of the fixture's 8 items."""
    g = torch.Generator().manual_seed(0)
    signals = {"text": torch.randn(8, 6, generator=g), "meta": torch.rand(8, 3, generator=g)}
    q = MMQ({"text": "mse", "meta": "mse"}, num_shared=1, num_specific=1, codebook_size=4, latent_dim=4,
            hidden_dim=8, max_epochs=2, batch_size=4, init_rows=8, valid_frac=0.25, seed=0).fit(signals)
    return q.model_, signals


def test_soft_sid_item_arch_trains_the_tokenizer(data, tokenizer) -> None:
    model_tokenizer, signals = tokenizer
    config = ModelConfig(embedding_dim=8, item_representation=("id", "soft_sid"), history_block="din",
                         max_history=4, dense_layers=(8,), over_layers=(8, 4))
    model = SidDLRM(config, data.catalog, signals=signals, tokenizer=model_tokenizer)
    batch = next(iter(CtrBatches(data, "train", batch_size=6, max_history=4)))
    logits = model(batch.dense_features, batch.sparse_features)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    expert = model.item_arch.soft_sid.tokenizer.shared[0][0].weight
    assert expert.grad is not None and expert.grad.abs().sum() > 0


@pytest.mark.parametrize("representation", [("id", "sid", "side"), ("id", "soft_sid")])
def test_model_traces_with_torchrec_fx(data, ternary_sids, tokenizer, representation) -> None:
    model_tokenizer, signals = tokenizer
    config = ModelConfig(embedding_dim=8, item_representation=representation, history_block="din", max_history=4,
                         dense_layers=(8,), over_layers=(8, 4))
    model = SidDLRM(config, data.catalog, ternary_sids, signals, model_tokenizer).eval()
    batch = next(iter(CtrBatches(data, "test", batch_size=5, max_history=4)))
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(batch.dense_features, batch.sparse_features),
                               model(batch.dense_features, batch.sparse_features))


def test_untrained_ids_are_out_of_vocabulary(data) -> None:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=8, history_block="none", dense_layers=(8,), over_layers=(8, 4))
    known = torch.ones(8, dtype=torch.bool)
    known[[2, 5]] = False
    arch = SidDLRM(config, data.catalog, trained_items=known).item_arch.eval()
    batch = next(iter(CtrBatches(data, "train", batch_size=40, max_history=4)))
    candidate, history = arch(batch.sparse_features)
    items = batch.sparse_features["item_id"].values()
    hist = batch.sparse_features["history_item_ids"].values()
    assert (candidate[~known[items]] == 0).all() and (candidate[known[items]] != 0).any(dim=1).all()
    assert (history[~known[hist]] == 0).all() and (history[known[hist]] != 0).any(dim=1).all()


def test_id_dropout_drops_only_in_training(data) -> None:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=8, id_dropout=0.5, history_block="none", dense_layers=(8,), over_layers=(8,))
    arch = SidDLRM(config, data.catalog).item_arch
    batch = next(iter(CtrBatches(data, "train", batch_size=40, max_history=4)))
    dropped = (arch(batch.sparse_features)[0] == 0).all(dim=1).float().mean()
    assert 0.2 < dropped < 0.8
    assert (arch.eval()(batch.sparse_features)[0] != 0).any(dim=1).all()


@pytest.mark.parametrize("fields, message", [
    ({"id_dropout": 1.0}, "model.id_dropout must be in"),
    ({"item_representation": ("sid",), "id_dropout": 0.1}, "has no id"),
])
def test_bad_id_dropout_raises(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_soft_sid_without_tokenizer_or_signals_names_the_field(data, tokenizer) -> None:
    config = ModelConfig(item_representation=("soft_sid",))
    with pytest.raises(ValueError, match="train.tokenizer"):
        SidDLRM(config, data.catalog)
    with pytest.raises(ValueError, match=r"signal\(s\) \['meta'\]"):
        SidDLRM(config, data.catalog, signals={"text": tokenizer[1]["text"]}, tokenizer=tokenizer[0])
