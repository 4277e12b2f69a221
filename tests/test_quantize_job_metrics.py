"""The quantize job reports the collapse metrics in the artifact and TensorBoard, and fits a float32 memory map in
place (no copy of the catalogue), releasing its pages during scattered reads."""

from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_sid._dist import shard_layout
from torchrec_sid.jobs import quantize
from torchrec_sid.jobs.quantize import QuantizeConfig, run
from torchrec_sid.quantizers import base
from torchrec_sid.quantizers.base import gather_global_rows
from torchrec_sid.sid import SemanticIds

COLLAPSE_KEYS = ("perplexity", "perplexity_ratio", "max_code_share", "share_in_codes_over_1pct",
                 "utilization_before_reseed", "reseeded")


@pytest.fixture()
def items(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "items.npy"
    np.save(path, g.standard_normal((300, 8)).astype(np.float32))
    return path


class ScalarLog:
    """Stands in for a TensorBoard SummaryWriter."""

    def __init__(self, logdir: str) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = value

    def close(self) -> None:
        pass


def test_artifact_and_tensorboard_carry_the_collapse_metrics(items, tmp_path, monkeypatch):
    writers: list[ScalarLog] = []
    monkeypatch.setattr(quantize, "SummaryWriter", lambda logdir: writers.append(ScalarLog(logdir)) or writers[-1])
    config = QuantizeConfig(method="rq_kmeans", data=str(items), out=str(tmp_path / "sids.safetensors"),
                            quantizer={"levels": 2, "codebook_size": 8}, tensorboard=str(tmp_path / "tb"))
    run(config)
    metrics = SemanticIds.load(config.out).metrics
    for key in COLLAPSE_KEYS:
        assert len(metrics[key]) == 2, key
    assert metrics["collision_rate"] == 0.0 and metrics["suffix_cardinality"] >= 1  # after the suffix level
    assert 0 < metrics["collision_rate_before_suffix"] < 1
    scalars = writers[0].scalars
    assert scalars["rq_kmeans/quality/max_code_share/level_1"] == pytest.approx(metrics["max_code_share"][1])
    assert scalars["rq_kmeans/quality/suffix_cardinality"] == metrics["suffix_cardinality"]


def test_a_float32_memory_map_is_fitted_in_place(items):
    source = {"text": np.load(items, mmap_mode="r")}
    rows = quantize._fit_rows(source, slice(100, 200))
    assert isinstance(rows, torch.Tensor) and np.shares_memory(rows.numpy(), source["text"])  # a view, no copy
    assert torch.equal(rows, torch.from_numpy(np.load(items)[100:200]))
    quantize._release_pages(source)  # drops resident pages; the data reads back unchanged
    assert torch.equal(rows, torch.from_numpy(np.load(items)[100:200]))


def test_scattered_reads_of_a_memory_map_release_its_pages_while_fitting(items, monkeypatch):
    # a k-means++ sample spread over the file maps all of it within one period of the release thread (issue 13's
    # peak): the fit's scattered reads release the map after each chunk themselves
    monkeypatch.setattr(base, "SCATTERED_READ_ROWS", 64)
    monkeypatch.setattr(quantize, "PAGE_RELEASE_S", 3600.0)  # the periodic thread stays out of the count
    source = {"text": np.load(items, mmap_mode="r")}
    released: list[np.ndarray] = []
    monkeypatch.setattr(quantize, "release_pages", released.append)
    x = quantize._fit_rows(source, slice(0, 300))
    index = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:200]
    with quantize._pages_released(source):
        before = len(released)
        rows = gather_global_rows(x, index, shard_layout(*x.shape))
        assert len(released) - before == 4 and released[-1] is source["text"]  # 200 rows in chunks of 64
    assert torch.equal(rows, torch.from_numpy(np.load(items))[index])
    gather_global_rows(x, index, shard_layout(*x.shape))
    assert len(released) == before + 4 + 1  # + the release on leaving the block; none after it
