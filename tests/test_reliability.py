"""Careless and hostile inputs at the command line: one-line errors with exit code 2, nothing overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from torchrec_sid.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``torchrec-sid argv``: its exit code and what it printed to stderr."""
    try:
        main(list(argv))
    except SystemExit as exit_info:
        return int(exit_info.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


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


# --------------------------------------------------------------------------------------- quantize inputs and outputs

Q = ("quantize", "--method", "rq_kmeans", "--levels", "2", "--codebook-size", "4")


def _embeddings(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((60, 8), dtype=np.float32)


def _write_npy(path: Path, kind: str) -> None:
    good = _embeddings()
    if kind == "text":
        path.write_text("hello world\n")
        return
    with_nan = good.copy()
    with_nan[3, 2], with_nan[7, 1] = np.nan, np.inf
    arrays = {"int64": (good * 10).astype(np.int64), "bool": good > 0.5, "overflow": good.astype(np.float64) * 1e300,
              "nan": with_nan, "object": np.array([{"a": 1}, None], dtype=object), "empty": good[:0]}
    np.save(path, arrays[kind], allow_pickle=kind == "object")


@pytest.mark.parametrize("kind, message", [
    ("int64", "holds int64 values; the quantizers read floating point embeddings (as the API does): save them as "
              "float32, e.g. np.save(path, x.astype(np.float32))"),
    ("bool", "holds bool values; the quantizers read floating point embeddings (as the API does)"),
    ("overflow", "has values that overflow float32 (|v| > 3.4e+38) in row 0 (60 rows in all); the quantizers compute "
                 "in float32: rescale the embeddings"),
    ("nan", "has non-finite values (NaN or inf) in row 3 (2 rows in all)"),
    ("text", r"is not a .npy array file (the magic string is not correct; expected b'\x93NUMPY', got b'hello ')"),
    ("object", "holds Python objects (dtype object), not numbers; save a float32 array [N, D]"),
    ("empty", "is empty: got shape (0, 8), expected [N >= 1, D >= 1]"),
])
def test_quantize_refuses_npy_data_that_is_not_finite_float_embeddings_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str) -> None:
    data = tmp_path / "emb.npy"
    _write_npy(data, kind)
    code, err = _run(capsys, *Q, "--data", str(data), "--out", str(tmp_path / "s.safetensors"))
    assert code == 2
    assert err.startswith(f"torchrec-sid quantize: error: --data {data} {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "s.safetensors").exists()


def test_quantize_out_that_is_a_folder_is_refused_before_the_fit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrec_sid.quantizers.rq_kmeans import RQKMeans

    data, out = tmp_path / "emb.npy", tmp_path / "somedir.safetensors"
    np.save(data, _embeddings())
    out.mkdir()
    monkeypatch.setattr(RQKMeans, "fit", lambda *a, **k: pytest.fail("fitted before refusing --out"))
    code, err = _run(capsys, *Q, "--data", str(data), "--out", str(out))
    assert code == 2 and err == (f"torchrec-sid quantize: error: out: {out} is a folder; --out names the SemanticIds "
                                 f"file to write, e.g. {out}/sids.safetensors\n")


def _quantize_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int) -> tuple[int, str]:
    data = tmp_path / "emb.npy"
    np.save(data, _embeddings())
    return _run(capsys, *Q, "--seed", str(seed), "--data", str(data), "--out", str(tmp_path / "sids.safetensors"))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".npy"}


