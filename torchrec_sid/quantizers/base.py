"""The Quantizer API, its registry, the residual-quantizer skeleton and the :class:`SemanticIds` artifact.

A quantizer turns item content embeddings ``x: [N, D]`` into semantic IDs ``codes: LongTensor[N, levels]``:
``fit(x) -> self``, ``encode(x) -> codes``, ``decode(codes) -> x_hat: [N, D]``, ``save(path)``, ``load(path)``.
The constructor only stores settings; learned state ends with ``_``. Quantizers register under a name
(:data:`QUANTIZERS`), so ``build_quantizer("rq_gmm", levels=3)`` and ``Quantizer.load(path)`` find the class.

Files: one safetensors file per artifact, written atomically. The tensors are the fitted parameters (or the
codes); the safetensors ``__metadata__`` header holds ``kind``, ``format_version``, ``meta`` (canonical JSON:
name, config, history, metrics...) and ``sha256`` over the header fields and every tensor's name, dtype, shape
and bytes. Loading refuses a truncated or modified file (:class:`~torchrec_sid.io.ChecksumError`) or another
format version (``ValueError``), naming the path.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from torchrec_sid.io import ChecksumError, atomic_write, sha256_bytes
from torchrec_sid.quantizers.distributed import ShardLayout, raise_on_any_rank, rank, shard_layout
from torchrec_sid.sid.codes import add_collision_suffix, collision_rate

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

FORMAT_VERSION = 1
QUANTIZERS: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound="Quantizer")
Record = Callable[[dict[str, Any]], None]  # receives one history entry per fit iteration


# ---------------------------------------------------------------------------------------------------- checks


def check_embeddings(x: Tensor, *, dim: int | None = None, what: str = "x") -> Tensor:
    """``x`` as a float32 ``[N, D]`` tensor; ValueError naming the problem (shape, empty, dim, non-finite row)."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} is empty: got shape {tuple(x.shape)}, expected [N >= 1, D >= 1]")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has D={x.shape[1]} columns, expected D={dim} (the dimension fitted on)")
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{what} has non-finite values (NaN or inf) in row {int(bad[0])} ({len(bad)} rows in all)")
    return x.float()


def check_codes(codes: Tensor, cardinalities: list[int], *, what: str = "codes") -> Tensor:
    """``codes: [N, l]`` (``1 <= l <= len(cardinalities)``) as int64; ValueError naming the first bad entry."""
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or not 1 <= codes.shape[1] <= len(cardinalities):
        raise ValueError(f"{what} must be [N, levels] with 1 <= levels <= {len(cardinalities)}, "
                         f"got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {codes.dtype}")
    codes = codes.long()
    limit = torch.tensor(cardinalities[: codes.shape[1]])
    bad = ((codes < 0) | (codes >= limit)).nonzero()
    if len(bad):
        i, level = bad[0].tolist()
        raise ValueError(f"{what}[{i}, {level}] = {int(codes[i, level])} is outside [0, {cardinalities[level]}) "
                         f"at level {level} ({len(bad)} bad entries in all)")
    return codes


def check_setting(name: str, value: float, low: float) -> None:
    """Raises ValueError naming the setting when ``value < low``."""
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_size`` rows."""
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


# ------------------------------------------------------------------------------------------------------ files


def _digest(header: dict[str, str], tensors: dict[str, Tensor]) -> str:
    parts = [json.dumps(header, sort_keys=True, separators=(",", ":")).encode()]
    for name in sorted(tensors):
        t = tensors[name]
        parts += [json.dumps([name, str(t.dtype), list(t.shape)]).encode(), t.numpy().tobytes()]
    return sha256_bytes(b"".join(parts))


def save_artifact(path: str | Path, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any],
                  format_version: int = FORMAT_VERSION) -> Path:
    """Writes ``tensors`` and JSON ``meta`` to one safetensors file, atomically, with a SHA-256 in its header."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {"kind": kind, "format_version": str(format_version),
              "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    header["sha256"] = _digest(header, tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_artifact(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads a :func:`save_artifact` file: ``(tensors, meta)`` after checking kind, format version and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise ChecksumError(f"{path} is truncated or corrupt, not a readable safetensors file ({e})") from e
    if not {"kind", "format_version", "meta", "sha256"} <= header.keys():
        raise ChecksumError(f"{path} is not a torchrec_sid artifact: header keys {sorted(header)}")
    if header["kind"] != kind:
        raise ValueError(f"{path} holds a {header['kind']!r} artifact, expected {kind!r}")
    if header["format_version"] != str(FORMAT_VERSION):
        raise ValueError(f"{path} has format version {header['format_version']}; "
                         f"this library reads version {FORMAT_VERSION}")
    expected = header.pop("sha256")
    actual = _digest(header, tensors)
    if actual != expected:
        raise ChecksumError(f"{path} was modified or corrupted: sha256 {actual[:12]}..., "
                            f"recorded {expected[:12]}...")
    return tensors, json.loads(header["meta"])


