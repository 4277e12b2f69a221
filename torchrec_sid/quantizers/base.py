"""The Quantizer API, its registry and the residual-quantizer skeleton.

A quantizer turns item content embeddings into semantic IDs ``codes: LongTensor[N, levels]``. Its contract (the
same for every registered quantizer, checked by ``tests/test_quantizer_contract.py``):

* **Settings.** A quantizer is a dataclass of keyword-only settings (positional only where a class says so). The
  constructor stores them as given and checks nothing; :meth:`Quantizer.get_params` returns them,
  :meth:`Quantizer.set_params` changes them (unknown names raise), :meth:`Quantizer.clone` is an unfitted copy.
  Each setting declares its allowed values (:func:`setting`); :meth:`Quantizer.check_params` checks them (ValueError
  naming the setting, the value and the allowed range) and ``fit`` calls it first.
* **Inputs.** ``fit(x)`` / ``encode(x)`` take the signals ``{name: [N, D_k]}`` named by
  :attr:`Quantizer.signal_names`, or a bare ``[N, D]`` tensor when there is one signal (:func:`as_signals`, the one
  place that converts). Residual quantizers read one signal, ``"x"``.
* **Outputs.** ``fit(x) -> self``; ``encode(x) -> LongTensor[N, levels]`` with ``codes[:, l]`` in
  ``[0, cardinalities[l])``; ``decode(codes) -> Tensor[N, D]``, the reconstruction of the signals concatenated in
  :attr:`Quantizer.signal_names` order (``D = sum_k D_k``; one signal: its ``[N, D]``);
  ``decode_signals(codes) -> {name: [N, D_k]}``, the same reconstruction per signal.
* **State.** Learned state ends with ``_``; ``encode`` / ``decode`` / ``save`` of an unfitted quantizer raise
  :class:`NotFittedError`. ``save(path)`` writes one artifact file (:func:`torchrec_sid.io.save_artifact`: the
  settings as JSON, the fitted tensors, the history) and ``Quantizer.load(path)`` reads it back.

Quantizers register under a name (:data:`QUANTIZERS`), so ``build_quantizer("rq_gmm", levels=3)`` and
``Quantizer.load(path)`` find the class; :meth:`Quantizer.semantic_ids` gives the
:class:`~torchrec_sid.sid.SemanticIds` table of a catalogue.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from torchrec_sid._dist import ShardLayout, all_reduce_sum_, raise_on_any_rank, rank, shard_layout
from torchrec_sid.io import load_artifact, save_artifact
from torchrec_sid.sid.codes import check_codes
from torchrec_sid.sid.semantic_ids import SemanticIds

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

QUANTIZERS: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound="Quantizer")
Record = Callable[[dict[str, Any]], None]  # receives one history entry per fit iteration
QuantizerInput = Tensor | Mapping[str, Tensor]  # {name: [N, D_k]}, or [N, D] for a one-signal quantizer
Check = Callable[[str, Any], None]  # (setting name, value) -> None, or ValueError naming both and the allowed range

__all__ = ["QUANTIZERS", "NotFittedError", "Quantizer", "QuantizerInput", "ResidualQuantizer", "as_signals",
           "build_quantizer", "check_codes", "check_embeddings", "register", "releasing_pages", "setting"]


class NotFittedError(RuntimeError):
    """``encode`` / ``decode`` / ``save`` of a quantizer that was neither fitted nor loaded."""


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
    bad = torch.cat([(~torch.isfinite(x[rows]).all(dim=1)).nonzero().flatten() + rows.start
                     for rows in row_chunks(len(x), 8192)])  # chunked: no [N, D] temporary
    if len(bad):
        raise ValueError(f"{what} has non-finite values (NaN or inf) in row {int(bad[0])} ({len(bad)} rows in all)")
    return x.float()


def as_signals(x: QuantizerInput, names: list[str]) -> dict[str, Tensor]:
    """The input of ``fit`` / ``encode`` as ``{name: tensor}`` for the signals ``names``: a mapping must have exactly
    these names; a bare tensor is the one signal of a one-signal quantizer. Shapes are checked by the caller."""
    if isinstance(x, Mapping):
        given = list(x)
        if set(given) != set(names):
            raise ValueError(f"expected {len(names)} signal(s) {sorted(names)}, got {len(given)} {sorted(given)}: "
                             f"missing {sorted(set(names) - set(given))}, unexpected {sorted(set(given) - set(names))}")
        return {name: x[name] for name in names}
    if len(names) == 1:
        return {names[0]: x}
    raise ValueError(f"expected {len(names)} signals {sorted(names)} as a {{name: [N, D_k]}} dict, "
                     f"got a single {type(x).__name__}")


def row_chunks(num_rows: int, chunk_size: int, lane: int = 0, lanes: int = 1) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_size`` rows (``lanes > 1``: only chunks ``lane, lane + lanes,
    ...``, :func:`in_lanes`). After each chunk (when the next one, or the end, is asked for) the
    :func:`releasing_pages` hook runs when one is set, so a pass over a memory-mapped input keeps about one chunk
    (per lane) of it resident."""
    release = _page_release.get()
    for start in range(lane * chunk_size, num_rows, lanes * chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))
        if release is not None:
            release()


