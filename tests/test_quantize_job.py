from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.multiprocess import run_multiprocess
from torchrec_sid import cli
from torchrec_sid.jobs.quantize import QuantizeConfig, run
from torchrec_sid.quantizers import Quantizer
from torchrec_sid.sid import SemanticIds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    """300 items in 6 blobs, 16-d, as a .npy file."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 4
    x = centres[rng.integers(0, 6, 300)] + rng.normal(size=(300, 16)) * 0.3
    path = tmp_path / "items.npy"
    np.save(path, x.astype(np.float32))
    return path


def test_run_writes_verified_artifacts(embeddings: Path, tmp_path: Path) -> None:
    config = QuantizeConfig(method="rq_kmeans", data=str(embeddings), out=str(tmp_path / "sids.safetensors"),
                            quantizer={"levels": 2, "codebook_size": 8, "seed": 1},
                            tensorboard=str(tmp_path / "tb"))
    sids = run(config)
    loaded = SemanticIds.load(config.out)
    assert torch.equal(loaded.codes, sids.codes) and loaded.num_items == 300 and loaded.num_levels == 3
    assert len(set(map(tuple, loaded.codes.tolist()))) == 300, "the suffix level makes every SID unique"
    quantizer = Quantizer.load(config.quantizer_path)
    x = torch.from_numpy(np.load(embeddings))
    assert torch.equal(quantizer.encode(x), loaded.codes[:, :2])
    m = loaded.metrics
    assert m["collision_rate"] == 0.0 and m["collision_rate_before_suffix"] > 0
    assert len(m["utilization"]) == 2 and m["rmse"] < 0.5 and m["num_items"] == 300
    assert loaded.config["data"] == str(embeddings) and loaded.quantizer == "rq_kmeans"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "rq_kmeans/kmeans/level_0/rmse" in events.Tags()["scalars"]


def test_same_config_same_sids(embeddings: Path, tmp_path: Path) -> None:
    def sids(name: str) -> torch.Tensor:
        return run(QuantizeConfig(method="rq_gmm", data=str(embeddings), out=str(tmp_path / name),
                                  quantizer={"levels": 2, "codebook_size": 6, "seed": 3})).codes

    assert torch.equal(sids("a.safetensors"), sids("b.safetensors"))


def test_yaml_config_with_flag_overrides(embeddings: Path, tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"method": "rq_kmeans", "data": str(embeddings), "out": str(tmp_path / "x"),
                                    "quantizer": {"levels": 3, "codebook_size": 4}}))
    config = QuantizeConfig.from_yaml(path, out=str(tmp_path / "y.safetensors"), method=None,
                                      quantizer={"codebook_size": 8})
    assert config.method == "rq_kmeans" and config.out.endswith("y.safetensors")
    assert config.quantizer == {"levels": 3, "codebook_size": 8}


def test_shipped_example_configs_parse() -> None:
    for path in sorted((REPO / "examples").glob("quantize_*.yaml")):
        config = QuantizeConfig.from_yaml(path)
        from torchrec_sid.quantizers import build_quantizer

        quantizer = build_quantizer(config.method, **config.quantizer)
        quantizer.check_params()  # every value in range, as fit would check
        assert quantizer.name == config.method and config.quantizer.items() <= quantizer.get_params().items()


def test_cli_quantize(embeddings: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.safetensors"
    cli.main(["quantize", "--method", "rq_kmeans", "--levels", "2", "--codebook-size", "8", "--data", str(embeddings),
              "--out", str(out), "--no-collision-suffix"])
    assert "300 items -> SIDs of 2 levels [8, 8]" in capsys.readouterr().out
    assert SemanticIds.load(out).num_levels == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "nope"}, "unknown quantizer 'nope'; registered: "),
        ({"quantizer": {"levles": 2}}, "unknown settings \\['levles'\\] for quantizer 'rq_gmm'"),
        ({"data": "missing.npy"}, "data: missing.npy is not a file"),
        ({"data": "table.csv"}, "data must be 'movielens', 'synthetic' or a .npy file, got 'table.csv'"),
    ],
)
def test_bad_config_raises(config: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run(QuantizeConfig(out=str(tmp_path / "o.safetensors"), **config))


def test_unknown_yaml_field_raises(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("method: rq_gmm\ncodebook_size: 8\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['codebook_size'\]"):
        QuantizeConfig.from_yaml(path)


def _quantize_worker(rank: int, world_size: int, config: QuantizeConfig) -> torch.Tensor | None:
    """The quantize job on this rank (``WORLD_SIZE`` set, the gloo group made): rank 0's codes, None elsewhere."""
    sids = run(config)
    return None if sids is None else sids.codes


