"""The quantize job: item content embeddings -> fitted quantizer -> ``SemanticIds`` artifact.

Runs on one process, or on N under ``torchrun`` / TorchX (``WORLD_SIZE > 1``: gloo on CPU, each rank reads and fits
only its contiguous block of items; rank 0 gathers the codes and writes the artifacts).

Example::

    torchrec-sid quantize --method rq_gmm --levels 3 --codebook-size 256 --data movielens --out sids.safetensors
    torchrec-sid quantize --config examples/quantize_rq_gmm.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.tensorboard import SummaryWriter

from torchrec_sid._dist import is_distributed
from torchrec_sid.io import check_recorded_sha256, published_together, sha256_file
from torchrec_sid.jobs.scale import release_pages
from torchrec_sid.quantizers.base import Quantizer, build_quantizer, releasing_pages
from torchrec_sid.quantizers.metrics import code_balance, collisions, quality_report, utilization
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.semantic_ids import quantizer_path
from torchrec_sid.typed_config import bounds, check_bounds, from_mapping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one quantize run needs; a YAML file with these keys is a complete run.

    Args:
        method: quantizer registry name (``rq_kmeans``, ``rq_gmm``, ...).
        data: ``movielens`` (the 1,682 items), ``movielens_latest`` (the 9,066 items of MovieLens latest-small),
            ``synthetic`` (``synthetic_items`` generated items) or a path to a ``.npy`` file ``[N, D]`` (row i =
            item i).
        signals: the content signals the quantizer reads, for ``movielens`` / ``synthetic``: ``text`` (MiniLM
            embeddings / the generated content) and ``meta`` (genres and, for MovieLens, release decade). One signal
            is passed as a tensor ``[N, D]``, several as ``{name: [N, D_m]}`` (multi-signal quantizers: MMQ,
            VQ-fusion, the autoencoders' ``signals``).
        out: where the ``SemanticIds`` file goes; the fitted quantizer is written next to it
            (``<out stem>.quantizer.safetensors``).
        quantizer: settings of the quantizer (``levels``, ``codebook_size``, ``max_iter``, ``seed``, ...).
        collision_suffix: append a level that makes every item's SID unique.
        tensorboard: folder for TensorBoard scalars (None: none).
        metrics_sample: rows the quality metrics are computed on (a seeded sample when the catalogue is larger).
        ml100k: official ml-100k folder for ``data: movielens`` (None: the PyPI wheel copy).
        synthetic_items: items for ``data: synthetic``.
        seed: seed of the synthetic data and the metrics sample.
    """

    method: str = "rq_gmm"
    data: str = "movielens"
    signals: tuple[str, ...] = ("text",)
    out: str = "outputs/sids.safetensors"
    quantizer: dict[str, Any] = field(default_factory=dict)
    collision_suffix: bool = True
    tensorboard: str | None = None
    metrics_sample: int = field(default=50_000, metadata=bounds(ge=1))
    ml100k: str | None = None
    synthetic_items: int = field(default=100_000, metadata=bounds(ge=1))
    seed: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self) -> None:
        check_bounds(self)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> QuantizeConfig:
        """Reads a YAML file of these fields; ``overrides`` that are not None win (``quantizer`` merges). Any unknown
        key, wrong type or out-of-range number raises :class:`~torchrec_sid.typed_config.ConfigError` naming the
        file, the field and the value."""
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            return from_mapping(cls, raw, str(path))  # raises, naming what the file holds
        quantizer = {**(raw.get("quantizer") or {}), **overrides.pop("quantizer", {})}
        merged = {**raw, **{k: v for k, v in overrides.items() if v is not None}, "quantizer": quantizer}
        return from_mapping(cls, merged, str(path))

    @property
    def quantizer_path(self) -> Path:
        return quantizer_path(self.out)