def test_a_failed_second_write_leaves_the_previous_pair_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the second file (the SID table) is written: neither file is replaced, nothing staged is
    left."""
    import errno

    from torchrec_sid.sid import SemanticIds

    assert _quantize_pair(tmp_path, capsys, seed=0)[0] == 0
    before = _folder_bytes(tmp_path)
    assert sorted(before) == ["sids.quantizer.safetensors", "sids.safetensors"]

    def disk_full(self: SemanticIds, path: str | Path) -> Path:
        Path(path).write_bytes(b"\0" * 100)  # a partial file, as a failing write leaves one
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(SemanticIds, "save", disk_full)
    code, err = _quantize_pair(tmp_path, capsys, seed=1)
    last = err.rstrip("\n").split("\n")[-1]  # after the fit's progress bar
    assert code == 2 and last.startswith("torchrec-sid quantize: error: [Errno 28] No space left on device: ")
    assert _folder_bytes(tmp_path) == before  # the previous pair, untouched, and no staged file left


def test_a_crash_between_the_two_renames_is_caught_when_the_pair_is_loaded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantizer is renamed into place first; the SID table records its SHA-256, so an old table beside a new
    quantizer is refused by every reader of the pair (load_pair, and training with --tokenizer beside the SIDs)."""
    import os

    from torchrec_sid import io
    from torchrec_sid.io import ChecksumError, sha256_file
    from torchrec_sid.jobs.quantize import load_pair

    assert _quantize_pair(tmp_path, capsys, seed=0)[0] == 0
    sids_file, quantizer_file = tmp_path / "sids.safetensors", tmp_path / "sids.quantizer.safetensors"
    sids, _ = load_pair(sids_file)
    assert sids.config["quantizer_sha256"] == sha256_file(quantizer_file)
    renames, rename = [], os.replace

    def crash_before_the_second_rename(src: str | Path, dst: str | Path) -> None:
        renames.append(Path(dst).name)
        if Path(dst) == sids_file:
            raise KeyboardInterrupt  # the process dies between the two renames
        rename(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _quantize_pair(tmp_path, capsys, seed=1)
    monkeypatch.undo()
    assert renames[-2:] == ["sids.quantizer.safetensors", "sids.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "sids.quantizer.safetensors", "sids.safetensors"]
    with pytest.raises(ChecksumError, match=rf"^{quantizer_file} is not the file the SID table {sids_file} records "
                                            r"\(sha256 \w{12}\.\.\., recorded \w{12}\.\.\.\): the two were not "
                                            r"published together$"):
        load_pair(sids_file)
    from torchrec_sid.models.configs import ModelConfig
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import build_model

    config = TrainConfig(model=ModelConfig(item_representation=("id", "soft_sid")), semantic_ids=str(sids_file),
                         tokenizer=str(quantizer_file))
    with pytest.raises(ChecksumError, match="the two were not published together"):
        build_model(config, data=None, signals=None)  # type: ignore[arg-type]  # refused before the data is read


@pytest.mark.parametrize("settings, message", [
    ({"levels": 2.5}, "levels must be an integer >= 1, got 2.5"),
    ({"levels": "3"}, "levels must be an integer >= 1, got '3'"),
    ({"codebook_size": True}, "codebook_size must be an integer >= 1, got True"),
])
def test_wrong_typed_quantizer_settings_are_refused_at_fit_naming_the_setting(settings: dict, message: str) -> None:
    import torch

    from torchrec_sid.quantizers.rq_kmeans import RQKMeans

    with pytest.raises(ValueError, match=f"^{message}$"):
        RQKMeans(**settings).fit(torch.from_numpy(_embeddings()))


# ------------------------------------------------------------------------------------------- cache, data, YAML


def test_cache_env_that_is_a_file_is_named_with_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("TORCHREC_SID_CACHE", str(blocker))
    code, err = _run(capsys, "data")
    assert code == 2 and err == (f"torchrec-sid data: error: $TORCHREC_SID_CACHE={blocker} is a file, not a folder; "
                                 f"set $TORCHREC_SID_CACHE to a folder (it is created if missing)\n")


def test_read_only_empty_cache_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only file system, simulated (mounting one needs root): mkdir fails with EROFS."""
    import errno

    from torchrec_sid.io import CacheError, cache_dir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setenv("TORCHREC_SID_CACHE", str(tmp_path))
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CacheError) as error:
        cache_dir("movielens100k")
    assert str(error.value) == (f"$TORCHREC_SID_CACHE={tmp_path}: cannot create {tmp_path}/movielens100k (Read-only "
                                f"file system); set $TORCHREC_SID_CACHE to a writable folder (a read-only cache "
                                f"works only once it holds every file)")


def test_data_source_errors_and_yaml_syntax_errors_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "data", "--ml100k", str(tmp_path))
    assert code == 2 and err.startswith(f"torchrec-sid data: error: {tmp_path} is not an ml-100k folder: missing ")
    assert err.count("\n") == 1
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    code, err = _run(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("torchrec-sid train: error: while parsing a flow sequence; in ")
    assert f'"{tmp_path / "bad.yaml"}", line 1, column 8' in err


# --------------------------------------------------------------------------------------------- re-resume


def test_resuming_a_finished_run_gives_the_same_results(tiny: dict, tmp_path: Path) -> None:
    """Nothing is left to train: the metrics are those of the run, and the training figures (throughput, pipeline)
    the ones its last checkpoint recorded, never NaN or empty."""
    import json

    from tests.multiprocess import run_multiprocess

    raw = {**tiny, "out": str(tmp_path / "run")}
    [first] = run_multiprocess(_train, world_size=1, raw=raw)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    [again] = run_multiprocess(_train, world_size=1, raw={**raw, "resume": True})
    rewritten = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["steps"] == first["steps"] > 0 and rewritten["metrics"] == written["metrics"]
    assert again["train_pipeline"] == first["train_pipeline"] and first["train_pipeline"]["pipelined"]
    assert again["train_examples_per_second"] == first["train_examples_per_second"] > 0


def _train_logging(rank: int, world_size: int, raw: dict) -> list[str]:
    """:func:`_train`, returning the warnings of ``torchrec_sid`` it logged."""
    import logging

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("torchrec_sid").addHandler(handler)
    _train(rank, world_size, raw)
    return records


def test_resume_with_no_checkpoint_says_so(tiny: dict, tmp_path: Path) -> None:
    from tests.multiprocess import run_multiprocess

    out = tmp_path / "typo_dir"
    [warnings] = run_multiprocess(_train_logging, world_size=1, raw={**tiny, "out": str(out), "resume": True,
                                                                      "max_steps": 1})
    assert f"resume: no checkpoint in {out}/checkpoints, so this run starts from step 0" in warnings


def test_a_diverging_run_stops_naming_the_step_and_writes_no_results(tiny: dict, tmp_path: Path) -> None:
    from tests.multiprocess import run_multiprocess

    out = tmp_path / "run"
    [error] = run_multiprocess(_error_of, world_size=1, raw={**tiny, "out": str(out), "learning_rate": 1e30,
                                                              "embedding_learning_rate": 1e30})
    assert error.startswith("DivergedError: step "), error
    assert "the run diverged (learning_rate 1e+30, embedding_learning_rate 1e+30); no results were written" in error
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_kjt_ids_of_another_dtype_are_refused_naming_the_feature(dtype: str) -> None:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_sid.modules import SidFeatureTransform
    from torchrec_sid.sid import SemanticIds

    sids = SemanticIds(torch.tensor([[0, 1], [1, 0], [1, 1]]), [2, 2], "rq_kmeans", {})
    transform = SidFeatureTransform(sids, ["item_id"])
    kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([0, 2], dtype=getattr(torch, dtype)),
                                              torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=f"feature 'item_id' has torch.{dtype} ids; item ids must be int64 or int32"):
        transform(kjt)
