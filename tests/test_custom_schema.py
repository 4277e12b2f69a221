"""SidDLRM on a KJT whose feature names the library has never seen: built from collections, feature names and
sizes (as ``torchrec.models.dlrm.DLRM``), trained sharded by DistributedModelParallel over 2 gloo processes through
the train job's ``shard`` and ``TrainPipelineSparseDist``, and checked step by step against the same steps of the
unsharded model on the global batches.

The sharded tables are trained by fused row-wise Adagrad, the dense arches by Adam (DDP inside DMP). Both average
their gradients over ranks (TorchRec's all-to-all divides the embedding gradients by the world size, DDP averages the
dense ones), so each step applies the gradient of the mean loss over the global batch, as the reference does.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.multiprocess import run_multiprocess
from torchrec_sid.models.configs import FeatureSchema, ModelConfig
from torchrec_sid.models.dlrm import HistoryArch, ItemArch, SidDLRM, table_parameters
from torchrec_sid.modules import DIN, SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import shard
from torchrec_sid.train.pipeline import SidDLRMTrain, describe, train_pipeline, train_steps

D = 8
NUM_ADS = 12
NUM_COUNTRIES = 5
NUM_TOPICS = 6
GLOBAL_BATCH = 8
STEPS = 4
LEARNING_RATE = 0.01
EMBEDDING_LEARNING_RATE = 0.1
KEYS = ["viewer_country", "ad_topics", "ad_id", "watched_ad_ids", "watched_at", "served_at"]


def _semantic_ids() -> SemanticIds:
    """2-level SIDs of the 12 ads: (ad % 4, ad // 4)."""
    ads = torch.arange(NUM_ADS)
    return SemanticIds(torch.stack([ads % 4, ads // 4], dim=1), [4, 3], "rq_kmeans", {})


def build_model() -> SidDLRM:
    """The test's own model: pooled viewer country and ad topics; the ad and its watch history through an id table
    and SID token tables (levels and the 2-prefix); DIN over the history."""
    torch.manual_seed(0)
    transform = SidFeatureTransform(_semantic_ids(), ["ad_id", "watched_ad_ids"], prefix_lengths=[2])
    tables = [EmbeddingConfig(name="ads", embedding_dim=D, num_embeddings=NUM_ADS,
                              feature_names=["ad_id", "watched_ad_ids"]), *transform.embedding_configs(D)]
    item_arch = ItemArch("ad_id", "watched_ad_ids", D, embedding_collection=EmbeddingCollection(tables=tables),
                         transform=transform, history_timestamp_feature="watched_at", timestamp_feature="served_at")
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="countries", embedding_dim=D, num_embeddings=NUM_COUNTRIES,
                           feature_names=["viewer_country"]),
        EmbeddingBagConfig(name="topics", embedding_dim=D, num_embeddings=NUM_TOPICS, feature_names=["ad_topics"]),
    ])
    return SidDLRM(ebc, item_arch, dense_in_features=3, dense_arch_layer_sizes=[16, D],
                   over_arch_layer_sizes=[16, 1], history_arch=HistoryArch(DIN(D, attention_hidden_dims=(8,)), D,
                                                                         max_history=4))


def _examples(step: int) -> list[dict]:
    """The global batch of ``step``: one dict per example."""
    g = torch.Generator().manual_seed(step)

    def ints(high: int, n: int) -> list[int]:
        return torch.randint(0, high, (n,), generator=g).tolist()

    examples = []
    for _ in range(GLOBAL_BATCH):
        served = 10**9 + ints(10**6, 1)[0]
        history = ints(NUM_ADS, ints(6, 1)[0])  # 0..5 events, more than max_history at times
        examples.append({
            "viewer_country": ints(NUM_COUNTRIES, 1), "ad_topics": ints(NUM_TOPICS, ints(3, 1)[0]),
            "ad_id": ints(NUM_ADS, 1), "watched_ad_ids": history,
            "watched_at": sorted(served - 1 - t for t in ints(10**5, len(history))),  # oldest first
            "served_at": [served], "dense": torch.rand(3, generator=g), "label": float(ints(2, 1)[0]),
        })
    return examples


def _batch(examples: list[dict]) -> Batch:
    values = [v for key in KEYS for e in examples for v in e[key]]
    lengths = [len(e[key]) for key in KEYS for e in examples]
    features = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=torch.tensor(values, dtype=torch.long),
                                                   lengths=torch.tensor(lengths, dtype=torch.int32))
    return Batch(dense_features=torch.stack([e["dense"] for e in examples]), sparse_features=features,
                 labels=torch.tensor([e["label"] for e in examples]))


def _rank_batch(step: int, rank: int, world_size: int) -> Batch:
    local = GLOBAL_BATCH // world_size
    return _batch(_examples(step)[rank * local:(rank + 1) * local])


def _copy_into_shards(dmp: nn.Module, global_state: dict[str, Tensor]) -> None:
    """Writes each table's rows of the unsharded model into this rank's shards (DMP initialises them afresh)."""
    for name, tensor in dmp.state_dict().items():
        for local in getattr(tensor, "local_shards", list)():
            rows, cols = local.metadata.shard_offsets
            height, width = local.tensor.shape
            local.tensor.copy_(global_state[name.removeprefix("model.")][rows:rows + height, cols:cols + width])


