"""The example configs and the TorchX components (launch/components.py, installed as torchrec_sid.launch.components
and registered as sid.train / sid.quantize), with one real 2-process local_cwd run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from torchx.specs import AppDef
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import validate
from torchx.specs.finder import get_components

from tests.conftest import write_ml100k
from torchrec_sid.jobs.quantize import QuantizeConfig
from torchrec_sid.launch import components
from torchrec_sid.quantizers.base import build_quantizer
from torchrec_sid.sid import SemanticIds
from torchrec_sid.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRAIN_CONFIGS = sorted(EXAMPLES.glob("movielens_*.yaml"))
QUANTIZE_CONFIGS = sorted(EXAMPLES.glob("quantize_*.yaml"))
COMPONENTS = ROOT / "launch" / "components.py"


def _command(app: AppDef) -> list[str]:
    """The role's ``bash -c`` command line, split."""
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


def test_the_examples_cover_every_history_block_and_representation() -> None:
    names = {p.stem for p in TRAIN_CONFIGS}
    assert {"movielens_id", "movielens_sid_rq_kmeans", "movielens_sid_rq_gmm", "movielens_side"} <= names
    blocks = {TrainConfig.from_yaml(p).model.history_block for p in TRAIN_CONFIGS
              if p.stem.startswith("movielens_hist")}
    assert blocks == {"pooling", "pma", "din", "sim", "dmqn"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_train_example_is_a_complete_config(path: Path) -> None:
    config = TrainConfig.from_yaml(path)
    raw = yaml.safe_load(path.read_text())
    assert config.name == raw["name"] and config.data == "movielens"
    assert config.out == f"outputs/train/{path.stem}"  # every example writes its own folder
    written = {QuantizeConfig.from_yaml(q).out for q in QUANTIZE_CONFIGS}
    written |= {TrainConfig.from_yaml(t).export_semantic_ids for t in TRAIN_CONFIGS} - {None}
    if config.model.needs_semantic_ids:
        # the SIDs it reads are what a quantize example (or MMQ stage 2) writes
        assert config.semantic_ids in written
    else:
        assert config.semantic_ids is None
    if config.tokenizer is not None:  # MMQ stage 2 reads the tokenizer a quantize example writes
        assert config.tokenizer in {str(QuantizeConfig.from_yaml(q).quantizer_path) for q in QUANTIZE_CONFIGS}


@pytest.mark.parametrize("path", QUANTIZE_CONFIGS, ids=lambda p: p.stem)
def test_quantize_example_builds_its_quantizer(path: Path) -> None:
    config = QuantizeConfig.from_yaml(path)
    assert build_quantizer(config.method, **config.quantizer).name == config.method


def test_components_pass_torchx_linter() -> None:
    for name in ("train", "quantize"):
        assert validate(str(COMPONENTS), name) == [], name


def test_components_are_the_checkout_files_and_registered_with_torchx() -> None:
    assert Path(components.__file__).resolve() == COMPONENTS  # launch/ is torchrec_sid.launch (editable install)
    (ep,) = [e for e in entry_points(group="torchx.components") if e.name == "sid"]
    assert ep.value == "torchrec_sid.launch.components"
    found = {name for name, c in get_components().items() if not c.validation_errors}
    assert {"sid.train", "sid.quantize"} <= found
    assert "dist.ddp" in found and "utils.echo" in found, "TorchX's own components stay listed"
    assert not {name for name in found if name.startswith("sid._")}, "helpers are not components"


def test_a_shipped_example_is_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for config in ("examples/movielens_id.yaml", "movielens_id.yaml"):
        main = _command(components.train(config))
        assert Path(main[main.index("--config") + 1]) == EXAMPLES / "movielens_id.yaml"
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "movielens_id.yaml").write_text("name: mine\n")  # a file here wins
    main = _command(components.quantize("examples/movielens_id.yaml"))
    assert main[main.index("--config") + 1] == "examples/movielens_id.yaml"
    with pytest.raises(ValueError, match="is not a file .* nor a shipped example"):
        components.train("examples/nope.yaml")


