"""SIDs as input features: the code path (the batch carries SID codes, SidCodeTransform packs them) gives the
lookup path's tokens and the same model outputs; a delta version published to a built model reaches it in the next
batch; the code path traces and pipelines like the lookup path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchrec.fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.multiprocess import run_multiprocess
from torchrec_sid.data.batches import HISTORY_ITEM_IDS, ITEM_ID, CtrBatches, InteractionData
from torchrec_sid.data.parquet import ParquetCtrBatches, write_shards
from torchrec_sid.data.synthetic import SyntheticConfig, generate
from torchrec_sid.models.configs import ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import SidDLRM, replicated_buffer_bytes
from torchrec_sid.models.factory import catalog_schema
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.modules.sid_codes import SidCodeTransform, lookup_table_bytes
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.versions import SidStore, SidTable

FEATURES = [ITEM_ID, HISTORY_ITEM_IDS]


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return generate(SyntheticConfig(num_items=60, num_users=30, min_history=3, max_history=12, samples_per_user=8,
                                    num_clusters=6, content_dim=8, time_span_days=30, seed=1)).interactions


def _sids(num_items: int = 60) -> SemanticIds:
    """Seeded ordinal 3-level SIDs (radices 4, 3, 5; SIDE reads them) with a collision suffix."""
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, k, (num_items,), generator=g) for k in (4, 3, 5)], 1)
    return SemanticIds(codes, [4, 3, 5], "dpca", {}, digit_centres=[1.5, 1.0, 2.0]).with_collision_suffix()


def _assert_same_kjt(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a.values(), b.values())
    assert torch.equal(a.lengths(), b.lengths())


@pytest.mark.parametrize("settings", [
    {},
    {"ngram_orders": [1, 2], "ngram_groups": [2], "prefix_lengths": [2, 4], "max_table_size": 7},  # some hashed
    {"prefix_lengths": [3], "num_levels": 3, "unknown_ids": "oov"},
])
def test_code_transform_gives_the_lookup_transforms_tokens(data: InteractionData, settings: dict) -> None:
    sids = _sids()
    known = 45 if settings.get("unknown_ids") == "oov" else 60  # items 45.. unknown to both paths
    table_sids = SemanticIds(sids.codes[:known], sids.cardinalities, "dpca", {}, suffix_level=sids.suffix_level)
    index = np.arange(48)
    id_batch = CtrBatches(data, "train", 48, max_history=10).build(index)
    code_batch = CtrBatches(data, "train", 48, max_history=10,
                            sid_codes=SidTable.from_semantic_ids(table_sids)).build(index)
    lookup = SidFeatureTransform(table_sids, FEATURES, **settings)
    codes = SidCodeTransform(sids.cardinalities, FEATURES, **settings)
    if known < 60:
        assert int(code_batch.sparse_features[ITEM_ID].values().max()) >= known  # the OOV rows are exercised
    _assert_same_kjt(lookup(id_batch.sparse_features), codes(code_batch.sparse_features))
    assert [(c.name, c.num_embeddings, c.feature_names) for c in codes.embedding_configs(4)] == [
        (c.name, c.num_embeddings, c.feature_names) for c in lookup.embedding_configs(4)]
    assert codes.state_bytes() == 0 and lookup.item_tokens.numel() * 4 == lookup_table_bytes(
        known, len(lookup.tokens), lookup.oov)


def test_code_transform_names_an_unknown_item_under_raise(data: InteractionData) -> None:
    sids = _sids()
    table = SidTable.from_semantic_ids(SemanticIds(sids.codes[:5], sids.cardinalities, "dpca", {}))
    batch = CtrBatches(data, "train", 16, max_history=10, sid_codes=table).build(np.arange(16))
    with pytest.raises(ValueError, match=r"feature 'item_id' has codes \[-1.*unknown_ids='oov'"):
        SidCodeTransform(sids.cardinalities, FEATURES)(batch.sparse_features)


def _config(block: str, **fields: object) -> ModelConfig:
    settings: dict = {"embedding_dim": 8, "item_representation": ("id", "sid", "side"), "history_block": block,
                      "max_history": 10, "dense_layers": (8,), "over_layers": (8,),
                      "sid_tokens": SidTokenConfig(ngram_orders=(1,), prefix_lengths=(2,))}
    return ModelConfig(**{**settings, **fields})


@pytest.mark.parametrize("block", ["din", "sim"])
def test_code_path_model_gives_the_lookup_models_outputs(data: InteractionData, block: str) -> None:
    sids, schema = _sids(), catalog_schema(data.catalog)
    torch.manual_seed(0)
    by_id = SidDLRM.from_config(_config(block), schema, sids).eval()
    torch.manual_seed(1)
    by_code = SidDLRM.from_config(_config(block, sid_features=True), schema, sids).eval()
    missing, unexpected = by_code.load_state_dict(by_id.state_dict(), strict=False)
    assert not missing and {k.rsplit(".", 1)[-1] for k in unexpected} <= {"item_tokens", "item_keys",
                                                                          "side_packed_ids"}
    index = np.arange(40)
    id_batch = CtrBatches(data, "train", 40, max_history=10).build(index)
    code_batch = CtrBatches(data, "train", 40, max_history=10,
                            sid_codes=SidTable.from_semantic_ids(sids)).build(index)
    with torch.no_grad():
        expected = by_id(id_batch.dense_features, id_batch.sparse_features)
        got = by_code(code_batch.dense_features, code_batch.sparse_features)
        traced = torchrec.fx.symbolic_trace(by_code)(code_batch.dense_features, code_batch.sparse_features)
    assert torch.equal(got, expected)
    assert torch.equal(traced, expected)
    per_item = {"item_arch.transform.item_tokens", "item_arch.side_packed_ids"} | (
        {"history_arch.item_keys"} if block == "sim" else set())
    assert set(replicated_buffer_bytes(by_id)) - set(replicated_buffer_bytes(by_code)) == per_item
    assert by_code.item_arch.per_item_bytes() == {} and by_id.item_arch.per_item_bytes()


def test_a_published_delta_reaches_a_built_model_in_the_next_batch(data: InteractionData, tmp_path: Path) -> None:
    """Version 1 holds items 0..39; the model is built; version 2 adds items 40..59 (a delta); the same batch read
    again gives those items their SID tokens, not the OOV row, and leaves every old item's SID bit-identical."""
    sids = _sids()
    old = SemanticIds(sids.codes[:40, :3], sids.cardinalities[:3], "dpca", {},
                      digit_centres=[1.5, 1.0, 2.0]).with_collision_suffix()
    store = SidStore(tmp_path / "store")
    store.create(old, suffix_capacity=8)
    config = _config("din", sid_features=True, item_representation=("sid", "side"),
                     sid_tokens=SidTokenConfig(ngram_orders=(1,), prefix_lengths=(3,), unknown_ids="oov"))
    model = SidDLRM.from_config(config, catalog_schema(data.catalog), store.table().semantic_ids()).eval()
    transform = model.item_arch.transform
    batches = CtrBatches(data, "train", 64, max_history=10, sid_codes=store)
    index = np.arange(64)
    items = batches.build(index).sparse_features[ITEM_ID].values()
    assert bool((items >= 40).any()) and bool((items < 40).any())
    prefix = [t.suffix for t in transform.tokens].index("prefix3")
    oov_row = transform.num_embeddings()[prefix] - 1

    def prefix_tokens() -> torch.Tensor:
        return transform(batches.build(index).sparse_features)[f"{ITEM_ID}__sid_prefix3"].values()

    before, logits_before = prefix_tokens(), model(*_inputs(batches.build(index)))
    assert bool((before[items >= 40] == oov_row).all())
    store.add_items(torch.arange(40, 60), sids.codes[40:, :3], parent=1)
    after, logits_after = prefix_tokens(), model(*_inputs(batches.build(index)))
    expected = (sids.codes[items, 0] + 4 * sids.codes[items, 1] + 12 * sids.codes[items, 2])
    assert torch.equal(after, expected) and not bool((after[items >= 40] == oov_row).any())
    assert torch.equal(after[items < 40], before[items < 40])
    assert torch.equal(store.codes_of(torch.arange(40)), store.codes_of(torch.arange(40), version=1))
    changed = (items >= 40)
    assert not torch.equal(logits_before[changed], logits_after[changed])
    assert torch.equal(logits_before[~changed & _old_history(batches.build(index))],
                       logits_after[~changed & _old_history(batches.build(index))])


