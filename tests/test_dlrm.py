from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_sid.data import movielens
from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.models.dlrm import (
    HistoryArch,
    ItemArch,
    ItemVectors,
    ModelConfig,
    SidDLRM,
    count_parameters,
    embedding_collections,
    table_parameters,
)
from torchrec_sid.models.factory import from_catalog
from torchrec_sid.modules import DIN, SidFeatureTransform
from torchrec_sid.quantizers.mmq import MMQ, MMQTokenizer
from torchrec_sid.sid import SemanticIds


@pytest.fixture
def data(ml100k_folder: Path):
    return movielens.load(ml100k_folder).interactions(cold_frac=0.0)


@pytest.fixture
def ternary_sids() -> SemanticIds:
    """Ordinal SIDs for the fixture's 8 items: 3 ternary digits each, as DPCA writes them; the first (SIM's search
    key) is coarse: items 0-2, 3-5 and 6-7."""
    codes = torch.tensor([[i // 3, i % 3, 1] for i in range(8)])
    return SemanticIds(codes, [3, 3, 3], "dpca", {}, digit_centres=[1.0, 1.0, 1.0])


def _nonzero_grads(module: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it got a non-zero gradient."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def _batch_with_histories(data, size: int = 6):
    """The first training sample (no history) and the last ``size - 1`` (several events each)."""
    batches = CtrBatches(data, "train", batch_size=size, max_history=4)
    n = len(batches.samples)
    batch = batches.build(np.r_[0, n - size + 1:n])
    lengths = batch.sparse_features["history_item_ids"].lengths()
    assert lengths[0] == 0 and (lengths[1:] >= 2).all()
    return batch


@pytest.mark.parametrize("representation", [("id",), ("sid",), ("side",), ("id", "sid", "side")])
@pytest.mark.parametrize("block", ["none", "pooling", "pma", "din", "sim", "dmqn"])
def test_every_representation_and_block_trains(data, ternary_sids, representation, block) -> None:
    torch.manual_seed(0)
    content = torch.randn(8, 6)
    config = ModelConfig(embedding_dim=8, item_representation=representation, history_block=block, content=True,
                         max_history=4, dense_layers=(16,), over_layers=(32,))  # wide enough for no dead layer
    model = from_catalog(config, data.catalog, ternary_sids, {"text": content})
    items = {}

    def keep(module: nn.Module, args: tuple, out: ItemVectors) -> None:
        out.history.retain_grad()
        items["out"] = out

    model.item_arch.register_forward_hook(keep)
    batch = _batch_with_histories(data)
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    # every representation and the history block feed the logits: all their parameters get a gradient
    item_grads = _nonzero_grads(model.item_arch)
    assert item_grads and all(item_grads.values()), item_grads
    history_grad = items["out"].history.grad
    if block == "none":
        assert model.history_arch is None and history_grad is None
    else:  # the history block reads the history events (MeanPooling has no parameters of its own)
        per_event = history_grad.abs().sum(dim=1)
        # SIM attends only to the events that share the candidate's search key
        assert (per_event > 0).any() if block == "sim" else (per_event > 0).all()
        # every weight matrix; not every bias: the attention score's last bias is softmax-invariant (zero gradient)
        assert all(p.grad is not None for p in model.history_arch.parameters())
        weights = {n: nonzero for n, nonzero in _nonzero_grads(model.history_arch).items()
                   if model.history_arch.get_parameter(n).ndim >= 2}
        assert all(weights.values()) and (weights or block == "pooling"), weights


def test_history_changes_the_logits_only_with_a_history_block(data) -> None:
    """The history block reads the history events: other histories, other logits (and none without a block)."""
    batch = _batch_with_histories(data)
    features = batch.sparse_features
    shuffled = features.values().clone()
    start = int(features.offset_per_key()[features.keys().index("history_item_ids")])
    count = int(features["history_item_ids"].values().numel())
    shuffled[start:start + count] = (shuffled[start:start + count] + 1) % 8
    changed = type(features)(keys=features.keys(), values=shuffled, lengths=features.lengths())
    for block, differs in (("din", True), ("none", False)):
        torch.manual_seed(0)
        config = ModelConfig(embedding_dim=8, history_block=block, max_history=4, dense_layers=(8,),
                             over_layers=(8,))
        model = from_catalog(config, data.catalog).eval()
        same = torch.equal(model(batch.dense_features, features), model(batch.dense_features, changed))
        assert same != differs, block


def test_count_parameters_counts_the_tables_of_the_collections(data, ternary_sids) -> None:
    config = ModelConfig(embedding_dim=8, item_representation=("id", "sid", "side"), history_block="din",
                         max_history=4, dense_layers=(8,), over_layers=(8,))
    model = from_catalog(config, data.catalog, ternary_sids)
    # a dense layer whose name contains a table module's name is not a table
    model.item_arch.add_module("embedding_collection_gate", nn.Linear(8, 8))
    catalog, d = data.catalog, 8
    pooled_rows = catalog.num_users + sum(catalog.user_feature_cardinalities.values()) + len(catalog.genre_names)
    sid_rows = 3 + 3 + 3  # one token table per ternary level
    expected_tables = (pooled_rows + catalog.num_items + sid_rows) * d
    counts = count_parameters(model)
    assert counts["embedding"] == expected_tables
    assert counts["total"] == counts["embedding"] + counts["dense"]
    dense_modules = [model.dense_arch, model.over_arch, model.history_arch, model.item_arch.side,
                     model.item_arch.embedding_collection_gate]
    assert counts["dense"] == sum(p.numel() for m in dense_modules for p in m.parameters())
    assert [type(m) for m in embedding_collections(model)] == [EmbeddingBagCollection, EmbeddingCollection]
    assert {id(p) for p in table_parameters(model)} == {
        id(p) for m in (model.sparse_arch.embedding_bag_collection, model.item_arch.embedding_collection)
        for p in m.parameters()}


def test_side_refuses_categorical_codes(data) -> None:
    sids = SemanticIds(torch.zeros(8, 2, dtype=torch.long), [4, 4], "rq_kmeans", {})
    with pytest.raises(ValueError, match="digit"):
        from_catalog(ModelConfig(item_representation=("side",)), data.catalog, sids)


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
    model = from_catalog(config, data.catalog, signals=signals, tokenizer=model_tokenizer)
    batch = next(iter(CtrBatches(data, "train", batch_size=6, max_history=4)))
    logits = model(batch.dense_features, batch.sparse_features)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    expert = model.item_arch.soft_sid.tokenizer.shared[0][0].weight
    assert expert.grad is not None and expert.grad.abs().sum() > 0
    # the soft-SID tables are dense parameters (trained by Adam), not sharded tables
    assert all(p is not model.item_arch.soft_sid.tables for p in table_parameters(model))


@pytest.mark.parametrize("representation", [("id", "sid", "side"), ("id", "soft_sid")])
def test_model_traces_with_torchrec_fx(data, ternary_sids, tokenizer, representation) -> None:
    model_tokenizer, signals = tokenizer
    config = ModelConfig(embedding_dim=8, item_representation=representation, history_block="din", max_history=4,
                         dense_layers=(8,), over_layers=(8, 4))
    model = from_catalog(config, data.catalog, ternary_sids, signals, model_tokenizer).eval()
    batch = next(iter(CtrBatches(data, "test", batch_size=5, max_history=4)))
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(batch.dense_features, batch.sparse_features),
                               model(batch.dense_features, batch.sparse_features))


def test_untrained_ids_are_out_of_vocabulary(data) -> None:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=8, history_block="none", dense_layers=(8,), over_layers=(8, 4))
    known = torch.ones(8, dtype=torch.bool)
    known[[2, 5]] = False
    arch = from_catalog(config, data.catalog, trained_items=known).item_arch.eval()
    batch = next(iter(CtrBatches(data, "train", batch_size=40, max_history=4)))
    out = arch(batch.sparse_features)
    items = batch.sparse_features["item_id"].values()
    hist = batch.sparse_features["history_item_ids"].values()
    assert (out.candidate[~known[items]] == 0).all() and (out.candidate[known[items]] != 0).any(dim=1).all()
    assert (out.history[~known[hist]] == 0).all() and (out.history[known[hist]] != 0).any(dim=1).all()


def test_id_dropout_drops_only_in_training(data) -> None:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=8, id_dropout=0.5, history_block="none", dense_layers=(8,), over_layers=(8,))
    arch = from_catalog(config, data.catalog).item_arch
    batch = next(iter(CtrBatches(data, "train", batch_size=40, max_history=4)))
    dropped = (arch(batch.sparse_features).candidate == 0).all(dim=1).float().mean()
    assert 0.2 < dropped < 0.8
    assert (arch.eval()(batch.sparse_features).candidate != 0).any(dim=1).all()


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
        from_catalog(config, data.catalog)
    with pytest.raises(ValueError, match=r"signal\(s\) \['meta'\]"):
        from_catalog(config, data.catalog, signals={"text": tokenizer[1]["text"]}, tokenizer=tokenizer[0])


def _collection(features: list[str], dim: int = 4) -> EmbeddingCollection:
    return EmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=dim, num_embeddings=5,
                                                       feature_names=features)])


