"""The train job: in-process runs of ``torchrec_sid.train.loop.run`` on 1 and 2 ranks (tests/multiprocess.py), one
real ``torchrun -m torchrec_sid train`` smoke, and the pipelined step against the plain one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.postproc import PipelinedPostproc
from torchrec.distributed.train_pipeline.runtime_forwards import BaseForward
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.ml100k import write_ml100k
from tests.multiprocess import run_multiprocess
from torchrec_sid.data.batches import ITEM_GENRES, ITEM_ID, USER_ID, Catalog, CtrBatches
from torchrec_sid.models.dlrm import ModelConfig
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train import checkpoint
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import build_model, load_data, run, shard
from torchrec_sid.train.pipeline import SidDLRMTrain, detach, train_pipeline, train_steps

# SidDLRM's sharded collections, pipelined by TrainPipelineSparseDist: the EC's input dist runs through the SID
# transform (it needs SidDLRM fx-traceable, else the loop falls back to TrainPipelineBase, with a warning)
SID_DLRM_PIPELINED = {
    "pipelined": ["model.item_arch.embedding_collection", "model.sparse_arch.embedding_bag_collection"],
    "pipelined_inputs": ["model.item_arch.transform"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small ml-100k folder (40 users, 8 items, 205 training samples) and SIDs for its items."""
    root = tmp_path_factory.mktemp("train")
    folder = write_ml100k(root / "ml-100k", num_users=40, num_ratings=300)
    sids = SemanticIds(torch.tensor([[i % 3, i % 2] for i in range(8)]), [3, 2], "rq_kmeans", {})
    sids.save(root / "sids.safetensors")
    return {"root": root, "ml100k": str(folder), "sids": str(root / "sids.safetensors")}


def _raw(setup: dict, out: Path, **fields: Any) -> dict:
    """A small train config (as parsed YAML) writing to ``out``."""
    raw = {"name": "tiny", "ml100k": setup["ml100k"], "semantic_ids": setup["sids"], "batch_size": 16, "epochs": 3,
           "out": str(out), "model": {"embedding_dim": 8, "item_representation": ["id", "sid"],
                                      "history_block": "din", "max_history": 10, "dense_layers": [8],
                                      "over_layers": [16, 8]}}
    raw.update(fields)
    return raw


def _pipelined(model: nn.Module) -> dict[str, list[str]]:
    """What a train pipeline has rewritten in ``model`` (a DMP-sharded SidDLRMTrain), by name in the unwrapped
    model, read from the model itself through TorchRec's public classes (not from the pipeline's private state):
    the sharded modules whose ``forward`` the pipeline replaced by a pipelined forward (their input dist runs a
    batch ahead) and the input modules it swapped for a ``PipelinedPostproc`` (run in the input-dist stage)."""
    inner = model.module
    return {
        "pipelined": sorted(name for name, m in inner.named_modules()
                            if isinstance(m, ShardedModule) and isinstance(m.forward, BaseForward)),
        "pipelined_inputs": sorted(name for name, m in inner.named_modules() if isinstance(m, PipelinedPostproc)),
    }


def _train_worker(rank: int, world_size: int, runs: list[dict], same_start: bool = False) -> list[dict | None]:
    """The train job, in this process, on each config of ``runs`` in turn (rank 0's results; None elsewhere).

    ``same_start``: every table is sharded table-wise with the fused optimizer and starts from the unsharded
    model's (seeded) weights, whatever the world size. Otherwise the planner's choices depend on the world size
    (on 1 rank it makes the small ``item_genres`` table data-parallel, with a dense kernel and optimizer; on 2 it
    shards it table-wise, fused), and on CPU TorchRec's sharded EmbeddingBagCollection keeps fbgemm's own
    initialisation instead of the module's (``torchrec/distributed/embeddingbag.py`` loads the module's state only
    on accelerators), so 1-rank and 2-rank runs would train different models.
    """
    if same_start:
        from torchrec_sid.train import loop

        plain_shard, plain_planner = loop.shard, loop.EmbeddingShardingPlanner

        def shard_from_unsharded(model: nn.Module, *args: Any) -> Any:
            tables = [c.name for m in model.modules() if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)
                      for c in (m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection)
                                else m.embedding_configs())]
            constraints = {t: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                           for t in tables}
            loop.EmbeddingShardingPlanner = partial(plain_planner, constraints=constraints)
            unsharded = {k: v.detach().clone() for k, v in model.state_dict().items()}
            try:
                dmp, optimizer = plain_shard(model, *args)
            finally:
                loop.EmbeddingShardingPlanner = plain_planner
            _copy_into_shards(dmp, unsharded)
            return dmp, optimizer

        loop.shard = shard_from_unsharded
    return [run(TrainConfig.from_dict(raw)) for raw in runs]


