"""MMQ stage 2 end to end: a stage-1 tokenizer fine-tuned inside the ranking model, its SIDs exported and used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ml100k import write_ml100k
from tests.multiprocess import run_multiprocess
from torchrec_sid.data import movielens
from torchrec_sid.quantizers import Quantizer
from torchrec_sid.quantizers.mmq import MMQ
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train.config import TrainConfig

MODEL = {"embedding_dim": 8, "history_block": "pooling", "max_history": 10, "dense_layers": [8],
         "over_layers": [8]}


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small ml-100k folder and an MMQ tokenizer fitted on its items' text and meta signals."""
    root = tmp_path_factory.mktemp("mmq")
    folder = write_ml100k(root / "ml-100k", num_users=40, num_ratings=300)
    signals = movielens.load(folder).signals(progress=False)
    q = MMQ({"text": "mse", "meta": "mse"}, num_shared=1, num_specific=1, codebook_size=4, latent_dim=8,
            hidden_dim=16, max_epochs=3, batch_size=4, init_rows=8, valid_frac=0.25, seed=0).fit(signals)
    q.save(root / "mmq.quantizer.safetensors")
    return {"root": root, "ml100k": str(folder), "tokenizer": str(root / "mmq.quantizer.safetensors"),
            "signals": signals}


def _train_worker(rank: int, world_size: int, runs: list[dict]) -> list[dict | None]:
    """The train job (``torchrec_sid.train.loop.run``) on each config of ``runs`` in turn, in one process."""
    from torchrec_sid.train.loop import run

    return [run(TrainConfig.from_dict(raw)) for raw in runs]


def test_fine_tuned_sids_are_exported_and_train_a_ranking_model(stage_one: dict, tmp_path: Path) -> None:
    exported = tmp_path / "mmq_ft.safetensors"
    fine_tune = {"name": "ft", "ml100k": stage_one["ml100k"], "tokenizer": stage_one["tokenizer"],
                 "export_semantic_ids": str(exported), "batch_size": 16, "epochs": 2, "out": str(tmp_path / "ft"),
                 "model": {**MODEL, "item_representation": ["id", "soft_sid"],
                           "soft_sid": {"tau": 0.5, "recon_weight": 1.0, "aux_weight": 1.0}}}
    rank = {"name": "sid_ft", "ml100k": stage_one["ml100k"], "semantic_ids": str(exported),  # reads the export
            "batch_size": 16, "epochs": 1, "out": str(tmp_path / "sid_ft"),
            "model": {**MODEL, "item_representation": ["id", "sid"], "sid_tokens": {"num_levels": 3}}}
    (results, ranked), = run_multiprocess(_train_worker, world_size=1, runs=[fine_tune, rank])
    sids = SemanticIds.load(exported)
    fine_tuned = Quantizer.load(exported.with_name("mmq_ft.quantizer.safetensors"))
    assert torch.equal(fine_tuned.encode(stage_one["signals"]), sids.codes[:, :3])
    assert sids.num_levels == 4 and sids.metrics["collision_rate"] == 0.0
    assert results["exported_semantic_ids"]["path"] == str(exported)
    assert sids.config["finetuned_from"] == stage_one["tokenizer"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ft" / "tensorboard")).Reload()
    assert len(events.Scalars("train/tokenizer_regulariser")) == results["steps"]
    stage_one_weights = MMQ.load(stage_one["tokenizer"]).model_.state_dict()
    assert any(not torch.equal(v, stage_one_weights[k]) for k, v in fine_tuned.model_.state_dict().items()), \
        "fine-tuning changed the tokenizer"

    assert ranked["steps"] == 13 and ranked["metrics"]["test"]["count"] > 0  # 205 samples, batch 16, one epoch
    assert 0.0 <= ranked["metrics"]["test"]["auc"] <= 1.0


@pytest.mark.parametrize("fields, message", [
    ({"model": {"item_representation": ["id", "soft_sid"]}}, "train.tokenizer must name an MMQ quantizer file"),
    ({"tokenizer": "t.safetensors"}, "train.tokenizer is only read by"),
    ({"export_semantic_ids": "x.safetensors"}, "export_semantic_ids .* needs soft_sid"),
    ({"tokenizer": "t", "model": {"item_representation": ["soft_sid"], "soft_sid": {"tau": 0}}},
     "model.soft_sid.tau must be > 0"),
    ({"tokenizer": "t", "model": {"item_representation": ["soft_sid"], "soft_sid": {"temperature": 1}}},
     r"model.soft_sid: unknown field\(s\) \['temperature'\]"),
])
def test_bad_stage_two_config_names_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(fields)
