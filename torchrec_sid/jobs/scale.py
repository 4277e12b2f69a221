"""Quantizers out of memory's way: fit on a seeded sample of a memory-mapped ``[N, D]`` array, encode it in one
streaming pass.

The residual quantizers' memory grows with the rows they fit on (the rows, their residuals, the assignment
distances), so at 10^7+ items a full fit does not fit a small machine. The codebooks need far fewer rows than the
catalogue: :func:`fit_sampled` fits on a seeded uniform sample (read from the memory map in sorted row order), and
:func:`encode_streaming` encodes every row in chunks, releasing the map's pages after each, so peak memory is the
sample, one chunk and the codes ``[N, levels]``. This works for every quantizer (sampled fitting); RQ-KMeans and
RQ-GMM need no change inside them.

Example::

    x = open_embeddings("content.npy")                          # np.memmap [N, D] float32, checked
    q = fit_sampled(build_quantizer("rq_kmeans", levels=3, codebook_size=256), x, sample_rows=200_000, seed=0)
    codes = encode_streaming(q, x)                              # LongTensor [N, 3]
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchrec_sid.io import atomic_write
from torchrec_sid.quantizers.base import Quantizer

ENCODE_CHUNK_ROWS = 1 << 16


def open_embeddings(path: str | os.PathLike, dim: int | None = None, what: str = "--data") -> np.ndarray:
    """The ``.npy`` file ``path`` memory-mapped read-only: ``[N, D]`` floating point (float16/32/64), ``D == dim``
    when given. ValueError naming ``what``, the file and the field (``dtype``, ``shape``) otherwise; the values are
    not scanned (see :func:`check_finite_chunks`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except ValueError as e:
        raise ValueError(f"{what} {path} is not a .npy array file ({e})") from e
    if dtype.hasobject or dtype.kind != "f":
        raise ValueError(f"{what} {path}: field dtype is {dtype}; expected floating point embeddings (float32, "
                         f"float16 or float64)")
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{what} {path}: field shape is {list(shape)}; expected [N >= 1, D >= 1]")
    if dim is not None and shape[1] != dim:
        raise ValueError(f"{what} {path}: field shape is {list(shape)}; expected [N, {dim}] (the quantizer was "
                         f"fitted on {dim}-d embeddings)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # e.g. the file is shorter than its header says
        raise ValueError(f"{what} {path}: field shape {list(shape)} does not match the file size "
                         f"({path.stat().st_size} bytes): truncated? ({e})") from e


def check_finite_chunks(x: Tensor, path: str | os.PathLike, first_row: int) -> Tensor:
    """``x`` (rows ``first_row ..`` of ``path``) unless it holds NaN / inf, then ValueError naming the row."""
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):
        row = first_row + int((~finite).nonzero()[0])
        raise ValueError(f"--data {path}: row {row} holds NaN or inf ({int((~finite).sum())} such rows here)")
    return x


def release_pages(array: np.ndarray) -> None:
    """Drops this process's resident pages of a memory map (they stay in the page cache)."""
    base: object = array
    while isinstance(base, np.ndarray) and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = base.base
    mapping = getattr(base, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def read_rows(array: np.ndarray, rows: np.ndarray | slice, path: str | os.PathLike = "--data") -> Tensor:
    """Rows of a memory map as a float32 tensor (a copy: the map stays read-only), checked finite."""
    block = np.ascontiguousarray(array[rows], dtype=np.float32)
    first = (rows.start or 0) if isinstance(rows, slice) else (int(rows[0]) if len(rows) else 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return check_finite_chunks(torch.from_numpy(block), path, first)


def sample_index(num_rows: int, sample_rows: int, seed: int) -> np.ndarray:
    """``min(sample_rows, num_rows)`` distinct rows, seeded, sorted (sequential reads of the map)."""
    if sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1, got {sample_rows}")
    if sample_rows >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=sample_rows, replace=False))


def fit_sampled(quantizer: Quantizer, array: np.ndarray, sample_rows: int, seed: int = 0,
                path: str | os.PathLike = "--data", progress: bool = False) -> Quantizer:
    """Fits ``quantizer`` on a seeded sample of ``sample_rows`` rows of ``array: [N, D]`` (all rows when N is
    smaller); returns it."""
    index = sample_index(len(array), sample_rows, seed)
    x = read_rows(array, index, path)
    release_pages(array)
    return quantizer.fit(x, progress=progress)


def quantizer_dim(quantizer: Quantizer) -> int | None:
    """The embedding width a fitted single-signal quantizer reads (its decode's width); None for several signals."""
    if len(quantizer.signal_names) != 1:
        return None
    codes = torch.zeros(1, len(quantizer.cardinalities), dtype=torch.long)
    return int(quantizer.decode(codes).shape[-1])


def encode_streaming(quantizer: Quantizer, array: np.ndarray, chunk_rows: int = ENCODE_CHUNK_ROWS,
                     path: str | os.PathLike = "--data",
                     on_chunk: Callable[[int, float], None] | None = None) -> Tensor:
    """Codes ``LongTensor[N, levels]`` of every row of ``array: [N, D]``, ``chunk_rows`` rows at a time (the map's
    pages released after each chunk); ``on_chunk(rows done, seconds)`` reports progress."""
    n = len(array)
    codes: Tensor | None = None
    start_time = time.perf_counter()
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        chunk = quantizer.encode(read_rows(array, slice(start, stop), path))
        if codes is None:
            codes = torch.empty(n, chunk.shape[1], dtype=torch.long)
        codes[start:stop] = chunk
        release_pages(array)
        if on_chunk is not None:
            on_chunk(stop, time.perf_counter() - start_time)
    assert codes is not None
    return codes


def write_embeddings(path: str | os.PathLike, num_rows: int, dim: int, rows: Callable[[int, int], np.ndarray],
                     chunk_rows: int = 1 << 18) -> Path:
    """Writes a ``.npy`` file ``[num_rows, dim]`` float32 chunk by chunk (``rows(start, stop) -> [stop - start,
    dim]``), atomically, without holding the array in memory."""
    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_rows, dim))
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            out[start:stop] = rows(start, stop)
            out.flush()
            release_pages(out)
        del out

    return atomic_write(path, write)
