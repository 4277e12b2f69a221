from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import write_ml100k
from torchrec_sid.data.batches import ITEM_GENRES, ITEM_ID, USER_ID, Catalog, CtrBatches
from torchrec_sid.models.dlrm import ModelConfig
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train import checkpoint
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import build_model, load_data, shard
from torchrec_sid.train.pipeline import SidDLRMTrain, describe, detach, train_pipeline, train_steps

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small ml-100k folder (40 users, 8 items) and SIDs for its items."""
    root = tmp_path_factory.mktemp("train")
    folder = write_ml100k(root / "ml-100k", num_users=40, num_ratings=300)
    sids = SemanticIds(torch.tensor([[i % 3, i % 2] for i in range(8)]), [3, 2], "rq_kmeans", {})
    sids.save(root / "sids.safetensors")
    return {"root": root, "ml100k": str(folder), "sids": str(root / "sids.safetensors")}


def _config(setup: dict, out: Path, **fields) -> Path:
    raw = {"name": "tiny", "ml100k": setup["ml100k"], "semantic_ids": setup["sids"], "batch_size": 16, "epochs": 3,
           "out": str(out), "model": {"embedding_dim": 8, "item_representation": ["id", "sid"],
                                      "history_block": "din", "max_history": 10, "dense_layers": [8],
                                      "over_layers": [16, 8]}}
    raw.update(fields)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path, *args: str, nproc: int = 1) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "torchrec_sid", "train", "--config", str(config), *args],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(yaml.safe_load(config.read_text())["out"]) / "results.json").read_text())


def test_resumed_run_continues_to_the_same_result(setup: dict, tmp_path: Path) -> None:
    straight = _train(_config(setup, tmp_path / "straight", checkpoint_every=5))
    interrupted = _config(setup, tmp_path / "resumed", checkpoint_every=5)
    _train(interrupted, "--max-steps", "7")  # stops mid-epoch, after the checkpoint at step 5
    assert checkpoint.latest(tmp_path / "resumed" / "checkpoints").name == "step_00000005"
    resumed = _train(interrupted, "--resume")
    assert resumed["steps"] == straight["steps"] > 7
    assert resumed["metrics"] == straight["metrics"]


def test_two_process_sharded_training(setup: dict, tmp_path: Path) -> None:
    results = _train(_config(setup, tmp_path / "two"), nproc=2)
    assert results["world_size"] == 2
    for split in ("valid", "test"):
        assert 0.0 <= results["metrics"][split]["auc"] <= 1.0 and results["metrics"][split]["count"] > 0
    assert (tmp_path / "two" / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    # TrainPipelineSparseDist pipelines the input dist of both sharded collections, the EC's through the SID
    # transform (it needs SidDLRM fx-traceable, else the loop falls back to TrainPipelineBase, with a warning)
    assert results["train_pipeline"] == {
        "class": "TrainPipelineSparseDist",
        "pipelined": ["model.item_arch.embedding_collection", "model.sparse_arch.embedding_bag_collection"],
        "pipelined_inputs": ["model.item_arch.transform"],
        "not_pipelined": [],
    }


class TracedModel(nn.Module):
    """A small fx-traceable CTR model of SidDLRM's shape: bags of the batch's user / genre ids, and SID token
    embeddings of the candidate through a :class:`SidFeatureTransform` into an ``EmbeddingCollection``."""

    def __init__(self, catalog: Catalog, semantic_ids: SemanticIds, dim: int = 4) -> None:
        super().__init__()
        cards = catalog.sparse_cardinalities()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=cards[name], feature_names=[name])
            for name in (USER_ID, ITEM_GENRES)])
        self.transform = SidFeatureTransform(semantic_ids, [ITEM_ID], prefix_lengths=[2])
        self.embedding_collection = EmbeddingCollection(tables=self.transform.embedding_configs(dim))
        self.token_features = self.transform.token_features[0]
        width = catalog.num_dense + (2 + len(self.token_features)) * dim
        self.mlp = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        pooled = self.embedding_bag_collection(sparse_features).values()
        tokens = self.embedding_collection(self.transform(sparse_features))
        x = torch.cat([dense_features, pooled] + [tokens[name].values() for name in self.token_features], dim=1)
        return self.mlp(x).squeeze(-1)


class UntraceableModel(TracedModel):
    """TracedModel with a step fx cannot trace (control flow on a traced value)."""

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        logits = super().forward(dense_features, sparse_features)
        return logits if dense_features.numel() > 0 else logits.new_zeros(0)


def _local_state(model: nn.Module) -> dict[str, Tensor]:
    """This rank's part of every entry of a sharded model's state dict, as plain tensors."""
    state = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            value = torch.cat([s.tensor.flatten() for s in value.local_shards()]) if value.local_shards() \
                else torch.zeros(0)
        elif hasattr(value, "to_local"):
            value = value.to_local()
        state[key] = value.detach().clone()
    return state


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> tuple[Tensor, Tensor]:
    """The loop's step before the pipeline: forward, zero_grad, backward, step."""
    loss, (_, logits, _) = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), logits