def embedding_source(config: QuantizeConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """The item signals ``{name: [N, D_m]}`` of ``config.data`` (``config.signals`` of them); a ``.npy`` file is
    memory-mapped, so a rank reads only the rows it indexes."""
    if config.data.endswith(".npy"):
        if len(config.signals) != 1:
            raise ValueError(f"signals: a .npy file is one signal, got {list(config.signals)}")
        if not Path(config.data).is_file():
            raise ValueError(f"data: {config.data} is not a file")
        return {config.signals[0]: _load_npy(config.data)}
    if config.data == "movielens":
        from torchrec_sid.data import movielens

        available = movielens.load(config.ml100k).signals(progress=progress)
    elif config.data == "movielens_latest":
        from torchrec_sid.data import movielens_latest

        available = movielens_latest.load().signals(progress=progress)
    elif config.data == "synthetic":
        from torchrec_sid.data.synthetic import SyntheticConfig, generate_items

        available = generate_items(SyntheticConfig(num_items=config.synthetic_items, seed=config.seed)).signals()
    else:
        raise ValueError(f"data must be 'movielens', 'synthetic' or a .npy file, got {config.data!r} "
                         f"('movielens_latest', MovieLens latest-small, is a source too)")
    unknown = sorted(set(config.signals) - set(available))
    if unknown or not config.signals:
        raise ValueError(f"signals {list(config.signals)}: {config.data} has {sorted(available)}")
    return {name: available[name].numpy() for name in config.signals}


NPY_CHECK_CHUNK = 1 << 22  # values per chunk of the value scan of a .npy file (the file is not read at once)


def _load_npy(path: str) -> np.ndarray:
    """The ``[N, D]`` floating point array of the ``.npy`` file ``path``, memory-mapped, after checking its header
    (a numpy array of numbers), its shape and every value (finite, and within float32, the quantizers' precision);
    ValueError naming ``--data`` and the file otherwise."""
    dtype = _npy_dtype(path)
    if dtype.hasobject:
        raise ValueError(f"--data {path} holds Python objects (dtype {dtype}), not numbers; save a float32 array "
                         f"[N, D]")
    if dtype.kind != "f":
        raise ValueError(f"--data {path} holds {dtype} values; the quantizers read floating point embeddings (as the "
                         f"API does): save them as float32, e.g. np.save(path, x.astype(np.float32))")
    try:
        source = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"--data {path} is not a readable .npy array ({e})") from e
    if source.ndim != 2:
        raise ValueError(f"data: {path} must hold a 2-d array [N, D], got shape {source.shape}")
    if source.shape[0] == 0 or source.shape[1] == 0:
        raise ValueError(f"--data {path} is empty: got shape {source.shape}, expected [N >= 1, D >= 1]")
    _check_values(path, source)
    return source


