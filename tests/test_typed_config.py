"""Typed config loading: each YAML mistake is refused at load time, naming the file, the field and the value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from torchrec_sid.typed_config import ConfigError, bounds, from_mapping


@dataclass(frozen=True)
class Inner:
    dim: int = field(default=8, metadata=bounds(ge=1))
    layers: tuple[int, ...] = (4,)


@dataclass(frozen=True)
class Run:
    lr: float = field(default=0.1, metadata=bounds(gt=0))
    steps: int | None = None
    flag: bool = False
    splits: tuple[str, ...] = ("test",)
    kind: Literal["a", "b"] = "a"
    inner: Inner = Inner()
    extra: dict[str, Any] = field(default_factory=dict)


def load(text: str) -> Run:
    return from_mapping(Run, yaml.safe_load(text), "run.yaml")


def test_good_values_load_and_yaml_exponent_floats_are_numbers() -> None:
    run = load("lr: 1e-3\nsteps: 5\nflag: true\nsplits: [valid, test]\nkind: b\ninner: {dim: 2, layers: [3, 1]}")
    assert run == Run(lr=0.001, steps=5, flag=True, splits=("valid", "test"), kind="b", inner=Inner(2, (3, 1)))


@pytest.mark.parametrize("text, message", [
    ("", "run.yaml: expected a mapping of Run fields, got an empty file"),
    ("- 1\n- 2", "run.yaml: expected a mapping of Run fields, got a list"),
    ("lrate: 0.1", r"run.yaml: unknown field\(s\) \['lrate'\]; Run has \["),
    ("steps: 100.5", r"run.yaml: steps = 100.5: expected an integer"),
    ("steps: true", r"run.yaml: steps = True: expected an integer"),
    ("flag: 'false'", r"run.yaml: flag = 'false': expected true or false"),
    ("splits: test", r"run.yaml: splits = 'test': expected a list \(write \[test\] for one element\)"),
    ("lr: .inf", r"run.yaml: lr = inf: expected a finite number"),
    ("lr: .nan", r"run.yaml: lr = nan: expected a finite number"),
    ("lr: -1", r"run.yaml: lr = -1.0: must be > 0"),
    ("lr: fast", r"run.yaml: lr = 'fast': expected a number"),
    ("kind: c", r"run.yaml: kind = 'c': expected one of \['a', 'b'\]"),
    ("inner: {dim: 0}", r"run.yaml: inner.dim = 0: must be >= 1"),
    ("inner: {layers: [1, x]}", r"run.yaml: inner.layers\[1\] = 'x': expected an integer"),
    ("inner: {depth: 1}", r"run.yaml: inner: unknown field\(s\) \['depth'\]"),
    ("extra: 3", r"run.yaml: extra = 3: expected a mapping"),
])
def test_mistakes_are_refused_naming_file_field_and_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(text)


@pytest.mark.parametrize("text, message", [
    ("learning_rate: .inf", r"c.yaml: learning_rate = inf: expected a finite number"),
    ("batch_size: 100.5", r"c.yaml: batch_size = 100.5: expected an integer"),
    ("batch_size: true", r"c.yaml: batch_size = True: expected an integer"),
    ("eval_splits: test", r"c.yaml: eval_splits = 'test': expected a list"),
    ("max_steps: -3", r"c.yaml: max_steps = -3: must be >= 1$"),
    ("checkpoint_every: -1", r"c.yaml: checkpoint_every = -1: must be >= 0"),
    ("seed: -1", r"c.yaml: seed = -1: must be >= 0"),
    ("", r"c.yaml: expected a mapping of TrainConfig fields, got an empty file"),
    ("model: {embedding_dim: 8.5}", r"c.yaml: model.embedding_dim = 8.5: expected an integer"),
    ("embedding_learning_rate: .nan", r"c.yaml: embedding_learning_rate = nan: expected a finite number"),
    ("model: {dense_layers: [0]}", r"c.yaml: model: model.dense_layers must be a list of layer sizes >= 1, got \[0\]$"),
    ("model: {dense_layers: [-5]}", r"c.yaml: model: model.dense_layers must be a list of layer sizes >= 1, got \[-5"),
    ("model: {over_layers: [64, 0]}", r"c.yaml: model: model.over_layers must be a list of layer sizes >= 1, "
                                      r"got \[64, 0\]"),
])
def test_train_config_mistakes_are_refused_at_load(tmp_path, text: str, message: str) -> None:
    from torchrec_sid.train.config import TrainConfig

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_every_shipped_train_example_loads() -> None:
    from pathlib import Path

    from torchrec_sid.train.config import TrainConfig

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    train = [p for p in examples if not p.name.startswith("quantize_")]
    assert len(train) >= 8
    for path in train:
        assert TrainConfig.from_yaml(path).name


def test_a_config_built_in_python_is_held_to_the_same_bounds() -> None:
    from torchrec_sid.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig.learning_rate = -0.1: must be > 0"):
        TrainConfig(learning_rate=-0.1)


@pytest.mark.parametrize("text, message", [
    ("metrics_sample: 0", r"q.yaml: metrics_sample = 0: must be >= 1$"),
    ("collision_suffix: 'false'", r"q.yaml: collision_suffix = 'false': expected true or false"),
    ("quantizer: {tol: 1e-3}\nsignals: text", r"q.yaml: signals = 'text': expected a list"),
])
def test_quantize_config_mistakes_are_refused_at_load(tmp_path, text: str, message: str) -> None:
    from torchrec_sid.jobs.quantize import QuantizeConfig

    (tmp_path / "q.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        QuantizeConfig.from_yaml(tmp_path / "q.yaml")