def _pipeline_worker(rank: int, world_size: int, store: str, config_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        config = TrainConfig.from_yaml(config_path)
        data, _ = load_data(config)
        semantic_ids = SemanticIds.load(config.semantic_ids)
        batches = CtrBatches(data, "train", config.batch_size, shuffle=True, seed=config.seed, rank=rank,
                             world_size=world_size)
        cpu = torch.device("cpu")
        models = []
        for _ in range(2):  # two identical sharded models
            torch.manual_seed(0)
            models.append(shard(SidDLRMTrain(TracedModel(data.catalog, semantic_ids)), config, world_size, cpu))
        (dmp, optimizer), (reference, reference_optimizer) = models
        pipeline = train_pipeline(dmp, optimizer, cpu)
        mid = len(batches) // 2

        pipelined, mid_state = [], None
        for (loss, logits, labels), seconds in train_steps(pipeline, iter(batches)):
            pipelined.append((loss, logits))
            assert seconds >= 0
            if len(pipelined) == mid:  # batches mid + 1 and mid + 2 are in flight: their ids already sent
                mid_state = _local_state(dmp)
        assert describe(pipeline) == {
            "class": "TrainPipelineSparseDist",
            "pipelined": ["model.embedding_bag_collection", "model.embedding_collection"],
            "pipelined_inputs": ["model.transform"],
            "not_pipelined": [],
        }
        plain = []
        for batch in batches:
            plain.append(_plain_step(reference, reference_optimizer, batch))
            if len(plain) == mid:
                for key, value in _local_state(reference).items():
                    assert torch.equal(mid_state[key], value), key
        assert len(pipelined) == len(plain) == len(batches)
        for step, ((loss, logits), (ref_loss, ref_logits)) in enumerate(zip(pipelined, plain)):
            assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits), step
        final = _local_state(dmp)
        for key, value in _local_state(reference).items():
            assert torch.equal(final[key], value), key

        detach(pipeline)  # the model's own forward again: evaluation calls it on a batch
        dmp.eval()
        reference.eval()
        batch = batches.build(np.arange(5))
        with torch.no_grad():
            assert torch.equal(dmp(batch)[1][1], reference(batch)[1][1])

        # a model the pipeline cannot trace trains through TrainPipelineBase, the same steps, epoch after epoch
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(shard(SidDLRMTrain(UntraceableModel(data.catalog, semantic_ids)), config, world_size, cpu))
        (dmp, optimizer), (reference, reference_optimizer) = models
        pipeline = train_pipeline(dmp, optimizer, cpu)
        assert describe(pipeline)["class"] == "TrainPipelineBase"
        for epoch in range(2):
            batches.set_epoch(epoch)
            losses = [loss for (loss, _, _), _ in train_steps(pipeline, islice(batches, 3))]
            assert torch.equal(torch.stack(losses), torch.stack(
                [_plain_step(reference, reference_optimizer, batch)[0] for batch in islice(batches, 3)]))
    finally:
        dist.destroy_process_group()


def test_pipelined_steps_match_plain_steps(setup: dict, tmp_path: Path) -> None:
    """TrainPipelineSparseDist over 2 gloo processes pipelines both sharded modules, the EC through the SID
    transform, and trains exactly as the plain step: same losses, logits and (mid-way and final) state."""
    config = _config(setup, tmp_path / "pipeline", epochs=1, batch_size=8)
    mp.spawn(_pipeline_worker, args=(2, str(tmp_path / "store"), str(config)), nprocs=2, join=True)


def test_corrupt_checkpoint_is_refused(setup: dict, tmp_path: Path) -> None:
    config = _config(setup, tmp_path / "corrupt", epochs=1)
    _train(config)
    folder = checkpoint.latest(tmp_path / "corrupt" / "checkpoints")
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"\.distcp is corrupt or truncated"):
        checkpoint.verify(folder)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": {"history_block": "transformer"}}, "model.history_block must be one of"),
        ({"model": {"item_representation": ["id", "ids"]}}, "model.item_representation must be distinct values"),
        ({"model": {"hidden": 3}}, r"model: unknown field\(s\) \['hidden'\]"),
        ({"data": "criteo"}, "train.data must be one of"),
        ({"batch_size": 0}, "train.batch_size must be >= 1, got 0"),
        ({"eval_splits": ["test", "holdout"]}, r"unknown split\(s\) \['holdout'\]"),
        ({"model": {"history_block": "din", "history_options": {"top_k": 3}}}, "history_options for 'din'"),
    ],
)
def test_bad_config_fails_naming_the_field(fields: dict, message: str, setup: dict) -> None:
    def build() -> None:
        config = TrainConfig.from_dict({"ml100k": setup["ml100k"], **fields})
        build_model(config, *load_data(config))

    with pytest.raises(ValueError, match=message):
        build()


def test_sid_features_without_an_artifact_fail_before_training(setup: dict) -> None:
    config = TrainConfig(ml100k=setup["ml100k"], model=ModelConfig(item_representation=("sid",)))
    with pytest.raises(ValueError, match=r"needs semantic IDs \(train.semantic_ids\)"):
        build_model(config, *load_data(config))


def test_artifact_for_another_catalogue_fails_before_training(setup: dict, tmp_path: Path) -> None:
    other = SemanticIds(torch.zeros(5, 2, dtype=torch.long), [3, 2], "rq_kmeans", {})
    other.save(tmp_path / "other.safetensors")
    config = TrainConfig(ml100k=setup["ml100k"], semantic_ids=str(tmp_path / "other.safetensors"),
                         model=ModelConfig(item_representation=("sid",)))
    with pytest.raises(ValueError, match="train.semantic_ids has 5 items, the data has 8"):
        build_model(config, *load_data(config))