# -------------------------------------------------------------------------------------------------- quantizer


class Quantizer(ABC):
    """Embeddings ``x: [N, D]`` -> semantic IDs ``codes: LongTensor[N, levels]`` and back.

    Subclasses store their constructor arguments under the same names (that is :meth:`config`) and list their
    fitted tensors in ``_state_names`` (names ending in ``_``); ``history_`` holds one dict per fit iteration.
    """

    name: ClassVar[str]
    _state_names: ClassVar[tuple[str, ...]]
    history_: list[dict[str, Any]]

    @abstractmethod
    def fit(self: Q, x: Tensor, *, progress: bool = False, writer: SummaryWriter | None = None) -> Q:
        """Learns the codebooks from ``x: [N, D]`` (this rank's shard when torch.distributed is initialised)."""

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """``x: [N, D]`` -> ``codes: LongTensor[N, levels]``."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """``codes: [N, levels]`` -> reconstruction ``[N, D]``."""

    @property
    @abstractmethod
    def cardinalities(self) -> list[int]:
        """Number of distinct codes per level."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``type(self)(**q.config())`` builds an unfitted copy."""
        params = inspect.signature(type(self).__init__).parameters
        return {p: getattr(self, p) for p in params if p != "self"}

    def _check_fitted(self) -> None:
        if not all(hasattr(self, s) for s in self._state_names):
            raise RuntimeError(f"{self.name} quantizer is not fitted: call fit() or load() first")

    def save(self, path: str | Path) -> Path:
        """Writes the fitted parameters, config and history to one safetensors file."""
        self._check_fitted()
        meta = {"name": self.name, "config": self.config(), "history": self.history_}
        return save_artifact(path, "quantizer", self._state_tensors(), meta)

    @classmethod
    def load(cls: type[Q], path: str | Path) -> Q:
        """Reads a :meth:`save` file; ``Quantizer.load`` returns whichever registered quantizer it holds."""
        tensors, meta = load_artifact(path, "quantizer")
        quantizer_cls = QUANTIZERS.get(meta["name"])
        if quantizer_cls is None or not issubclass(quantizer_cls, cls):
            raise ValueError(f"{path} holds a {meta['name']!r} quantizer, not a {cls.__name__}")
        quantizer = quantizer_cls(**meta["config"])
        quantizer._load_state(tensors)
        quantizer.history_ = meta["history"]
        return quantizer

    def _state_tensors(self) -> dict[str, Tensor]:
        """The fitted tensors :meth:`save` writes (default: each of ``_state_names``, named without the ``_``)."""
        return {s.rstrip("_"): getattr(self, s) for s in self._state_names}

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restores the fitted state from :meth:`_state_tensors`' tensors (default: sets each of ``_state_names``)."""
        for s in self._state_names:
            setattr(self, s, tensors[s.rstrip("_")])

    @property
    def digit_centres(self) -> list[float] | None:
        """Per level, the centre of an ordinal digit (see :class:`SemanticIds`); None: the codes are categorical
        (the default)."""
        return None


def register(name: str) -> Callable[[type[Q]], type[Q]]:
    """Class decorator: registers a :class:`Quantizer` under ``name`` (its ``name`` attribute)."""

    def decorate(cls: type[Q]) -> type[Q]:
        if name in QUANTIZERS:
            raise ValueError(f"quantizer name {name!r} is already registered to {QUANTIZERS[name].__name__}")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return decorate


