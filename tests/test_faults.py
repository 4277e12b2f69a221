"""Faults with real processes: ``kill -9`` mid-run and mid-checkpoint, two runs on one ``--out``, a full disk
between the two quantize writes.

Every run is a real process of its own running the CLI (``torchrec_sid.cli.main``, what ``python -m torchrec_sid``
runs), one thread each, forked from the test harness's forkserver (tests/multiprocess.py), which has imported torchrec
once, so a run starts in a fraction of a second. A faulty run pauses at an exact point (after a training step, inside
a checkpoint write) so the test can ``SIGKILL`` it there, or has a write fail as a full disk would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.multiprocess import start_process

pytestmark = pytest.mark.slow

TIMEOUT = 180.0

# fault "step": pause after training step FAULT_AT (its loss logged); "manifest": pause inside the checkpoint write of
# step FAULT_AT (its DCP files written, its manifest not); "disk_full": the SID table's write fails with ENOSPC after
# writing part of the file. A paused run writes its pid to FAULT_MARKER and waits for FAULT_MARKER.go.


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while not marker.with_suffix(".go").exists():
        time.sleep(0.05)


def _install_fault(fault: str, at: int, marker: Path) -> None:
    if fault == "step":
        from torch.utils.tensorboard import SummaryWriter

        add_scalar = SummaryWriter.add_scalar

        def add_scalar_then_pause(self: Any, tag: str, value: Any, step: Any = None, *args: Any, **kw: Any) -> None:
            add_scalar(self, tag, value, step, *args, **kw)
            if tag == "train/loss" and step == at:
                _pause(marker)

        SummaryWriter.add_scalar = add_scalar_then_pause  # type: ignore[method-assign]
    elif fault == "manifest":
        from torchrec_sid.train import checkpoint

        write = checkpoint.atomic_write_json

        def pause_then_write(path: Any, obj: Any) -> Any:
            if Path(path).parent.name == f"step_{at:08d}.tmp":
                _pause(marker)
            return write(path, obj)

        checkpoint.atomic_write_json = pause_then_write  # type: ignore[assignment]
    elif fault == "disk_full":
        from torchrec_sid.sid import SemanticIds

        def disk_full(self: Any, path: Any) -> None:
            Path(path).write_bytes(bytes(100))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        SemanticIds.save = disk_full  # type: ignore[method-assign]


def _cli_process(argv: list[str], log: str, fault: dict[str, str] | None) -> None:
    """The body of one run: ``torchrec-sid argv`` (``torchrec_sid.cli.main``, what ``python -m torchrec_sid``
    runs) with its output in ``log``, one thread, behind ``fault`` when given; exits with the CLI's code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    if fault:
        _install_fault(fault["FAULT"], int(fault.get("FAULT_AT", "0")), Path(fault["FAULT_MARKER"]))
    from torchrec_sid.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start(argv: list[str], log: Path, fault: dict[str, str] | None = None) -> Any:
    """``torchrec-sid argv`` in a real process of its own (forked from the harness's forkserver, which has imported
    torchrec once), output into ``log``."""
    process = start_process(_cli_process, argv=argv, log=str(log), fault=fault)
    return process