@torch.no_grad()
def _copy_into_shards(dmp: nn.Module, unsharded: dict[str, Tensor]) -> None:
    """Writes every entry of an unsharded state dict into this rank's part of the sharded model (whatever the plan:
    the local shards of a sharded table, the whole of a replicated one)."""
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard_ in value.local_shards():
                (row, col), (height, width) = shard_.metadata.shard_offsets, shard_.tensor.shape
                shard_.tensor.copy_(unsharded[key][row:row + height, col:col + width])
        elif isinstance(value, Tensor) and key in unsharded:
            value.copy_(unsharded[key])


def _two_process_worker(rank: int, world_size: int, raw: dict) -> dict:
    """The train job on this rank, then what the train pipeline pipelines in SidDLRM after its first step."""
    results = run(TrainConfig.from_dict(raw))
    config = TrainConfig.from_dict(raw)
    data, signals = load_data(config)
    dmp, optimizer = shard(SidDLRMTrain(build_model(config, data, signals)), config, world_size,
                           torch.device("cpu"))
    pipeline = train_pipeline(dmp, optimizer, torch.device("cpu"))
    batches = CtrBatches(data, "train", config.batch_size, max_history=config.model.max_history, rank=rank,
                         world_size=world_size)
    steps = train_steps(pipeline, islice(batches, 2))
    next(steps)
    pipelined = {"class": type(pipeline).__name__, **_pipelined(dmp),
                 "sharded": sorted(name for name, m in dmp.module.named_modules() if isinstance(m, ShardedModule))}
    for _ in steps:  # every rank runs the same steps (the collectives of the second one)
        pass
    return {"results": results, "pipelined": pipelined}


