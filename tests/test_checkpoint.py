"""Checkpoint files: identity checks on resume, and no pickle that can run code is ever loaded."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_sid.io import ChecksumError, sha256_file
from torchrec_sid.train import checkpoint

IDENTITY = {"config_sha256": "abc", "data_fingerprint": "d1"}


def _save(root: Path) -> Path:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}}
    return checkpoint.save(root, 3, state, {"epoch": 0, "batch": 3, "step": 3}, IDENTITY)


def _rewrite_manifest(folder: Path) -> None:
    """What an attacker who can write the folder would do: make the checksums match the planted file."""
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch planted",))


def test_round_trip_restores_state_progress_and_rng(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    folder = checkpoint.save(tmp_path, 4, {"model": {"w": torch.ones(2, 3)}}, {"step": 4}, IDENTITY)
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    state = {"model": {"w": torch.zeros(2, 3)}}
    assert checkpoint.load(folder, state, IDENTITY) == {"step": 4}
    assert torch.equal(state["model"]["w"], torch.ones(2, 3))
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


def test_resume_under_another_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    state = {"model": {"w": torch.zeros(2, 3)}}
    with pytest.raises(checkpoint.IdentityMismatch,
                       match=r"belongs to another run \(config_sha256: checkpoint 'abc', this run 'xyz'\)"):
        checkpoint.load(folder, state, {**IDENTITY, "config_sha256": "xyz"})
    assert torch.equal(state["model"]["w"], torch.zeros(2, 3))  # nothing read
    checkpoint.load(folder, state, {**IDENTITY, "config_sha256": "xyz"}, allow_mismatch=True)  # the override


def test_planted_pickle_in_rank_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = _save(tmp_path / "ckpt")
    torch.save({"progress": _Payload()}, folder / "rank0.pt")
    _rewrite_manifest(folder)
    with pytest.raises(ChecksumError, match=r"rank0.pt is refused, it holds more than tensors"):
        checkpoint.load(folder, {"model": {"w": torch.zeros(2, 3)}}, IDENTITY)
    assert not (tmp_path / "planted").exists()


def test_planted_pickle_in_dcp_metadata_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = _save(tmp_path / "ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload()))
    _rewrite_manifest(folder)
    with pytest.raises(ChecksumError, match=r"\.metadata is refused, it is not DCP metadata \(posix.system"):
        checkpoint.load(folder, {"model": {"w": torch.zeros(2, 3)}}, IDENTITY)
    assert not (tmp_path / "planted").exists()


def test_a_second_process_on_a_locked_folder_fails_naming_the_holder(tmp_path: Path) -> None:
    import subprocess
    import sys

    from torchrec_sid.io import folder_lock

    code = ("import sys; from torchrec_sid.io import folder_lock, LockedError\n"
            "try:\n    with folder_lock(sys.argv[1]): pass\nexcept LockedError as e:\n    print(e)")
    with folder_lock(tmp_path / "out"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
        assert f"out is in use by another run (pid {os.getpid()}); give this one another --out" in out.stdout
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert out.stdout == "" and out.returncode == 0  # released
