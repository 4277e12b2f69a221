from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_ml100k
from torchrec_sid.models.dlrm import ModelConfig
from torchrec_sid.quantizers import SemanticIds
from torchrec_sid.train import checkpoint
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import build_model, load_data

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