def _wait_for(path: Path, process: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.exitcode is None, f"the run ended (rc {process.exitcode}) before reaching {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {TIMEOUT:.0f} s"
        time.sleep(0.05)


def _finish(process: Any) -> int:
    process.join(timeout=TIMEOUT)
    assert process.exitcode is not None, f"the run did not end within {TIMEOUT:.0f} s"
    return int(process.exitcode)


def _metrics(out: Path) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    return {"steps": results["steps"], "metrics": results["metrics"]}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Phase 1, side by side: the reference run U (paused after step 3 while a second run B tries its --out, then
    let go), a run killed after step 5 and one killed inside the checkpoint write of step 6 (checkpoints every 2 of
    9 steps). Phase 2, side by side: both killed runs resumed."""
    from tests.ml100k import write_ml100k

    root = tmp_path_factory.mktemp("faults")
    config = root / "tiny.yaml"
    config.write_text(json.dumps({
        "name": "tiny", "ml100k": str(write_ml100k(root / "ml-100k", num_users=30, num_ratings=200)),
        "batch_size": 16, "epochs": 1, "checkpoint_every": 2, "eval_splits": ["test", "valid"],
        "model": {"embedding_dim": 8, "dense_layers": [8], "over_layers": [8]}}))
    runs = {"reference": ("step", 3), "killed_mid_run": ("step", 5), "killed_in_checkpoint": ("manifest", 6)}
    procs, markers = {}, {}
    for name, (fault, at) in runs.items():
        markers[name] = root / f"{name}.paused"
        procs[name] = _start(["train", "--config", str(config), "--out", str(root / name)], root / f"{name}.log",
                             {"FAULT": fault, "FAULT_AT": str(at), "FAULT_MARKER": str(markers[name])})
    _wait_for(markers["reference"], procs["reference"])
    second = _start(["train", "--config", str(config), "--out", str(root / "reference")], root / "second.log")
    second_rc = _finish(second)
    markers["reference"].with_suffix(".go").touch()
    for name in ("killed_mid_run", "killed_in_checkpoint"):
        _wait_for(markers[name], procs[name])
        os.kill(procs[name].pid, signal.SIGKILL)
        assert _finish(procs[name]) == -signal.SIGKILL
    after_kill = {name: sorted(p.name for p in (root / name / "checkpoints").iterdir())
                  for name in ("killed_mid_run", "killed_in_checkpoint")}
    tmp_files = sorted(p.name for p in (root / "killed_in_checkpoint" / "checkpoints" / "step_00000006.tmp").iterdir())
    resumed = {name: _start(["train", "--config", str(config), "--out", str(root / name), "--resume"],
                            root / f"{name}.resumed.log") for name in after_kill}
    return {"root": root, "reference_pid": procs["reference"].pid, "reference_rc": _finish(procs["reference"]),
            "second_rc": second_rc, "second_log": (root / "second.log").read_text(), "after_kill": after_kill,
            "tmp_files": tmp_files, "resumed_rc": {name: _finish(p) for name, p in resumed.items()},
            "resumed_log": {name: (root / f"{name}.resumed.log").read_text() for name in resumed}}


def test_a_second_run_on_the_same_out_fails_at_once_and_the_first_finishes(scenario: dict[str, Any]) -> None:
    out = scenario["root"] / "reference"
    assert scenario["second_rc"] == 2
    error = [line for line in scenario["second_log"].splitlines() if line.startswith("torchrec-sid")]
    assert error == [f"torchrec-sid train: error: {out} is in use by another training run (pid "
                     f"{scenario['reference_pid']}); give this one another --out, or wait for that one to end"]
    assert "Traceback" not in scenario["second_log"] and "[rank0]" not in scenario["second_log"]
    assert scenario["reference_rc"] == 0 and _metrics(out)["steps"] == 9


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_metrics(scenario: dict[str, Any]) -> None:
    root = scenario["root"]
    assert scenario["after_kill"]["killed_mid_run"] == ["step_00000002", "step_00000004"]
    assert scenario["resumed_rc"]["killed_mid_run"] == 0
    assert f"resumed from {root}/killed_mid_run/checkpoints/step_00000004 at epoch 0, batch 4" in \
        scenario["resumed_log"]["killed_mid_run"]
    assert _metrics(root / "killed_mid_run") == _metrics(root / "reference")  # bit-identical floats


def test_kill_9_during_a_checkpoint_write_leaves_a_tmp_that_is_ignored(scenario: dict[str, Any]) -> None:
    root = scenario["root"]
    assert scenario["after_kill"]["killed_in_checkpoint"] == ["step_00000002", "step_00000004", "step_00000006.tmp"]
    assert "__0_0.distcp" in scenario["tmp_files"] and "manifest.json" not in scenario["tmp_files"]
    assert scenario["resumed_rc"]["killed_in_checkpoint"] == 0
    assert f"resumed from {root}/killed_in_checkpoint/checkpoints/step_00000004 at epoch 0, batch 4" in \
        scenario["resumed_log"]["killed_in_checkpoint"]
    assert _metrics(root / "killed_in_checkpoint") == _metrics(root / "reference")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """Mounts a tmpfs of ``size`` on ``folder`` when this process may (root with CAP_SYS_ADMIN); False otherwise."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    return subprocess.run(mount, capture_output=True).returncode == 0


def test_a_full_disk_between_the_two_quantize_writes_publishes_nothing(tmp_path: Path) -> None:
    """Run 1 (K=4) writes a pair; run 2 (K=64, same --out) finds the disk full after its first file (the quantizer)
    is staged: the first pair stays, whole, and nothing staged is left. The disk is a tmpfs filled to one page more
    than the new quantizer needs where mounting is allowed (root), else a driver makes the second write fail."""
    from torchrec_sid.cli import main

    np.save(tmp_path / "emb.npy", np.random.default_rng(0).random((300, 16), dtype=np.float32))

    def argv(out: Path, codebook_size: int) -> list[str]:
        return ["quantize", "--method", "rq_kmeans", "--levels", "2", "--codebook-size", str(codebook_size),
                "--data", str(tmp_path / "emb.npy"), "--out", str(out)]

    main(argv(tmp_path / "sizes" / "sids.safetensors", 64))  # run 2's files, on a disk with room
    new_quantizer = (tmp_path / "sizes" / "sids.quantizer.safetensors").stat().st_size
    disk = tmp_path / "disk"
    real = _mount_tmpfs(disk, "256k")
    try:
        main(argv(disk / "sids.safetensors", 4))
        if real:
            page = 4096
            room = (-(-new_quantizer // page) + 1) * page
            (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - room))
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        fault = None if real else {"FAULT": "disk_full", "FAULT_MARKER": str(tmp_path / "unused")}
        failing = _start(argv(disk / "sids.safetensors", 64), tmp_path / "run2.log", fault)
        assert _finish(failing) == 2
        log = (tmp_path / "run2.log").read_text()
        [error] = [line for line in log.splitlines() if line.startswith("torchrec-sid")]
        assert error.startswith(f"torchrec-sid quantize: error: cannot write {disk}/.sids.safetensors." if real else
                                f"torchrec-sid quantize: error: [Errno 28] No space left on device: "
                                f"'{disk}/.sids.safetensors."), error
        assert "No space left on device" in error and "Traceback" not in log
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=True)