def build_quantizer(name: str, **config: Any) -> Quantizer:
    """An unfitted quantizer by registry name, e.g. ``build_quantizer("rq_gmm", levels=3, codebook_size=256)``."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; registered: {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for quantizer {name!r}; it takes {params}")
    return cls(**config)


class ResidualQuantizer(Quantizer):
    """Residual quantization: level ``l`` picks a row of codebook ``l`` for the residual left by levels ``< l``.

    ``decode(codes) = sum_l codebooks_[l, codes[:, l]]``. Subclasses fit one level (:meth:`_fit_level`) and
    assign residuals to codes (:meth:`_assign`); fitting, encoding and decoding are shared.

    Fitted state: ``codebooks_: [levels, K, D]`` and ``history_``.
    """

    _state_names = ("codebooks_",)
    codebooks_: Tensor

    def __init__(self, levels: int, codebook_size: int, chunk_size: int, seed: int) -> None:
        check_setting("levels", levels, 1)
        check_setting("codebook_size", codebook_size, 1)
        check_setting("chunk_size", chunk_size, 1)
        self.levels = levels
        self.codebook_size = codebook_size
        self.chunk_size = chunk_size
        self.seed = seed

    @property
    def cardinalities(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def _init_state(self, dim: int) -> None:
        """Allocates the fitted tensors for embeddings of dimension ``dim``."""
        self.codebooks_ = torch.zeros(self.levels, self.codebook_size, dim)

    @abstractmethod
    def _fit_level(self, residual: Tensor, level: int, layout: ShardLayout, generator: torch.Generator,
                   record: Record) -> None:
        """Fits level ``level`` on ``residual: [n, D]`` (this rank's rows); sets ``codebooks_[level]``."""

    @abstractmethod
    def _assign(self, residual: Tensor, level: int) -> Tensor:
        """``residual: [n, D]`` -> codes ``[n]`` at ``level``."""

    def _subtract_(self, residual: Tensor, level: int) -> None:
        """Forms the next level's residual in place, chunk by chunk (hard: minus the assigned codeword)."""
        for rows in row_chunks(len(residual), self.chunk_size):
            residual[rows] -= self.codebooks_[level, self._assign(residual[rows], level)]

    def _descend_(self, residual: Tensor, levels: int) -> Tensor:
        """Encodes ``residual: [n, D]`` through the first ``levels`` levels, in place; returns ``[n, levels]``."""
        codes = torch.empty(len(residual), levels, dtype=torch.long)
        for level in range(levels):
            codes[:, level] = self._assign(residual, level)
            residual -= self.codebooks_[level, codes[:, level]]
        return codes

    def fit(self, x: Tensor, *, progress: bool = False, writer: SummaryWriter | None = None) -> ResidualQuantizer:
        """Fits level after level on successive residuals of ``x: [n, D]``.

        Under torch.distributed every rank calls ``fit`` with its own rows; statistics are all-reduced and the
        result is the same as one process fitting all rows. ``writer`` gets one scalar per metric and iteration
        (pass it on one rank only); ``progress`` shows a bar on rank 0.
        """
        error = None
        try:
            x = check_embeddings(x)
        except ValueError as e:
            error = e
        raise_on_any_rank(error)
        layout = shard_layout(*x.shape)
        if layout.total_rows < self.codebook_size:
            raise ValueError(f"{self.name} needs at least codebook_size={self.codebook_size} items to fit, "
                             f"got {layout.total_rows}")
        self._init_state(x.shape[1])
        self.history_ = []
        generator = torch.Generator().manual_seed(self.seed)
        residual = x.clone()
        with tqdm(total=self.levels, desc=self.name, disable=not progress or rank() != 0) as bar:
            for level in range(self.levels):
                record = self._recorder(level, writer, bar)
                self._fit_level(residual, level, layout, generator, record)
                if level + 1 < self.levels:
                    self._subtract_(residual, level)
                bar.update()
        return self

    def _recorder(self, level: int, writer: SummaryWriter | None, bar: tqdm) -> Record:
        """A callback that stores one iteration's entry in ``history_``, TensorBoard and the progress bar."""

        def record(entry: dict[str, Any]) -> None:
            entry = {"level": level, **entry}
            self.history_.append(entry)
            scalars = {k: v for k, v in entry.items() if isinstance(v, float)}
            if writer is not None:
                for key, value in scalars.items():
                    writer.add_scalar(f"{self.name}/{entry['stage']}/level_{level}/{key}", value, entry["iteration"])
            bar.set_postfix(stage=entry["stage"], iteration=entry["iteration"], rmse=f"{entry['rmse']:.5f}")

        return record

    def encode(self, x: Tensor) -> Tensor:
        """``x: [N, D]`` -> ``codes: LongTensor[N, levels]``, in chunks of ``chunk_size`` rows."""
        self._check_fitted()
        x = check_embeddings(x, dim=self.codebooks_.shape[2])
        codes = torch.empty(len(x), self.levels, dtype=torch.long)
        for rows in row_chunks(len(x), self.chunk_size):
            codes[rows] = self._descend_(x[rows].clone(), self.levels)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """``codes: [N, l]`` -> ``[N, D]``, the sum of the first ``l <= levels`` codewords (a prefix decode)."""
        self._check_fitted()
        codes = check_codes(codes, self.cardinalities)
        out = torch.zeros(len(codes), self.codebooks_.shape[2])
        for level in range(codes.shape[1]):
            out += self.codebooks_[level, codes[:, level]]
        return out


# ------------------------------------------------------------------------------------------------ SemanticIds


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

    Example::

        sids = SemanticIds.from_quantizer(RQKMeans(levels=2, codebook_size=4).fit(x), x)
        sids = sids.with_collision_suffix()  # every item's SID unique; codes: [N, 3]
        sids.save("sids.safetensors"); SemanticIds.load("sids.safetensors").codes  # [N, 3]
    """

    codes: Tensor
    cardinalities: list[int]
    quantizer: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    digit_centres: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

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
        if self.digit_centres is None:
            return
        if len(self.digit_centres) != len(self.cardinalities):
            raise ValueError(f"digit_centres has {len(self.digit_centres)} entries, expected one per level "
                             f"({len(self.cardinalities)})")
        for level, (centre, k) in enumerate(zip(self.digit_centres, self.cardinalities, strict=True)):
            if not 0 <= centre <= k - 1:
                raise ValueError(f"digit_centres[{level}] = {centre} is outside [0, {k - 1}], the digit range of "
                                 f"level {level}")

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer, x: Tensor, metrics: dict[str, Any] | None = None) -> SemanticIds:
        """Encodes ``x: [N, D]`` (row i = item i) with a fitted ``quantizer``."""
        return cls(quantizer.encode(x), quantizer.cardinalities, quantizer.name, quantizer.config(),
                   dict(metrics or {}), digit_centres=quantizer.digit_centres)

    def with_collision_suffix(self) -> SemanticIds:
        """A copy with one more level that makes every SID unique; metrics record the rate before and after."""
        codes, suffix_cardinality = add_collision_suffix(self.codes)
        metrics = {**self.metrics, "collision_rate_before_suffix": collision_rate(self.codes),
                   "collision_rate": collision_rate(codes), "suffix_cardinality": suffix_cardinality}
        # the suffix has no order; it gets its midpoint, SIDE's default centre (SIDE should normally skip it)
        centres = None if self.digit_centres is None else [*self.digit_centres, (suffix_cardinality - 1) / 2]
        return replace(self, codes=codes, cardinalities=[*self.cardinalities, suffix_cardinality],
                       config={**self.config, "collision_suffix": True}, metrics=metrics, digit_centres=centres)

    def save(self, path: str | Path) -> Path:
        """Writes one safetensors file atomically: ``codes`` plus JSON metadata and a SHA-256."""
        meta = {"cardinalities": self.cardinalities, "quantizer": self.quantizer, "config": self.config,
                "metrics": self.metrics}
        if self.digit_centres is not None:  # absent: all levels categorical (files without it read the same)
            meta["digit_centres"] = self.digit_centres
        return save_artifact(path, "semantic_ids", {"codes": self.codes}, meta, self.format_version)

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        """Reads a :meth:`save` file; refuses another format version or a modified / truncated file."""
        tensors, meta = load_artifact(path, "semantic_ids")
        return cls(tensors["codes"], meta["cardinalities"], meta["quantizer"], meta["config"], meta["metrics"],
                   digit_centres=meta.get("digit_centres"))