def _npy_dtype(path: str) -> np.dtype:
    """The dtype in the header of the ``.npy`` file ``path`` (ValueError when it is not a ``.npy`` file)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read(f)
        except ValueError as e:
            raise ValueError(f"--data {path} is not a .npy array file ({e})") from e
    return dtype


def _check_values(path: str, source: np.ndarray) -> None:
    """Raises ValueError naming the first row (and the count) of ``source`` [N, D] that holds a NaN / inf, or a
    value beyond float32's range (it would become inf in the float32 copy the quantizers fit on)."""
    rows_per_chunk = max(1, NPY_CHECK_CHUNK // source.shape[1])
    bad_first, bad, big_first, big = -1, 0, -1, 0
    for start in range(0, source.shape[0], rows_per_chunk):
        block = np.asarray(source[start:start + rows_per_chunk])
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad_first = start + int(np.argmin(finite)) if bad_first < 0 else bad_first
            bad += int((~finite).sum())
        if block.dtype.itemsize > 4:
            with np.errstate(over="ignore"):
                overflow = finite & ~np.isfinite(block.astype(np.float32)).all(axis=1)
            if overflow.any():
                big_first = start + int(np.argmax(overflow)) if big_first < 0 else big_first
                big += int(overflow.sum())
        release_pages(source)  # the scan reads the whole file: keep none of it resident
    if bad:
        raise ValueError(f"--data {path} has non-finite values (NaN or inf) in row {bad_first} ({bad} rows in all)")
    if big:
        raise ValueError(f"--data {path} has values that overflow float32 (|v| > {np.finfo(np.float32).max:.3g}) in "
                         f"row {big_first} ({big} rows in all); the quantizers compute in float32: rescale the "
                         f"embeddings")


def _rows(source: dict[str, np.ndarray], index: slice | np.ndarray) -> torch.Tensor | dict[str, torch.Tensor]:
    """The rows ``index`` of every signal, as float32 copies (memory maps are read-only); one signal: a tensor."""
    rows = {name: torch.from_numpy(np.array(x[index], dtype=np.float32)) for name, x in source.items()}
    return next(iter(rows.values())) if len(rows) == 1 else rows


def _fit_rows(source: dict[str, np.ndarray], index: slice) -> torch.Tensor | dict[str, torch.Tensor]:
    """The rows a rank fits on: a float32 C-contiguous memory map (one ``.npy`` signal) is used in place, read-only
    (the residual quantizers never write their input), so the catalogue is not copied; anything else as
    :func:`_rows`."""
    if len(source) == 1:
        array = next(iter(source.values()))[index]
        if isinstance(array, np.memmap) and array.dtype == np.float32 and array.flags.c_contiguous:
            with warnings.catch_warnings():  # read-only memory: torch warns that writing would be undefined
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(array)
    return _rows(source, index)


def _release_pages(source: dict[str, np.ndarray]) -> None:
    """Drops this process's resident pages of memory-mapped signals (the file stays in the page cache; a later
    read faults them back in), so they do not count twice towards the peak memory with the metrics pass."""
    for array in source.values():
        release_pages(array)


PAGE_RELEASE_S = 0.02  # how often a fit on a memory map drops the map's resident pages (a low-dimensional
# k-means pass reads the 307 MB of a 200k x 384 map in about 0.2 s; a madvise call costs well under 1 ms)


@contextlib.contextmanager
def _pages_released(source: dict[str, np.ndarray]) -> Iterator[None]:
    """Drops the resident pages of memory-mapped signals every :data:`PAGE_RELEASE_S` seconds while the block
    runs (a fit reads the whole map at every iteration; without this its pages would count as one more copy of the
    input in the peak memory), and after each chunk of a scattered read by index
    (:func:`~torchrec_sid.quantizers.base.releasing_pages`: a k-means++ seeding sample spread over the file would
    otherwise map all of it within one release period). Reading a released page maps it back from the page cache,
    without disk I/O when memory is available; the data is read-only, so nothing is lost."""
    if not any(getattr(a, "_mmap", None) is not None for a in source.values()):
        yield
        return
    _release_pages(source)  # the pages of the value scan
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(PAGE_RELEASE_S):
            _release_pages(source)

    thread = threading.Thread(target=loop, name="release-pages", daemon=True)
    thread.start()
    try:
        with releasing_pages(lambda: _release_pages(source)):  # scattered reads (seeding samples) release too
            yield
    finally:
        stop.set()
        thread.join()
        _release_pages(source)


METRICS_READ_ROWS = 8192  # metrics-sample rows read (and their pages released) at a time


def _sample_rows(source: dict[str, np.ndarray], sample: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """:func:`_rows` of the metrics sample, read in blocks of :data:`METRICS_READ_ROWS` rows, releasing a memory
    map's pages after each block (the sample touches most pages of the file)."""
    parts = []
    for start in range(0, len(sample), METRICS_READ_ROWS):
        parts.append(_rows(source, sample[start:start + METRICS_READ_ROWS].numpy()))
        _release_pages(source)
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}  # type: ignore[index]


def _quality_metrics(quantizer: Quantizer, source: dict[str, np.ndarray], codes: torch.Tensor,
                     config: QuantizeConfig) -> dict[str, Any]:
    """:func:`~torchrec_sid.quantizers.metrics.quality_report` on the seeded metrics sample; usage, balance and
    collisions of the whole catalogue's ``codes: [N, levels]`` (they need no embeddings)."""
    num_items = len(codes)
    sample = _metrics_sample(num_items, config.metrics_sample, config.seed)
    metrics = quality_report(quantizer, _sample_rows(source, sample), codes=codes[sample])
    metrics.update(num_items=num_items, metrics_rows=len(sample),
                   utilization=utilization(codes, quantizer.cardinalities),
                   **code_balance(codes, quantizer.cardinalities), **collisions(codes))
    return metrics


def _write_quality_scalars(writer: SummaryWriter, name: str, metrics: dict[str, Any]) -> None:
    """The quality metrics as TensorBoard scalars ``<name>/quality/<metric>`` (one per level:
    ``<name>/quality/<metric>/level_<l>``), at step 0."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, list)):
            continue
        if isinstance(value, list):
            for level, v in enumerate(value):
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"{name}/quality/{key}/level_{level}", v, 0)
        else:
            writer.add_scalar(f"{name}/quality/{key}", value, 0)


def _block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def _gather_codes(codes: torch.Tensor) -> torch.Tensor:
    """All ranks' codes in rank order (blocks are contiguous, so this is item order)."""
    if not is_distributed():
        return codes
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, codes)
    return torch.cat([p for p in parts if p is not None])