LANES = 2  # chunked passes that run in lanes (in_lanes) split their chunks into this many fixed streams
T = TypeVar("T")
_lane_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own


def in_lanes(work: Callable[[int], T]) -> list[T]:
    """``[work(0), ..., work(LANES - 1)]``: a chunked pass split into :data:`LANES` fixed streams of chunks
    (``row_chunks(n, chunk_size, lane, LANES)``), each accumulating its own statistics, which the caller sums in
    lane order.

    With ``torch.get_num_threads() >= LANES`` the lanes run at once in ``LANES`` threads (torch ops release the
    GIL), each with ``get_num_threads() // LANES`` intra-op threads (set for the call, process-wide): no fork and
    join per op, and the single-threaded parts of a chunk's work (scatter-adds, row minima, counts) run in
    parallel. Otherwise they run one after the other. The lanes' chunks, and so their results, do not depend on
    the thread count. Each lane runs in a copy of the caller's context (the :func:`releasing_pages` hook).
    """
    global _lane_pool
    threads = torch.get_num_threads()
    if threads < LANES:
        return [work(lane) for lane in range(LANES)]
    if _lane_pool is None or _lane_pool[0] != os.getpid():
        _lane_pool = (os.getpid(), ThreadPoolExecutor(LANES - 1, thread_name_prefix="lane"))
    with intra_op_threads(threads // LANES):
        others = [_lane_pool[1].submit(contextvars.copy_context().run, work, lane) for lane in range(1, LANES)]
        try:
            first = work(0)
        finally:
            wait(others)  # an error in lane 0 is raised once every lane has stopped
    return [first, *(future.result() for future in others)]


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``min(threads, current)`` for the block (process-wide), then restored:
    for loops of ops on a few thousand numbers, whose fork and join cost more than splitting them saves."""
    current = torch.get_num_threads()
    torch.set_num_threads(min(threads, current))
    try:
        yield
    finally:
        torch.set_num_threads(current)


class Residuals:
    """The residuals ``x - sum_{l < level} codebooks[l, codes[:, l]]`` of ``x: [n, D]``, formed when rows are read.

    A residual fit reads its level's rows chunk by chunk, so it never stores an ``[n, D]`` residual next to ``x``
    (``x`` may be a read-only memory map).

    Example::

        r = Residuals(x, codebooks, codes, level=1)  # x minus each row's level-0 codeword
        chunk = r[0:4096]  # [4096, D]
    """

    def __init__(self, x: Tensor, codebooks: Tensor | None = None, codes: Tensor | None = None,
                 level: int = 0) -> None:
        self.x, self.codebooks, self.codes, self.level = x, codebooks, codes, level

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: slice | Tensor) -> Tensor:
        """The residual rows ``rows`` (a slice or an index tensor) -> ``[m, D]`` float32 (at level 0 possibly a view
        of ``x``: read it, do not write to it)."""
        out = self.x[rows].float()
        if self.level:
            assert self.codebooks is not None and self.codes is not None
            codes = self.codes[rows]
            out = out - self.codebooks[0].index_select(0, codes[:, 0])  # a new tensor: x is never written
            for level in range(1, self.level):
                out.sub_(self.codebooks[level].index_select(0, codes[:, level]))
        return out

    def chunks(self, chunk_size: int, lane: int = 0, lanes: int = 1) -> Iterator[tuple[slice, Tensor]]:
        """``(rows, self[rows])`` for the slices of :func:`row_chunks`, formed in buffers allocated once per call:
        each chunk ``[m, D]`` is valid until the next one is read (3x faster than :meth:`__getitem__` per chunk at
        level 2, which allocates, and so page-faults, fresh ``[m, D]`` tensors)."""
        if not self.level:
            yield from ((rows, self.x[rows].float()) for rows in row_chunks(len(self), chunk_size, lane, lanes))
            return
        dim = self.x.shape[1]
        size = min(chunk_size, len(self))
        out, picked = torch.empty(size, dim), torch.empty(size, dim)
        assert self.codebooks is not None and self.codes is not None
        for rows in row_chunks(len(self), chunk_size, lane, lanes):
            m = rows.stop - rows.start
            chunk = out[:m].copy_(self.x[rows])
            codes = self.codes[rows]
            for level in range(self.level):
                chunk.sub_(torch.index_select(self.codebooks[level], 0, codes[:, level], out=picked[:m]))
            yield rows, chunk


def read_chunks(x: Rows, chunk_size: int, lane: int = 0, lanes: int = 1) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, x[rows])`` for the slices of :func:`row_chunks` over ``x: [n, D]``; each chunk is valid until the
    next one is read (:meth:`Residuals.chunks` reuses its buffers)."""
    if isinstance(x, Residuals):
        yield from x.chunks(chunk_size, lane, lanes)
    else:
        yield from ((rows, x[rows]) for rows in row_chunks(len(x), chunk_size, lane, lanes))


Rows = Tensor | Residuals  # what a level is fitted on: [n, D] rows read by slices and index tensors


SCATTERED_READ_ROWS = 1024  # rows of a scattered read (a seeding sample) read between two page releases
_page_release: ContextVar[Callable[[], None] | None] = ContextVar("page_release", default=None)


@contextlib.contextmanager
def releasing_pages(release: Callable[[], None]) -> Iterator[None]:
    """While the block runs, every chunked pass over the rows (:func:`row_chunks`: the value check, the Lloyd / EM
    passes, encoding) calls ``release()`` after each chunk, and every scattered read of rows by index
    (:func:`gather_global_rows`: the seeding sample, RQ-GMM's re-seeded rows) after each
    :data:`SCATTERED_READ_ROWS` rows, read in increasing row order.

    For an input memory-mapped from a file: ``release`` drops the map's resident pages (``madvise``), so neither a
    full pass nor a sample spread over the whole file (with the kernel's fault-around, 1024 scattered rows map tens
    of MB) makes the whole file resident at once. Example::

        with releasing_pages(lambda: release_pages(memmap)):  # torchrec_sid.jobs.scale.release_pages
            quantizer.fit(torch.from_numpy(memmap))
    """
    token = _page_release.set(release)
    try:
        yield
    finally:
        _page_release.reset(token)


def read_rows(x: Rows, index: Tensor) -> Tensor:
    """``x[index]`` -> ``[m, D]`` float32, read in increasing row order, :data:`SCATTERED_READ_ROWS` rows at a time,
    calling the :func:`releasing_pages` hook (when one is set) after each chunk. ``x: [n, D]``, ``index: [m]``."""
    release = _page_release.get()
    if release is None:
        return x[index].float()
    order = index.argsort()
    rows = torch.empty(len(index), x.shape[1])
    for part in order.split(SCATTERED_READ_ROWS):
        rows[part] = x[index[part]].float()
        release()
    return rows


def gather_global_rows(x: Rows, index: Tensor, layout: ShardLayout) -> Tensor:
    """Rows of the global catalogue by global index, on every rank (as :func:`torchrec_sid._dist.gather_rows`, for
    :class:`Residuals` too; read by :func:`read_rows`). ``x: [n, D]``, ``index: [m]`` -> ``[m, D]``."""
    local = index - layout.offset
    mine = (local >= 0) & (local < layout.num_rows)
    rows = torch.zeros(len(index), x.shape[1])
    if mine.any():
        rows[mine] = read_rows(x, local[mine])
    return all_reduce_sum_(rows)  # every row is non-zero on exactly one rank, so the sum is exact


# -------------------------------------------------------------------------------------------------- settings


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A quantizer setting: a dataclass field with its default (``factory`` for a list) and the ``check`` that
    :meth:`Quantizer.check_params` runs on its value."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _interval(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    if low is None:
        return f"{'<' if open_high else '<='} {high}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def integer(low: int | None = None) -> Check:
    """An integer (not a bool) ``>= low``."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
            raise ValueError(f"{name} must be an integer{'' if low is None else ' >= ' + str(low)}, got {value!r}")

    return check


def real(low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False) -> Check:
    """A real number (int or float, not a bool, not NaN) in the interval ``low..high`` (closed unless ``open_*``)."""
    allowed = _interval(low, high, open_low, open_high)

    def check(name: str, value: Any) -> None:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value < high if open_high else value <= high
        if not ok:
            raise ValueError(f"{name} must be a number {allowed}, got {value!r}")

    return check


def one_of(*choices: Any) -> Check:
    """One of ``choices``."""

    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

    return check


# -------------------------------------------------------------------------------------------------- quantizer


class Quantizer(ABC):
    """Item signals -> semantic IDs ``codes: LongTensor[N, levels]`` and back (the contract: module docstring).

    Subclasses are ``@dataclass(kw_only=True, eq=False)`` classes whose fields are their settings
    (:func:`setting`), list their fitted tensors in ``_state_names`` (names ending in ``_``, declared with
    ``field(init=False)``) and are registered with :func:`register`; ``history_`` holds one dict per fit iteration.
    """

    name: ClassVar[str]
    _state_names: ClassVar[tuple[str, ...]]
    history_: list[dict[str, Any]]

    # -------------------------------------------------------------------------------------------- settings

    @classmethod
    def param_names(cls) -> list[str]:
        """The settings, in constructor order."""
        return [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]

    def get_params(self) -> dict[str, Any]:
        """The settings as given to the constructor (or :meth:`set_params`): ``type(q)(**q.get_params())`` builds
        an unfitted copy."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> Self:
        """Changes settings by name (ValueError for an unknown name); they take effect at the next ``fit``."""
        _refuse_unknown(type(self), params)
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def clone(self) -> Self:
        """An unfitted copy with equal (deep-copied) settings."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def check_params(self) -> None:
        """Checks every setting (ValueError naming the setting, its value and the allowed values); ``fit`` calls it
        first."""
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if f.init and check is not None:
                check(f.name, getattr(self, f.name))
        self._check_param_relations()

    def _check_param_relations(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Checks that involve several settings (after each setting's own check)."""

    # ------------------------------------------------------------------------------------------------- API

    @abstractmethod
    def fit(self, x: QuantizerInput, *, progress: bool = False, writer: SummaryWriter | None = None) -> Self:
        """Learns the codebooks from ``x`` (:attr:`signal_names`; this rank's shard under torch.distributed)."""

    @abstractmethod
    def encode(self, x: QuantizerInput) -> Tensor:
        """``x`` (``{name: [N, D_k]}`` or ``[N, D]``) -> ``codes: LongTensor[N, levels]``."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """``codes: [N, levels]`` -> reconstruction ``[N, D]`` (several signals: concatenated in
        :attr:`signal_names` order)."""

    def decode_signals(self, codes: Tensor) -> dict[str, Tensor]:
        """``codes: [N, levels]`` -> reconstruction per signal ``{name: [N, D_k]}`` (default, one signal:
        ``{signal_names[0]: decode(codes)}``)."""
        return {self.signal_names[0]: self.decode(codes)}

    @property
    @abstractmethod
    def cardinalities(self) -> list[int]:
        """Number of distinct codes per level."""

    @property
    def signal_names(self) -> list[str]:
        """The names of the input signals, in the order of every per-signal layer and of :meth:`decode`'s columns
        (default: one signal, ``"x"``)."""
        return ["x"]

    @property
    def digit_centres(self) -> list[float] | None:
        """Per level, the centre of an ordinal digit (see :class:`SemanticIds`); None: the codes are categorical
        (the default)."""
        return None

    def semantic_ids(self, x: QuantizerInput, metrics: dict[str, Any] | None = None) -> SemanticIds:
        """The :class:`~torchrec_sid.sid.SemanticIds` of the items ``x`` (row i = item i)."""
        return SemanticIds(self.encode(x), self.cardinalities, self.name, self.get_params(), dict(metrics or {}),
                           digit_centres=self.digit_centres)

    # ----------------------------------------------------------------------------------------------- files

    def _check_fitted(self) -> None:
        if not all(hasattr(self, s) for s in self._state_names):
            raise NotFittedError(f"{self.name} quantizer is not fitted: call fit() or load() first")

    def save(self, path: str | Path) -> Path:
        """Writes the fitted parameters, the settings (``"config"``) and the history to one safetensors file."""
        self._check_fitted()
        meta = {"name": self.name, "config": self.get_params(), "history": self.history_}
        return save_artifact(path, "quantizer", self._state_tensors(), meta)

    @classmethod
    def load(cls, path: str | Path) -> Self:
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


def _refuse_unknown(cls: type[Quantizer], params: Mapping[str, Any]) -> None:
    known = cls.param_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for quantizer {getattr(cls, 'name', cls.__name__)!r}; "
                         f"it takes {known}")


def register(name: str) -> Callable[[type[Q]], type[Q]]:
    """Class decorator: registers a :class:`Quantizer` dataclass under ``name`` (its ``name`` attribute)."""

    def decorate(cls: type[Q]) -> type[Q]:
        if name in QUANTIZERS:
            raise ValueError(f"quantizer name {name!r} is already registered to {QUANTIZERS[name].__name__}")
        if "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be decorated with @dataclass(kw_only=True, eq=False) (below "
                            f"@register) so that its settings are its fields")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return decorate


def build_quantizer(name: str, **params: Any) -> Quantizer:
    """An unfitted quantizer by registry name, e.g. ``build_quantizer("rq_gmm", levels=3, codebook_size=256)``;
    ValueError for an unknown name or setting (values are checked by ``fit`` / :meth:`Quantizer.check_params`)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; registered: {sorted(QUANTIZERS)}")
    _refuse_unknown(QUANTIZERS[name], params)
    return QUANTIZERS[name](**params)


@dataclass(kw_only=True, eq=False)
class ResidualQuantizer(Quantizer):
    """Residual quantization: level ``l`` picks a row of codebook ``l`` for the residual left by levels ``< l``.

    ``decode(codes) = sum_l codebooks_[l, codes[:, l]]``. Subclasses fit one level (:meth:`_fit_level`) and
    assign residuals to codes (:meth:`_assign`); fitting, encoding and decoding are shared. One input signal,
    ``x: [N, D]`` (or ``{"x": [N, D]}``).

    Settings (shared):
        levels: L, number of code levels.
        codebook_size: K, codewords per level.
        chunk_size: rows per distance matmul (memory ``O(chunk_size * K)``).
        seed: seed of the sampling and the initialisation draws.

    Fitted state: ``codebooks_: [levels, K, D]`` and ``history_``.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("codebooks_",)
    levels: int = setting(3, integer(1))
    codebook_size: int = setting(256, integer(1))
    chunk_size: int = setting(4096, integer(1))
    seed: int = setting(0, integer())
    codebooks_: Tensor = field(init=False, repr=False)

    @property
    def cardinalities(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def _embeddings(self, x: QuantizerInput, dim: int | None = None) -> Tensor:
        """The one signal of ``x`` as a checked float32 ``[N, D]`` tensor."""
        return check_embeddings(as_signals(x, self.signal_names)["x"], dim=dim)

    def _init_state(self, dim: int) -> None:
        """Allocates the fitted tensors for embeddings of dimension ``dim``."""
        self.codebooks_ = torch.zeros(self.levels, self.codebook_size, dim)

    @abstractmethod
    def _fit_level(self, residual: Rows, level: int, layout: ShardLayout, generator: torch.Generator,
                   record: Record) -> None:
        """Fits level ``level`` on ``residual: [n, D]`` (this rank's rows); sets ``codebooks_[level]``."""

    @abstractmethod
    def _assign(self, residual: Tensor, level: int) -> Tensor:
        """``residual: [n, D]`` -> codes ``[n]`` at ``level``."""

    def _next_residual(self, residual: Rows, level: int, codes: Tensor) -> Rows:
        """The residual of level ``level + 1`` (hard: minus the assigned codeword). Writes ``codes[:, level]``;
        a :class:`Residuals` stays lazy (no ``[n, D]`` copy), a tensor is updated in place."""
        for rows in row_chunks(len(residual), self.chunk_size):
            codes[rows, level] = self._assign(residual[rows], level)
        if isinstance(residual, Residuals):
            return Residuals(residual.x, self.codebooks_, codes, level + 1)
        for rows in row_chunks(len(residual), self.chunk_size):
            residual[rows] -= self.codebooks_[level, codes[rows, level]]
        return residual

    def _descend_(self, residual: Tensor, levels: int) -> Tensor:
        """Encodes ``residual: [n, D]`` through the first ``levels`` levels, in place; returns ``[n, levels]``."""
        codes = torch.empty(len(residual), levels, dtype=torch.long)
        for level in range(levels):
            codes[:, level] = self._assign(residual, level)
            residual -= self.codebooks_[level, codes[:, level]]
        return codes

    def fit(self, x: QuantizerInput, *, progress: bool = False, writer: SummaryWriter | None = None) -> Self:
        """Fits level after level on successive residuals of ``x: [n, D]``.

        Under torch.distributed every rank calls ``fit`` with its own rows; statistics are all-reduced and the
        result is the same as one process fitting all rows. ``writer`` gets one scalar per metric and iteration
        (pass it on one rank only); ``progress`` shows a bar on rank 0.
        """
        self.check_params()
        try:
            x = self._embeddings(x)
        except ValueError as error:
            raise_on_any_rank(error)  # raises, on every rank
            raise
        raise_on_any_rank(None)  # raises when another rank's rows failed their checks
        layout = shard_layout(*x.shape)
        if layout.total_rows < self.codebook_size:
            raise ValueError(f"{self.name} needs at least codebook_size={self.codebook_size} items to fit, "
                             f"got {layout.total_rows}")
        self._init_state(x.shape[1])
        self.history_ = []
        generator = torch.Generator().manual_seed(self.seed)
        codes = torch.zeros(len(x), self.levels, dtype=torch.long)
        residual: Rows = Residuals(x, self.codebooks_, codes, 0)  # rows formed on read: x is never copied
        with tqdm(total=self.levels, desc=self.name, disable=not progress or rank() != 0) as bar:
            for level in range(self.levels):
                record = self._recorder(level, writer, bar)
                self._fit_level(residual, level, layout, generator, record)
                if level + 1 < self.levels:
                    residual = self._next_residual(residual, level, codes)
                bar.update()
        return self

    def _recorder(self, level: int, writer: SummaryWriter | None, bar: tqdm) -> Record:
        """A callback that stores one iteration's entry in ``history_``, TensorBoard and the progress bar."""

        def record(entry: dict[str, Any]) -> None:
            entry = {"level": level, **entry}
            self.history_.append(entry)
            scalars = {k: v for k, v in entry.items() if isinstance(v, float)}
            stage = entry["stage"]
            if stage.endswith("_progressive"):  # one curve per column count
                stage = f"{stage}/dims_{entry['dims']}"
            if writer is not None:
                for key, value in scalars.items():
                    writer.add_scalar(f"{self.name}/{stage}/level_{level}/{key}", value, entry["iteration"])
            bar.set_postfix(stage=entry["stage"], iteration=entry["iteration"], rmse=f"{entry['rmse']:.5f}")

        return record

    def encode(self, x: QuantizerInput) -> Tensor:
        """``x: [N, D]`` -> ``codes: LongTensor[N, levels]``, in chunks of ``chunk_size`` rows."""
        self._check_fitted()
        x = self._embeddings(x, dim=self.codebooks_.shape[2])
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