def test_item_arch_refuses_tables_it_cannot_place() -> None:
    sids = SemanticIds(torch.tensor([[0, 1], [1, 0]]), [2, 2], "rq_kmeans", {})
    with pytest.raises(ValueError, match="reads feature 'page_id', which is neither 'ad'"):
        ItemArch("ad", "seen_ads", 4, embedding_collection=_collection(["ad", "page_id"]))
    with pytest.raises(ValueError, match="table 't' is 6-d, embedding_dim 4"):
        ItemArch("ad", "seen_ads", 4, embedding_collection=_collection(["ad"], dim=6))
    with pytest.raises(ValueError, match=r"transform derives tokens from \['page_id'\]"):
        ItemArch("ad", "seen_ads", 4, embedding_collection=_collection(["ad"]),
                 transform=SidFeatureTransform(sids, ["ad", "page_id"]))
    with pytest.raises(ValueError, match="together"):
        ItemArch("ad", "seen_ads", 4, embedding_collection=_collection(["ad"]), timestamp_feature="now")
    with pytest.raises(ValueError, match="at least one"):
        ItemArch("ad", "seen_ads", 4)


def test_sid_dlrm_checks_the_sizes() -> None:
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="u", embedding_dim=4, num_embeddings=3,
                                                            feature_names=["user"])])
    arch = ItemArch("ad", "seen_ads", 4, embedding_collection=_collection(["ad", "seen_ads"]))
    with pytest.raises(ValueError, match="last dense arch layer must be embedding_dim 4"):
        SidDLRM(ebc, arch, 2, [8, 3], [4, 1])
    with pytest.raises(ValueError, match="last over arch layer must be 1"):
        SidDLRM(ebc, arch, 2, [8, 4], [4, 2])
    with pytest.raises(ValueError, match="history_arch is 8-d"):
        SidDLRM(ebc, arch, 2, [8, 4], [4, 1], history_arch=HistoryArch(DIN(8), 8, max_history=3))
    wide = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=3,
                                                             feature_names=["user"])])
    with pytest.raises(ValueError, match="every pooled table must be"):
        SidDLRM(wide, arch, 2, [8, 4], [4, 1])
