"""The README's "Use it in your own TorchRec model" walk-through (``examples/integration.py``), run with feature names
the library has never seen and arbitrary int64 item ids: lookup, transform, EBC, SIDE, TorchRec's DLRM, DMP over 2
processes, torch.export with a dynamic batch; and its bad inputs (unknown id, suffix level) fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.multiprocess import run_multiprocess
from torchrec_sid.examples import integration
from torchrec_sid.modules import SIDEmbedding

NAMES = integration.Features(item="sku_9f", history="viewed_skus_7d", segment="geo_bucket", num_segments=3,
                             num_dense=3)


@pytest.fixture(scope="module")
def fitted() -> tuple[integration.Catalogue, object]:
    catalogue = integration.make_catalogue()
    return catalogue, integration.fit_semantic_ids(catalogue)


def test_catalogue_ids_are_arbitrary_int64(fitted) -> None:
    catalogue, sids = fitted
    ids = catalogue.item_ids
    assert ids.dtype == torch.long and ids.abs().max() > 2**40 and (ids < 0).any() and len(ids.unique()) == len(ids)
    assert sids.suffix_level == 3 and sids.code_levels == 3


def test_one_process_trains_and_exports_with_a_dynamic_batch(fitted) -> None:
    catalogue, sids = fitted
    torch.manual_seed(0)
    model = integration.Ranker(sids, catalogue, NAMES)
    losses = integration.train_steps(model, catalogue, NAMES, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    tables = {c.name for c in model.dlrm.sparse_arch.embedding_bag_collection.embedding_bag_configs()}
    assert {"segments", "item_rows", "sid_l0", "sid_prefix2"} <= tables and "sid_l3" not in tables  # no suffix
    program = integration.export_dynamic(model, *integration.make_batch(catalogue, NAMES, 8, seed=1)[:2])
    for batch_size in (5, 17):
        dense, features, _ = integration.make_batch(catalogue, NAMES, batch_size, seed=batch_size)
        out = program.module()(dense, features)
        assert out.shape == (batch_size,)
        torch.testing.assert_close(out, model(dense, features))


def test_an_item_id_missing_from_the_lookup_is_named(fitted) -> None:
    catalogue, sids = fitted
    model = integration.Ranker(sids, catalogue, NAMES)
    dense, features, _ = integration.make_batch(catalogue, NAMES, 4, seed=3)
    unknown = int(catalogue.item_ids.max()) + 1
    values = features.values().clone()
    values[-1] = unknown  # the last history event
    bad = KeyedJaggedTensor.from_lengths_sync(features.keys(), values, features.lengths())
    with pytest.raises(ValueError, match=f"feature 'viewed_skus_7d' has item id {unknown}, which is not in the"):
        model(dense, bad)


def test_side_refuses_the_suffix_level_of_the_example_sids(fitted) -> None:
    _, sids = fitted
    with pytest.raises(ValueError, match="would read level 3, the collision suffix"):
        SIDEmbedding.from_semantic_ids(sids, 8, num_levels=4)


def _dmp_worker(rank: int, world_size: int, names: integration.Features, sids_path: str) -> dict:
    return integration.sharded_step(rank, world_size, names, sids_path)


@pytest.mark.slow  # about 10 s: a forkserver pair and a DMP plan
@pytest.mark.distributed
def test_two_process_dmp_shards_the_sid_tables_and_trains(fitted, tmp_path: Path) -> None:
    """SIDs fitted once, shared as a file, loaded by both ranks; DMP plans, shards and trains one step."""
    path = fitted[1].save(tmp_path / "sids.safetensors")
    results = run_multiprocess(_dmp_worker, world_size=2, names=NAMES, sids_path=str(path))
    for result in results:
        assert torch.isfinite(torch.tensor(result["loss"]))
        assert {"segments", "item_rows", "sid_l0", "sid_l1", "sid_l2", "sid_prefix2"} == set(result["sharding_types"])
    assert results[0]["sharding_types"] == results[1]["sharding_types"]