def test_train_app_single_node() -> None:
    app = components.train("examples/movielens_id.yaml", nproc=2, out="outputs/x", max_steps=7, seed=3,
                           resume=True, env={"OMP_NUM_THREADS": "1"})
    (role,) = app.roles
    assert app.name == "movielens_id" and role.num_replicas == role.min_replicas == 1
    assert role.env["OMP_NUM_THREADS"] == "1"
    cmd = _command(app)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]  # a local image: this interpreter
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--nnodes") + 1] == "1"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "localhost:0"
    main = cmd[cmd.index("torchrec_sid") - 1:]
    assert main == ["-m", "torchrec_sid", "train", "--config", "examples/movielens_id.yaml", "--out", "outputs/x",
                    "--seed", "3", "--max-steps", "7", "--resume"]
    # the worker command is one the project's CLI accepts
    from torchrec_sid.cli import build_parser

    args = build_parser().parse_args(main[2:])
    assert (args.config, args.out, args.seed, args.max_steps, args.resume) == \
        ("examples/movielens_id.yaml", "outputs/x", 3, 7, True)


def test_train_app_multi_node_from_the_cli_arguments() -> None:
    # as `torchx run -s kubernetes sid.train --image ... --nnodes 4 --nproc 8 --gpu 8 ...` does
    app = materialize_appdef(components.train, [
        "--config", "examples/movielens_sid_rq_gmm.yaml", "--image", "registry.example.com/torchrec-sid:1",
        "--nnodes", "4", "--nproc", "8", "--gpu", "8", "--cpu", "64", "--memMB", "480000", "--max_steps", "100",
        "--semantic_ids", "/data/sids.safetensors", "--resume", "False", "--mounts", "type=bind,src=/d,dst=/data",
    ])
    (role,) = app.roles
    assert role.image == "registry.example.com/torchrec-sid:1"
    assert role.num_replicas == 4 and role.resource.gpu == 8 and role.resource.cpu == 64
    assert role.mounts[0].dst_path == "/data"
    cmd = _command(app)
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]  # a container image: its own python
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--nproc_per_node") + 1] == "8"
    assert cmd[cmd.index("--rdzv_endpoint") + 1].endswith(":29500")  # the first replica's host
    assert cmd[cmd.index("torchrec_sid") + 1:] == [
        "train", "--config", "examples/movielens_sid_rq_gmm.yaml", "--semantic-ids", "/data/sids.safetensors",
        "--max-steps", "100"]


def test_quantize_app() -> None:
    app = components.quantize("examples/quantize_rq_gmm.yaml", out="outputs/s.safetensors", seed=1, python="py")
    (role,) = app.roles
    cmd = _command(app)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and role.num_replicas == 1
    assert cmd[cmd.index("--nproc_per_node") + 1] == "1"
    assert cmd[cmd.index("torchrec_sid") + 1:] == [
        "quantize", "--config", "examples/quantize_rq_gmm.yaml", "--out", "outputs/s.safetensors", "--seed", "1"]


@pytest.mark.parametrize("kwargs, message", [
    ({"config": "examples/missing.yaml"}, "is not a file"),
    ({"config": "examples/movielens_id.yaml", "nproc": 0}, "--nproc must be >= 1"),
    ({"config": "examples/movielens_id.yaml", "nproc": 4, "gpu": 2}, "--nproc 4 exceeds --gpu 2"),
])
def test_bad_arguments_fail_before_launch(kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message):
        components.train(**kwargs)


def test_two_process_run_through_torchx_local_cwd(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k", num_users=40, num_ratings=300)
    SemanticIds(torch.tensor([[i % 3, i % 2] for i in range(8)]), [3, 2], "rq_kmeans", {}).save(tmp_path / "s.st")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "ml100k": str(folder), "semantic_ids": str(tmp_path / "s.st"), "batch_size": 16,
        "out": str(tmp_path / "unused"), "eval_splits": ["test"],
        "model": {"embedding_dim": 8, "item_representation": ["id", "sid"], "history_block": "din",
                  "max_history": 10, "dense_layers": [8], "over_layers": [8]}}))
    out = tmp_path / "run"
    # the venv is not on PATH: the component must launch the workers with this interpreter by itself; the
    # component is found by its registered name, from a folder outside the checkout
    env = {**os.environ, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "sid.train",
         "--config", str(config), "--nproc", "2", "--max_steps", "3", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 3
    assert 0.0 <= results["metrics"]["test"]["auc"] <= 1.0


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_command_turns_on_huge_pages_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch, preset: str | None,
                                                           expected: str) -> None:
    """Every process a component or the command starts (``python -m torchrec_sid``) sets PyTorch's huge-page switch
    before torch loads; an explicit value in the environment wins."""
    import importlib

    from torchrec_sid import cli

    if preset is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
    importlib.reload(cli)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == expected