def _train_sharded(rank: int, world_size: int) -> dict:
    """This rank's losses and logits of STEPS pipelined steps, and its shards of the trained tables."""
    model = build_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(batch_size=GLOBAL_BATCH // world_size, learning_rate=LEARNING_RATE,
                         embedding_learning_rate=EMBEDDING_LEARNING_RATE)
    cpu = torch.device("cpu")
    dmp, optimizer = shard(SidDLRMTrain(model), config, world_size, cpu)
    _copy_into_shards(dmp, global_state)
    pipeline = train_pipeline(dmp, optimizer, cpu)
    batches = (_rank_batch(step, rank, world_size) for step in range(STEPS))
    steps = [(loss, logits) for (loss, logits, _), _ in train_steps(pipeline, batches)]
    state = {name.removeprefix("model."): [(s.metadata.shard_offsets, s.tensor.clone()) for s in value.local_shards()]
             for name, value in dmp.state_dict().items() if hasattr(value, "local_shards")}
    return {"losses": torch.stack([loss for loss, _ in steps]), "logits": torch.stack([lg for _, lg in steps]),
            "state": state, "pipeline": describe(pipeline)}


def _train_unsharded() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The same steps on one process, without sharding: losses ``[STEPS]``, logits ``[STEPS, B]``, final state."""
    model = build_model()
    tables = {id(p) for p in table_parameters(model)}
    optimizers = [RowWiseAdagrad([p for p in model.parameters() if id(p) in tables], lr=EMBEDDING_LEARNING_RATE),
                  torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], lr=LEARNING_RATE)]
    losses, logits = [], []
    for step in range(STEPS):
        batch = _batch(_examples(step))
        out = model(batch.dense_features, batch.sparse_features)
        loss = nn.functional.binary_cross_entropy_with_logits(out, batch.labels)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.detach())
        logits.append(out.detach())
    return torch.stack(losses), torch.stack(logits), model.state_dict()


def test_model_reads_only_the_features_it_is_given() -> None:
    model = build_model()
    batch = _batch(_examples(0))
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (GLOBAL_BATCH,) and torch.isfinite(logits).all()
    assert model.sparse_arch.sparse_feature_names == ["viewer_country", "ad_topics"]
    assert model.item_arch.candidate_features == ["ad_id", "ad_id__sid_l0", "ad_id__sid_l1", "ad_id__sid_prefix2"]
    # a KJT without the item arch's features is refused with the feature's name
    features = KeyedJaggedTensor.from_lengths_sync(keys=["viewer_country", "ad_topics"],
                                                   values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises((KeyError, ValueError), match="watched_ad_ids"):
        model(torch.rand(1, 3), features)


def test_from_config_builds_for_the_schema_it_is_given() -> None:
    schema = FeatureSchema(pooled_features={"viewer_country": NUM_COUNTRIES, "ad_topics": NUM_TOPICS},
                           dense_in_features=3, num_items=NUM_ADS, item_feature="ad_id",
                           history_feature="watched_ad_ids", history_timestamp_feature="watched_at",
                           timestamp_feature="served_at")
    config = ModelConfig(embedding_dim=D, item_representation=("id", "sid"), history_block="sim",
                         history_options={"top_k": 2}, max_history=4, dense_layers=(16,), over_layers=(16,))
    model = SidDLRM.from_config(config, schema, _semantic_ids())
    batch = _batch(_examples(0))
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (GLOBAL_BATCH,) and torch.isfinite(logits).all()
    assert model.item_arch.history_features == ["watched_ad_ids", "watched_ad_ids__sid_l0", "watched_ad_ids__sid_l1"]


@pytest.mark.distributed
def test_sharded_training_matches_unsharded_training() -> None:
    results = run_multiprocess(_train_sharded, world_size=2)
    losses, logits, state = _train_unsharded()
    for r in results:  # both collections pipelined, the EC through the SID transform
        assert r["pipeline"]["class"] == "TrainPipelineSparseDist"
        assert sorted(r["pipeline"]["pipelined"]) == ["model.item_arch.embedding_collection",
                                                      "model.sparse_arch.embedding_bag_collection"]
    # step by step: each rank's logits are its rows of the global batch, the mean of its losses the global loss
    torch.testing.assert_close(torch.cat([r["logits"] for r in results], dim=1), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((results[0]["losses"] + results[1]["losses"]) / 2, losses, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[0], logits[-1])  # training moved the model
    # the trained tables, whatever the plan put where (the dense arches are checked through the logits: Adam turns
    # the rounding noise of a zero gradient, e.g. of the attention score's softmax-invariant bias, into whole steps)
    sharded = set(results[0]["state"])
    assert {"item_arch.embedding_collection.embeddings.ads.weight", "item_arch.embedding_collection.embeddings."
            "sid_prefix2.weight", "sparse_arch.embedding_bag_collection.embedding_bags.topics.weight"} <= sharded
    for name in sharded:
        for r in results:
            for (rows, cols), local in r["state"][name]:
                height, width = local.shape
                torch.testing.assert_close(local, state[name][rows:rows + height, cols:cols + width], rtol=1e-4,
                                           atol=1e-5, msg=name)
