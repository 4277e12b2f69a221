"""Careless and hostile inputs at the command line: one-line errors with exit code 2, nothing overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from torchrec_sid.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_quantize_out_that_would_overwrite_the_input_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "emb.npy"
    np.save(data, np.random.default_rng(0).random((50, 4), dtype=np.float32))
    before = data.read_bytes()
    code, err = _run(capsys, "quantize", "--method", "rq_kmeans", "--data", str(data), "--out", str(data))
    assert code == 2
    assert err == (f"torchrec-sid quantize: error: out: {data} would overwrite the input embeddings --data {data}; "
                   f"choose another --out (it also writes emb.npy.quantizer.safetensors)\n")
    assert data.read_bytes() == before


def test_user_mistake_is_one_line_and_debug_shows_the_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.npy"
    code, err = _run(capsys, "quantize", "--data", str(missing), "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and err == f"torchrec-sid quantize: error: data: {missing} is not a file\n"
    with pytest.raises(ValueError, match="is not a file"):
        main(["quantize", "--data", str(missing), "--out", str(tmp_path / "s.safetensors"), "--debug"])


def _train(rank: int, world_size: int, raw: dict, resume_anyway: bool = False) -> dict | None:
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import run

    return run(TrainConfig.from_dict(raw), resume_anyway=resume_anyway)


def _error_of(rank: int, world_size: int, raw: dict) -> str:
    try:
        _train(rank, world_size, raw)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.ml100k import write_ml100k

    root = tmp_path_factory.mktemp("reliability")
    folder = write_ml100k(root / "ml-100k", num_users=30, num_ratings=200)
    return {"name": "tiny", "ml100k": str(folder), "batch_size": 16, "epochs": 1, "checkpoint_every": 2,
            "eval_splits": ["test", "cold"], "model": {"embedding_dim": 8, "dense_layers": [8], "over_layers": [8]}}


def test_resume_under_a_changed_config_is_refused_and_the_override_warns(tiny: dict, tmp_path: Path) -> None:
    from tests.multiprocess import run_multiprocess

    raw = {**tiny, "out": str(tmp_path / "run"), "max_steps": 2}
    run_multiprocess(_train, world_size=1, raw=raw)
    [error] = run_multiprocess(_error_of, world_size=1, raw={**raw, "batch_size": 8, "resume": True})
    assert error.startswith("IdentityMismatch: checkpoint ") and "belongs to another run (config_sha256: " in error
    assert error.endswith("Use a new --out, or --resume-anyway to continue regardless")
    changed = {**raw, "learning_rate": 0.002, "resume": True, "max_steps": 3}
    [results] = run_multiprocess(_train, world_size=1, raw=changed, resume_anyway=True)
    assert results["steps"] == 3  # continued from step 2


def test_results_never_hold_nan(tiny: dict, tmp_path: Path) -> None:
    """The cold split of this tiny catalogue has one class only: its AUC is undefined, written as null."""
    import json

    from tests.multiprocess import run_multiprocess

    raw = {**tiny, "out": str(tmp_path / "run"), "max_steps": 1}
    run_multiprocess(_train, world_size=1, raw=raw)
    text = (tmp_path / "run" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