@pytest.fixture(scope="module")
def straight(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 1-process run of 3 epochs (39 steps) with a checkpoint every 5 steps."""
    raw = _raw(setup, tmp_path_factory.mktemp("straight") / "run", checkpoint_every=5)
    (results,) = run_multiprocess(_train_worker, world_size=1, runs=[raw])[0]
    return {"raw": raw, "results": results}


def test_resumed_run_continues_to_the_same_result(setup: dict, straight: dict, tmp_path: Path) -> None:
    interrupted = _raw(setup, tmp_path / "resumed", checkpoint_every=5)
    # stops mid-epoch, after the checkpoint at step 5; then a fresh process resumes from it
    run_multiprocess(_train_worker, world_size=1, runs=[{**interrupted, "max_steps": 7}])
    assert checkpoint.latest(tmp_path / "resumed" / "checkpoints").name == "step_00000005"
    (resumed,) = run_multiprocess(_train_worker, world_size=1, runs=[{**interrupted, "resume": True}])[0]
    assert resumed["steps"] == straight["results"]["steps"] == 39
    for split, metrics in straight["results"]["metrics"].items():  # exactly (NaN: the AUC of a one-class split)
        assert resumed["metrics"][split] == pytest.approx(metrics, rel=0, abs=0, nan_ok=True), split


@pytest.fixture(scope="module")
def two_process(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One epoch on 2 ranks of batch 16: 6 steps of 32 samples (the ragged tail of 205 dropped)."""
    raw = _raw(setup, tmp_path_factory.mktemp("two") / "run", epochs=1)
    rank0, _ = run_multiprocess(_two_process_worker, world_size=2, raw=raw)
    return {"raw": raw, **rank0}


@pytest.mark.distributed
def test_two_process_run_matches_one_process_on_the_same_global_batches(setup: dict, tmp_path: Path) -> None:
    """2 ranks of batch B train on the samples 1 rank of batch 2B does, batch for batch (rank r reads global batch
    2k + r), and average the gradients (DDP for the dense arches, TorchRec's gradient division for the sharded
    tables): from the same initial weights, the trained models, hence every metric, agree up to float rounding."""
    (one,) = run_multiprocess(_train_worker, world_size=1, same_start=True,
                              runs=[_raw(setup, tmp_path / "one", epochs=1, batch_size=32, max_steps=6)])[0]
    (two,), _ = run_multiprocess(_train_worker, world_size=2, same_start=True,
                                 runs=[_raw(setup, tmp_path / "two", epochs=1, batch_size=16)])
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps"] == two["steps"] == 6
    assert (tmp_path / "two" / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    for split, metrics in one["metrics"].items():  # seen: equal to ~1e-8
        assert two["metrics"][split] == pytest.approx(metrics, rel=1e-5, nan_ok=True), split


@pytest.mark.distributed
def test_sid_dlrm_is_pipelined_through_the_sid_transform(two_process: dict) -> None:
    """TrainPipelineSparseDist pipelines the input dist of both of SidDLRM's sharded collections, the EC's through
    the SID transform; the train job reports the same."""
    assert two_process["results"]["world_size"] == 2 and two_process["results"]["steps"] == 6
    assert two_process["pipelined"] == {"class": "TrainPipelineSparseDist", **SID_DLRM_PIPELINED,
                                        "sharded": SID_DLRM_PIPELINED["pipelined"]}  # every sharded module
    reported = two_process["results"]["train_pipeline"]
    assert reported["class"] == "TrainPipelineSparseDist"
    for key, names in SID_DLRM_PIPELINED.items():  # where the report lists them (it may name only the class)
        assert reported.get(key, names) == names, key


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_smoke(setup: dict, two_process: dict, tmp_path: Path) -> None:
    """The real entry point: ``torchrun --nproc_per_node=2 -m torchrec_sid train`` trains as the in-process run."""
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump({**two_process["raw"], "out": str(tmp_path / "smoke")}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "torchrec_sid", "train", "--config", str(config)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert results["train_pipeline"]["class"] == "TrainPipelineSparseDist"
    assert (tmp_path / "smoke" / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    for split, metrics in two_process["results"]["metrics"].items():  # the in-process run of the same config
        written = {k: float("nan") if v is None else v for k, v in results["metrics"][split].items()}  # JSON: null
        assert written == pytest.approx(metrics, rel=1e-6, nan_ok=True), split


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


def _pipeline_worker(rank: int, world_size: int, raw: dict) -> None:
    """Pipelined against plain steps, asserted on this rank (a failed assert fails the test with its traceback)."""
    config = TrainConfig.from_dict(raw)
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
    for (loss, logits, _), seconds in train_steps(pipeline, iter(batches)):
        pipelined.append((loss, logits))
        assert seconds >= 0
        if len(pipelined) == mid:  # batches mid + 1 and mid + 2 are in flight: their ids already sent
            mid_state = _local_state(dmp)
    assert isinstance(pipeline, TrainPipelineSparseDist)
    assert _pipelined(dmp) == {"pipelined": ["model.embedding_bag_collection", "model.embedding_collection"],
                               "pipelined_inputs": ["model.transform"]}
    plain = []
    for batch in batches:
        plain.append(_plain_step(reference, reference_optimizer, batch))
        if len(plain) == mid:
            for key, value in _local_state(reference).items():
                assert torch.equal(mid_state[key], value), key
    assert len(pipelined) == len(plain) == len(batches)
    for step, ((loss, logits), (ref_loss, ref_logits)) in enumerate(zip(pipelined, plain, strict=True)):
        assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits), step
    final = _local_state(dmp)
    for key, value in _local_state(reference).items():
        assert torch.equal(final[key], value), key

    detach(pipeline)  # the model's own forward again: evaluation calls it on a batch
    assert _pipelined(dmp) == {"pipelined": [], "pipelined_inputs": []}
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
    assert isinstance(pipeline, TrainPipelineBase)
    for epoch in range(2):
        batches.set_epoch(epoch)
        losses = [loss for (loss, _, _), _ in train_steps(pipeline, islice(batches, 3))]
        assert torch.equal(torch.stack(losses), torch.stack(
            [_plain_step(reference, reference_optimizer, batch)[0] for batch in islice(batches, 3)]))


@pytest.mark.distributed
def test_pipelined_steps_match_plain_steps(setup: dict, tmp_path: Path) -> None:
    """TrainPipelineSparseDist over 2 gloo processes pipelines both sharded modules, the EC through the SID
    transform, and trains exactly as the plain step: same losses, logits and (mid-way and final) state."""
    run_multiprocess(_pipeline_worker, world_size=2, raw=_raw(setup, tmp_path / "pipeline", epochs=1, batch_size=8))


def test_corrupt_checkpoint_is_refused(straight: dict, tmp_path: Path) -> None:
    found = checkpoint.latest(Path(straight["raw"]["out"]) / "checkpoints")
    folder = Path(shutil.copytree(found, tmp_path / found.name))
    checkpoint.verify(folder)  # intact
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
        ({"batch_size": 0}, "config: batch_size = 0: must be >= 1"),
        ({"eval_splits": ["test", "holdout"]}, r"unknown split\(s\) \['holdout'\]"),
        ({"model": {"history_block": "din", "history_options": {"top_k": 3}}}, "history_options for 'din'"),
        ({"index_dtype": "int16"}, "train.index_dtype must be one of"),
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


def test_int32_batches_score_as_the_int64_ones(setup: dict, tmp_path: Path) -> None:
    """``index_dtype: int32`` halves the batches' id bytes; the SID transform keeps int32 and the model's scores are
    the int64 batches' (the sharded tables read int32 indices in benchmarks/sid_modules.py)."""
    config = TrainConfig.from_dict(_raw(setup, tmp_path / "int32", index_dtype="int32"))
    data, signals = load_data(config)
    torch.manual_seed(0)
    model = build_model(config, data, signals).eval()
    batches = {dtype: CtrBatches(data, "train", 32, max_history=config.model.max_history, index_dtype=dtype)
               for dtype in (torch.int64, config.torch_index_dtype())}
    narrow, wide = next(iter(batches[torch.int32])), next(iter(batches[torch.int64]))
    assert narrow.sparse_features.values().dtype == torch.int32
    with torch.no_grad():
        assert torch.equal(model(narrow.dense_features, narrow.sparse_features),
                           model(wide.dense_features, wide.sparse_features))
