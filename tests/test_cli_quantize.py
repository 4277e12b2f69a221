"""The quantize command takes every quantizer's settings: list values, ``--set name=value``, and names what it
refuses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from torchrec_sid import cli
from torchrec_sid.quantizers import QUANTIZERS
from torchrec_sid.sid import SemanticIds

SMALL = ["--set", "hidden_dim=16", "--set", "max_epochs=1", "--set", "init_rows=64", "--no-collision-suffix"]


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    """120 items, 8-d, as a .npy file."""
    path = tmp_path / "items.npy"
    np.save(path, np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32))
    return path


def quantize(embeddings: Path, out: Path, *flags: str) -> SemanticIds:
    cli.main(["quantize", "--data", str(embeddings), "--out", str(out), *flags])
    return SemanticIds.load(out)


def test_fsq_levels_take_a_comma_list(embeddings: Path, tmp_path: Path) -> None:
    sids = quantize(embeddings, tmp_path / "fsq.safetensors", "--method", "fsq", "--levels", "8,5,3", *SMALL)
    assert sids.cardinalities == [8, 5, 3] and sids.config["levels"] == [8, 5, 3]


def test_dpca_settings_through_set(embeddings: Path, tmp_path: Path) -> None:
    sids = quantize(embeddings, tmp_path / "dpca.safetensors", "--method", "dpca", "--set", "groups=2",
                    "--set", "depth=3", "--set", "latent_dim=8", "--set", "lr=2e-3", *SMALL)
    assert sids.cardinalities == [3] * 6 and sids.config["lr"] == 0.002 and sids.config["groups"] == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "dpca", "--set", "bucketz=4"], r"--set bucketz=4: method 'dpca' has no setting 'bucketz'"),
    (["--method", "dpca", "--levels", "5"], r"--levels 5: method 'dpca' has no setting 'levels'; its settings"),
    (["--method", "fsq", "--set", "levels"], r"--set levels: expected name=value"),
])
def test_unknown_or_malformed_settings_are_refused_by_name(embeddings: Path, tmp_path: Path, flags: list[str],
                                                           message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", "--data", str(embeddings), "--out", str(tmp_path / "x.safetensors"), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "torchrec-sid quantize: error:" in error
    assert re.search(message, error), error


def test_help_lists_every_registered_method(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in QUANTIZERS) and "rq_gmm, ..." not in text


@pytest.mark.parametrize(("text", "value"), [
    ("3", 3), ("8,8,8,5", [8, 8, 8, 5]), ("1e-3", 1e-3), ("true", True), ("none", None), ("hard", "hard"),
    ("{text: cosine, meta: mse}", {"text": "cosine", "meta": "mse"}),
])
def test_setting_values_parse(text: str, value: object) -> None:
    assert cli._setting_value(text) == value