def _inputs(batch: object) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    return batch.dense_features, batch.sparse_features  # type: ignore[attr-defined]


def _old_history(batch: object) -> torch.Tensor:
    """``[B]`` bool: the example's history holds only items 0..39."""
    jt = batch.sparse_features[HISTORY_ITEM_IDS]  # type: ignore[attr-defined]
    new = torch.segment_reduce((jt.values() >= 40).float(), "sum", lengths=jt.lengths())
    return new == 0


def test_parquet_shards_stream_the_same_batches(data: InteractionData, tmp_path: Path) -> None:
    sids = SidTable.from_semantic_ids(_sids())
    files = write_shards(CtrBatches(data, "train", 16, max_history=10), tmp_path / "shards", num_files=3,
                         rows_per_group=10)
    memory = CtrBatches(data, "train", 16, max_history=10, sid_codes=sids)
    streamed = list(ParquetCtrBatches(files, 16, sid_codes=sids))
    assert len(streamed) == len(memory.samples) // 16
    for b, (got, expected) in enumerate(zip(streamed, memory, strict=False)):
        _assert_same_kjt(got.sparse_features, expected.sparse_features)
        assert torch.equal(got.dense_features, expected.dense_features), b
        assert torch.equal(got.labels, expected.labels), b
    ranks = [ParquetCtrBatches(files, 8, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[1])) > 0
    assert ranks[0].my_files == files[0::2]


