"""The Quantizer API, its registry and the residual-quantizer skeleton.

A quantizer turns item content embeddings ``x: [N, D]`` into semantic IDs ``codes: LongTensor[N, levels]``:
``fit(x) -> self``, ``encode(x) -> codes``, ``decode(codes) -> x_hat: [N, D]``, ``save(path)``, ``load(path)``.
The constructor only stores settings; learned state ends with ``_``. Quantizers register under a name
(:data:`QUANTIZERS`), so ``build_quantizer("rq_gmm", levels=3)`` and ``Quantizer.load(path)`` find the class.

A fitted quantizer is saved as one artifact file (:func:`torchrec_sid.io.save_artifact`), and
:meth:`Quantizer.semantic_ids` gives the :class:`~torchrec_sid.sid.SemanticIds` table of a catalogue.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from torchrec_sid._dist import ShardLayout, raise_on_any_rank, rank, shard_layout
from torchrec_sid.io import load_artifact, save_artifact
from torchrec_sid.sid.codes import check_codes
from torchrec_sid.sid.semantic_ids import SemanticIds

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

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




def check_setting(name: str, value: float, low: float) -> None:
    """Raises ValueError naming the setting when ``value < low``."""
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_size`` rows."""
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


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

    def semantic_ids(self, x: Tensor, metrics: dict[str, Any] | None = None) -> SemanticIds:
        """The :class:`~torchrec_sid.sid.SemanticIds` of the items ``x: [N, D]`` (row i = item i)."""
        return SemanticIds(self.encode(x), self.cardinalities, self.name, self.config(), dict(metrics or {}),
                           digit_centres=self.digit_centres)

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