def run(config: QuantizeConfig) -> SemanticIds | None:
    """Fits, encodes and writes the artifacts; returns the ``SemanticIds`` on rank 0 (None on other ranks)."""
    _check_outputs(config)
    quantizer = build_quantizer(config.method, **config.quantizer)
    quantizer.check_params()  # bad settings fail before any data loads
    if len(config.signals) > 1 and set(config.signals) != set(quantizer.signal_names):
        reads = "one signal" if len(quantizer.signal_names) == 1 else f"the signals {quantizer.signal_names}"
        raise ValueError(f"signals {list(config.signals)}: {config.method} reads {reads}; multi-signal "
                         f"quantizers are the neural ones (rq_vae, fsq, dpca, mmq) with their own `signals` setting")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = embedding_source(config, progress=rank == 0)
    num_items = len(next(iter(source.values())))
    start, stop = _block(num_items, rank, world_size)
    x = _fit_rows(source, slice(start, stop))
    logger.info("rank %d: fitting %s on items [%d rows of %d, dims %s]", rank, config.method, stop - start,
                num_items, {name: s.shape[1] for name, s in source.items()})
    writer = SummaryWriter(config.tensorboard) if config.tensorboard and rank == 0 else None
    try:
        with _pages_released(source):
            quantizer.fit(x, progress=rank == 0, writer=writer)
            codes = _gather_codes(quantizer.encode(x))
        del x
        if rank != 0:
            return None
        metrics = _quality_metrics(quantizer, source, codes, config)
        if writer is not None:
            _write_quality_scalars(writer, quantizer.name, metrics)
    finally:
        if writer is not None:
            writer.close()
    sids = SemanticIds(codes, quantizer.cardinalities, quantizer.name,
                       {**quantizer.get_params(), "data": config.data, "signals": list(config.signals)},
                       metrics, digit_centres=quantizer.digit_centres)
    if config.collision_suffix:
        sids = sids.with_collision_suffix()
    sids = publish(sids, quantizer, config.out)
    logger.info("wrote %s and %s", config.out, config.quantizer_path)
    return sids


def publish(sids: SemanticIds, quantizer: Quantizer, out: str | Path) -> SemanticIds:
    """Writes the SID table to ``out`` and its quantizer beside it as one pair; returns the table as written.

    Both files are staged first and renamed into place only when both are complete, so a failed write (a full
    disk) leaves the previous pair as it was. The table records the quantizer file's SHA-256
    (``config["quantizer_sha256"]``), so even a crash between the two renames cannot pass unnoticed:
    :func:`load_pair` refuses a table beside a quantizer it does not record.
    """
    with published_together(quantizer_path(out), out) as (staged_quantizer, staged_sids):
        quantizer.save(staged_quantizer)
        sids = replace(sids, config={**sids.config, "quantizer_sha256": sha256_file(staged_quantizer)})
        sids.save(staged_sids)
    return sids


def load_pair(out: str | Path) -> tuple[SemanticIds, Quantizer]:
    """The SID table ``out`` and the quantizer beside it, after checking that the table records that quantizer
    (:class:`~torchrec_sid.io.ChecksumError` otherwise: the two were not published together).

    Example::

        sids, quantizer = load_pair("outputs/sids.safetensors")
        quantizer.decode(sids.codes[:, :len(quantizer.cardinalities)])  # [N, D] (without the suffix level)
    """
    sids = SemanticIds.load(out)
    check_recorded_sha256(quantizer_path(out), sids.config.get("quantizer_sha256"), f"the SID table {out}")
    return sids, Quantizer.load(quantizer_path(out))


def _check_outputs(config: QuantizeConfig) -> None:
    """Refuses, before any work, outputs that would overwrite the input or each other."""
    out, quantizer_file = Path(config.out).resolve(), config.quantizer_path.resolve()
    if config.data.endswith(".npy") and Path(config.data).resolve() in (out, quantizer_file):
        raise ValueError(f"out: {config.out} would overwrite the input embeddings --data {config.data}; "
                         f"choose another --out (it also writes {config.quantizer_path.name})")
    if not out.name.endswith(".safetensors"):
        raise ValueError(f"out: {config.out} must end in .safetensors (the quantizer goes beside it as "
                         f"<stem>.quantizer.safetensors)")
    for path in (out, quantizer_file):
        if path.is_dir():
            raise ValueError(f"out: {path} is a folder; --out names the SemanticIds file to write, e.g. "
                             f"{Path(config.out) / 'sids.safetensors'}")
    folder = next((p for p in out.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"out: cannot write {config.out}: {folder} is a file, not a folder")


def _metrics_sample(n: int, size: int, seed: int) -> torch.Tensor:
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