def _pipelined_worker(rank: int, world_size: int, data: InteractionData) -> dict:
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import shard
    from torchrec_sid.train.pipeline import SidDLRMTrain, describe, train_pipeline, train_steps

    sids = _sids()
    torch.manual_seed(0)
    model = SidDLRM.from_config(_config("din", sid_features=True), catalog_schema(data.catalog), sids)
    cpu = torch.device("cpu")
    dmp, optimizer = shard(SidDLRMTrain(model), TrainConfig(batch_size=16), world_size, cpu)
    pipeline = train_pipeline(dmp, optimizer, cpu)
    batches = CtrBatches(data, "train", 16, max_history=10, rank=rank, world_size=world_size,
                         sid_codes=SidTable.from_semantic_ids(sids))
    losses = [float(loss) for (loss, _, _), _ in train_steps(pipeline, iter(batches))]
    return {"pipeline": describe(pipeline), "losses": losses}


@pytest.mark.slow
@pytest.mark.distributed
def test_code_path_is_pipelined_like_the_lookup_path(data: InteractionData) -> None:
    results = run_multiprocess(_pipelined_worker, world_size=2, data=data)
    for result in results:
        assert result["pipeline"]["class"] == "TrainPipelineSparseDist"
        assert result["pipeline"]["pipelined_inputs"] == ["model.item_arch.transform"]
        assert "model.item_arch.embedding_collection" in result["pipeline"]["pipelined"]
        assert len(result["losses"]) >= 3 and all(np.isfinite(result["losses"]))


def test_sid_features_need_no_table_of_the_catalogues_size(data: InteractionData) -> None:
    """The code-path model is the same size for a 60-item and a 6,000-item SID table of the same cardinalities."""
    config = _config("sim", sid_features=True, sid_tokens=SidTokenConfig(prefix_lengths=(2,), num_levels=3))
    sizes = []
    for sids in (_sids(60), _sids(6000)):
        model = SidDLRM.from_config(config, catalog_schema(data.catalog), sids)
        sizes.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    assert sizes[0] == sizes[1]
