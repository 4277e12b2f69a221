"""The :class:`SemanticIds` artifact: the semantic ID of every item, the one thing that crosses from quantizer
training to models. It depends on nothing above this layer (no quantizer import), so serving code loads it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchrec_sid.io import FORMAT_VERSION, load_artifact, save_artifact
from torchrec_sid.sid.codes import add_collision_suffix, check_codes, collision_rate


def quantizer_path(sids_path: str | Path) -> Path:
    """Where the quantizer that made a SID table is saved, beside it: ``<stem>.quantizer.safetensors``."""
    path = Path(sids_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".quantizer.safetensors")


@dataclass(frozen=True, eq=False)
class SemanticIds:
    """The artifact that crosses from quantizer training to models: the semantic ID of every item.

    Args:
        codes: ``LongTensor[N, levels]``, row i = item i.
        cardinalities: number of codes per level; ``0 <= codes[:, l] < cardinalities[l]``.
        quantizer: registry name of the quantizer that produced the codes.
        config: its settings (:meth:`Quantizer.config`), plus anything else needed to reproduce the codes.
        metrics: quality metrics (:func:`torchrec_sid.quantizers.metrics.quality_report`).
        format_version: version of the file format.
        digit_centres: how SIDE reads the codes without a table. ``None`` (the default): the codes are
            categorical (indices into codebooks; only a table embeds them). Otherwise the codes are ordinal digit
            vectors and this is one centre ``m_l`` per level: digit l means the value ``codes[:, l] - m_l``
            (ternary DPCA digits: ``m_l = 1``, values {-1, 0, 1}; FSQ with ``L`` levels: ``m_l = (L - 1) / 2``,
            values ``-m_l ... m_l`` in unit steps). The radix of level l is ``cardinalities[l]``
            (:func:`torchrec_sid.sid.packing.pack_codes`).
        suffix_level: the index of the collision-suffix level (:meth:`with_collision_suffix`), or None when the
            artifact has none. The suffix numbers the items that share a code: it is categorical, never an ordinal
            digit, so SIDE refuses it and token tables usually leave it out (:attr:`code_levels`). Files written
            before this field read it from ``config["collision_suffix"]`` (then the suffix is the last level).

    Example::

        sids = RQKMeans(levels=2, codebook_size=4).fit(x).semantic_ids(x)
        sids = sids.with_collision_suffix()  # every item's SID unique; codes: [N, 3]; sids.suffix_level == 2
        sids.save("sids.safetensors"); SemanticIds.load("sids.safetensors").codes  # [N, 3]
    """

    codes: Tensor
    cardinalities: list[int]
    quantizer: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    digit_centres: list[float] | None = None
    suffix_level: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def code_levels(self) -> int:
        """Levels before the collision suffix: the quantizer's own levels (all levels when there is no suffix)."""
        return self.num_levels if self.suffix_level is None else self.suffix_level

    @property
    def num_items(self) -> int:
        return self.codes.shape[0]

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def validate(self) -> None:
        """Raises ValueError unless ``codes`` is int64 ``[N, len(cardinalities)]`` within the cardinalities."""
        if self.codes.dtype != torch.long:
            raise ValueError(f"codes must be int64, got {self.codes.dtype}")
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.cardinalities):
            raise ValueError(f"codes must be [N, {len(self.cardinalities)}] (one column per cardinality), "
                             f"got shape {tuple(self.codes.shape)}")
        if any(c < 1 for c in self.cardinalities):
            raise ValueError(f"cardinalities must be >= 1, got {self.cardinalities}")
        check_codes(self.codes, self.cardinalities)
        if self.suffix_level is not None and self.suffix_level != self.num_levels - 1:
            raise ValueError(f"suffix_level={self.suffix_level}: the collision suffix is the last level, "
                             f"{self.num_levels - 1}, of these {self.num_levels}-level codes")
        if self.digit_centres is None:
            return
        if len(self.digit_centres) != len(self.cardinalities):
            raise ValueError(f"digit_centres has {len(self.digit_centres)} entries, expected one per level "
                             f"({len(self.cardinalities)})")
        for level, (centre, k) in enumerate(zip(self.digit_centres, self.cardinalities, strict=True)):
            if not 0 <= centre <= k - 1:
                raise ValueError(f"digit_centres[{level}] = {centre} is outside [0, {k - 1}], the digit range of "
                                 f"level {level}")


    def with_collision_suffix(self) -> SemanticIds:
        """A copy with one more level, recorded as :attr:`suffix_level`, that makes every SID unique; metrics record
        the rate before and after. Refuses an artifact that already has a suffix."""
        if self.suffix_level is not None:
            raise ValueError(f"the SemanticIds artifact already has a collision suffix (level {self.suffix_level})")
        codes, suffix_cardinality = add_collision_suffix(self.codes)
        metrics = {**self.metrics, "collision_rate_before_suffix": collision_rate(self.codes),
                   "collision_rate": collision_rate(codes), "suffix_cardinality": suffix_cardinality}
        # the suffix has no order; its centre is nominal only (SIDE refuses the suffix level)
        centres = None if self.digit_centres is None else [*self.digit_centres, (suffix_cardinality - 1) / 2]
        return replace(self, codes=codes, cardinalities=[*self.cardinalities, suffix_cardinality],
                       config={**self.config, "collision_suffix": True}, metrics=metrics, digit_centres=centres,
                       suffix_level=self.num_levels)

    def save(self, path: str | Path) -> Path:
        """Writes one safetensors file atomically: ``codes`` plus JSON metadata and a SHA-256."""
        meta: dict[str, Any] = {"cardinalities": self.cardinalities, "quantizer": self.quantizer, "config": self.config,
                "metrics": self.metrics}
        if self.digit_centres is not None:  # absent: all levels categorical (files without it read the same)
            meta["digit_centres"] = self.digit_centres
        if self.suffix_level is not None:  # absent: no suffix
            meta["suffix_level"] = self.suffix_level
        return save_artifact(path, "semantic_ids", {"codes": self.codes}, meta, self.format_version)

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        """Reads a :meth:`save` file; refuses another format version or a modified / truncated file. A file without
        ``suffix_level`` (written before the field existed) whose config says ``collision_suffix: true`` has its
        suffix as the last level."""
        tensors, meta = load_artifact(path, "semantic_ids")
        suffix_level = meta.get("suffix_level")
        if suffix_level is None and meta["config"].get("collision_suffix"):
            suffix_level = len(meta["cardinalities"]) - 1
        return cls(tensors["codes"], meta["cardinalities"], meta["quantizer"], meta["config"], meta["metrics"],
                   digit_centres=meta.get("digit_centres"), suffix_level=suffix_level)
