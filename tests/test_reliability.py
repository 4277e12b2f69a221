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
