"""Issue 16's evaluation and equal-memory options: test-period slices by training impressions, hashed id tables
and a total row budget for SID token tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.multiprocess import run_multiprocess
from torchrec_sid.data.synthetic import SyntheticConfig, generate
from torchrec_sid.models.configs import FeatureSchema, ModelConfig, SidTokenConfig
from torchrec_sid.models.dlrm import SidDLRM, budget_table_size
from torchrec_sid.modules import SidFeatureTransform
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train.config import TrainConfig
from torchrec_sid.train.loop import slice_metrics
from torchrec_sid.train.metrics import ctr_metrics

TINY: dict[str, Any] = {"num_items": 300, "num_users": 30, "num_clusters": 6, "content_dim": 8, "min_history": 5,
                        "max_history": 30, "samples_per_user": 40, "cold_frac": 0.2, "seed": 3}


def test_slices_split_the_test_period_by_training_impressions() -> None:
    data = generate(SyntheticConfig(**TINY)).interactions
    test, cold, k = data.splits["test"], data.splits["cold"], 2
    g = torch.Generator().manual_seed(0)
    predictions = {}
    for name, samples in (("test", test), ("cold", cold)):
        rows = torch.randperm(len(samples), generator=g)  # gathered predictions come in rank order, not sample order
        predictions[name] = (torch.rand(len(samples), generator=g), torch.from_numpy(samples.labels)[rows], rows)
    slices = slice_metrics(data, predictions, k)

    counts = np.bincount(data.splits["train"].items, minlength=data.catalog.num_items)
    late_cold = cold.timestamps >= test.timestamps.min()  # the cold split's samples of the test period
    items = np.concatenate([test.items, cold.items[late_cold]])
    seen = counts[items]
    expected = {"all": len(items), "head": int((seen > k).sum()), "tail": int(((seen >= 1) & (seen <= k)).sum()),
                "cold": int((seen == 0).sum())}
    assert {name: slices[f"slice_{name}"]["count"] for name in expected} == expected
    assert expected["head"] and expected["tail"] and expected["cold"] > int(late_cold.sum())  # warm unseen items too
    assert slices["slice_tail"]["tail_impressions"] == k
    # the head slice, recomputed from the samples themselves
    p, y, rows = predictions["test"]
    head = torch.from_numpy(counts[test.items])[rows] > k
    p_cold, y_cold, rows_cold = predictions["cold"]
    keep = torch.from_numpy(late_cold)[rows_cold]
    head_cold = torch.from_numpy(counts[cold.items])[rows_cold] > k
    users = torch.cat([torch.from_numpy(test.users)[rows][head],
                       torch.from_numpy(cold.users)[rows_cold][keep & head_cold]])
    manual = ctr_metrics(torch.cat([p[head], p_cold[keep & head_cold]]),
                         torch.cat([y[head], y_cold[keep & head_cold]]), users)
    assert slices["slice_head"]["auc"] == pytest.approx(manual["auc"])
    assert slices["slice_head"]["gauc"] == pytest.approx(manual["gauc"])


def _run_worker(rank: int, world_size: int, raw: dict) -> dict | None:
    from torchrec_sid.train.loop import run

    return run(TrainConfig.from_dict(raw))


@pytest.mark.slow
def test_a_training_run_reports_gauc_and_slices(tmp_path: Path) -> None:
    raw = {"data": "synthetic", "synthetic": TINY, "batch_size": 64, "epochs": 1, "max_steps": 3,
           "out": str(tmp_path / "run"), "eval_splits": ["test", "cold"], "tail_impressions": 3,
           "model": {"embedding_dim": 4, "item_representation": ["id"], "id_buckets": 50, "max_history": 10,
                     "dense_layers": [8], "over_layers": [8]}}
    results = run_multiprocess(_run_worker, world_size=1, raw=raw)[0]
    metrics = results["metrics"]
    assert 0.0 <= metrics["test"]["gauc"] <= 1.0 and metrics["test"]["gauc_users"] >= 1
    parts = sum(metrics[f"slice_{name}"]["count"] for name in ("head", "tail", "cold"))
    assert parts == metrics["slice_all"]["count"] >= metrics["test"]["count"]
    assert metrics["slice_tail"]["tail_impressions"] == 3
    assert results["parameters"]["embedding"] % 4 == 0


def _sids(num_items: int = 1000) -> SemanticIds:
    codes = torch.randint(0, 16, (num_items, 3), generator=torch.Generator().manual_seed(0))
    return SemanticIds(codes, [16, 16, 16], "rq_kmeans", {})


SCHEMA = FeatureSchema({"user_id": 10}, 2, 1000, "item_id", "history_item_ids")


def _tables(config: ModelConfig) -> dict[str, int]:
    model = SidDLRM.from_config(config, SCHEMA, _sids())
    collection = model.item_arch.embedding_collection
    assert collection is not None
    return {c.name: c.num_embeddings for c in collection.embedding_configs()}


def test_id_buckets_hash_the_item_ids_into_that_many_rows() -> None:
    assert _tables(ModelConfig(embedding_dim=4, id_buckets=125)) == {"item_hash_l0": 125}
    model = SidDLRM.from_config(ModelConfig(embedding_dim=4, id_buckets=125), SCHEMA)
    transform = model.item_arch.transform
    assert isinstance(transform, SidFeatureTransform)
    buckets = transform.item_tokens.flatten()
    assert buckets.min() >= 0 and buckets.max() < 125 and len(buckets.unique()) > 110  # spread, not i % 125
    with pytest.raises(ValueError, match="without id_dropout"):
        ModelConfig(id_buckets=10, id_dropout=0.1)
    with pytest.raises(ValueError, match="id_buckets"):
        ModelConfig(id_buckets=0)


@pytest.mark.parametrize(("tokens", "expected"), [
    # 3 x 16 exact per-level rows; the two prefix tables (256 and 4,096 values) share the other 77 rows
    (SidTokenConfig(prefix_lengths=(2, 3), row_budget=125),
     {"sid_l0": 16, "sid_l1": 16, "sid_l2": 16, "sid_prefix2": 38, "sid_prefix3": 38}),
    # every vocabulary fits: nothing hashed
    (SidTokenConfig(prefix_lengths=(2,), row_budget=10_000),
     {"sid_l0": 16, "sid_l1": 16, "sid_l2": 16, "sid_prefix2": 256}),
    # an OOV row per table counts against the budget
    (SidTokenConfig(ngram_orders=(1, 2), row_budget=125, unknown_ids="oov"),
     {"sid_l0": 17, "sid_l1": 17, "sid_l2": 17, "sid_ngram2_l0": 37, "sid_ngram2_l1": 37}),
])
def test_row_budget_is_shared_by_the_sid_token_tables(tokens: SidTokenConfig, expected: dict[str, int]) -> None:
    tables = _tables(ModelConfig(embedding_dim=4, item_representation=("sid",), sid_tokens=tokens))
    assert tables == expected
    assert sum(tables.values()) <= (tokens.row_budget or 0)


def test_a_row_budget_too_small_for_the_tables_is_refused() -> None:
    assert budget_table_size([16, 16, 16], SidTokenConfig(prefix_lengths=(2,), row_budget=4)) == 1
    with pytest.raises(ValueError, match="row_budget 3 leaves no row for the 4 largest"):
        budget_table_size([16, 16, 16], SidTokenConfig(prefix_lengths=(2,), row_budget=3))
    with pytest.raises(ValueError, match="row_budget must be >= 1"):
        ModelConfig(sid_tokens=SidTokenConfig(row_budget=0))


def test_movielens_latest_is_a_data_source_of_train_and_quantize() -> None:
    assert TrainConfig.from_dict({"data": "movielens_latest"}).data == "movielens_latest"
    with pytest.raises(ValueError, match="movielens_latest"):
        TrainConfig.from_dict({"data": "movielens_2016"})
    from torchrec_sid.jobs.quantize import QuantizeConfig, embedding_source

    with pytest.raises(ValueError, match="'movielens_latest', MovieLens latest-small, is a source too"):
        embedding_source(QuantizeConfig(data="movielens-latest"))