@pytest.mark.distributed
def test_two_process_quantize_matches_one_process(embeddings: Path, tmp_path: Path) -> None:
    """2 gloo ranks each fit and encode half the items; rank 0 writes all codes, those of one process."""
    def config(name: str) -> QuantizeConfig:
        return QuantizeConfig(method="rq_gmm", data=str(embeddings), out=str(tmp_path / f"{name}.safetensors"),
                              quantizer={"levels": 2, "codebook_size": 6})

    codes, nothing = run_multiprocess(_quantize_worker, world_size=2, config=config("two"))
    assert nothing is None
    one = run(config("one"))
    two = SemanticIds.load(tmp_path / "two.safetensors")
    assert torch.equal(two.codes, codes) and torch.equal(two.codes, one.codes)


def test_ordinal_artifact_keeps_digit_centres_for_side(tmp_path: Path) -> None:
    from torchrec_sid.modules import SIDEmbedding
    from torchrec_sid.sid.packing import pack_codes

    out = tmp_path / "dpca.safetensors"
    run(QuantizeConfig(method="dpca", data="synthetic", synthetic_items=300, out=str(out),
                       quantizer={"groups": 1, "depth": 4, "latent_dim": 8, "max_epochs": 2}))
    sids = SemanticIds.load(out)
    # 4 ternary digits centred on 1, and the collision suffix level (categorical) centred on its middle
    assert sids.cardinalities[:4] == [3, 3, 3, 3] and sids.num_levels == 5
    assert sids.digit_centres == [1.0, 1.0, 1.0, 1.0, (sids.cardinalities[4] - 1) / 2]
    side = SIDEmbedding.from_semantic_ids(sids, embedding_dim=8, num_levels=4)
    assert side.radices == [3, 3, 3, 3] and side.centres.tolist() == [1.0] * 4
    packed = pack_codes(sids.codes[:, :4], side.radices)
    assert torch.equal(side.unpack(packed), sids.codes[:, :4])
    assert torch.equal(side.digits(packed), sids.codes[:, :4].float() - 1.0)  # digits -1, 0, 1
    assert side(packed).shape == (300, 8)


def test_multi_signal_quantizer_reads_named_signals(tmp_path: Path) -> None:
    from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

    out = tmp_path / "mmq.safetensors"
    sids = run(QuantizeConfig(method="mmq", data="synthetic", synthetic_items=300, signals=("text", "meta"),
                              out=str(out), quantizer={"signals": {"text": "mse", "meta": "mse"}, "num_shared": 1,
                                                       "num_specific": 1, "codebook_size": 8, "latent_dim": 8,
                                                       "hidden_dim": 16, "max_epochs": 2}))
    assert sids.num_levels == 4 and set(sids.metrics["rmse"]) == {"text", "meta"}
    assert sids.config["signals"] == ["text", "meta"]
    signals = generate_items(SyntheticConfig(num_items=300, seed=0)).signals()
    quantizer = Quantizer.load(QuantizeConfig(out=str(out)).quantizer_path)
    assert torch.equal(quantizer.encode(signals), SemanticIds.load(out).codes[:, :3])


@pytest.mark.parametrize("fields, message", [
    ({"method": "rq_kmeans", "signals": ("text", "meta")}, "rq_kmeans reads one signal"),
    ({"method": "mmq", "signals": ("text", "meta")}, "mmq reads one signal"),  # its own `signals` setting: None
    ({"method": "mmq", "signals": ("text", "image"), "quantizer": {"signals": {"text": "mse", "image": "mse"}}},
     r"signals \['text', 'image'\]: synthetic has \['meta', 'text'\]"),
    ({"method": "mmq", "quantizer": {"gamma": -1}}, r"gamma must be a number >= 0.0, got -1"),
])
def test_bad_signals_raise(fields: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run(QuantizeConfig(data="synthetic", synthetic_items=100, out=str(tmp_path / "o.safetensors"), **fields))
