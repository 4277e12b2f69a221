"""Files the library writes: the cache folder, atomic writes, checksums and the safetensors artifact format.

Every artifact (data caches, embeddings, SID tables, checkpoints) is written to a temporary file in the target's
folder and renamed into place, so a reader never sees half a file; its SHA-256 is recorded and checked on load.

SID tables and quantizers are one safetensors file each (:func:`save_artifact`). The tensors are the fitted
parameters (or the codes); the safetensors ``__metadata__`` header holds ``kind``, ``format_version``, ``meta``
(canonical JSON: name, config, history, metrics...) and ``sha256`` over the header fields and every tensor's name,
dtype, shape and bytes. Loading refuses a truncated or modified file (:class:`ChecksumError`) or another format
version (``ValueError``), naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CACHE_ENV = "TORCHREC_SID_CACHE"
FORMAT_VERSION = 1  # of every safetensors artifact (SID tables, quantizers)


class ChecksumError(ValueError):
    """A file's content does not match the checksum recorded for it."""


class CacheError(OSError):
    """The cache folder cannot be used (a file in its place, a read-only or full file system); the message names
    ``$TORCHREC_SID_CACHE`` and the way out."""


def cache_dir(*parts: str) -> Path:
    """The library's cache folder (``$TORCHREC_SID_CACHE`` or ``~/.cache/torchrec_sid``), created on demand.

    Raises :class:`CacheError` naming the variable when the folder cannot be created.
    """
    from_env = os.environ.get(CACHE_ENV)
    root = Path(from_env or Path.home() / ".cache" / "torchrec_sid")
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(_cache_problem(root, path, e, from_env is not None)) from e
    return path


def _cache_problem(root: Path, path: Path, error: OSError, from_env: bool) -> str:
    where = f"${CACHE_ENV}={root}" if from_env else f"the cache folder {root} (${CACHE_ENV} is not set)"
    blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None or isinstance(error, (NotADirectoryError, FileExistsError)):
        what = "is a file" if blocker == root else f"is inside the file {blocker}" if blocker else "is not a folder"
        return f"{where} {what}, not a folder; set ${CACHE_ENV} to a folder (it is created if missing)"
    return (f"{where}: cannot create {path} ({error.strerror or error}); set ${CACHE_ENV} to a writable folder "
            f"(a read-only cache works only once it holds every file)")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LockedError(RuntimeError):
    """Another process holds the lock of an output folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (``<folder>/.lock``, created with the folder) while the block runs.

    A second process that asks for the same folder fails at once with :class:`LockedError` naming the holder's
    pid, instead of racing it for the same files. The lock is released when the block ends or the process dies.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockedError(f"{folder} is in use by another {what} (pid {holder}); give this one another --out, "
                              f"or wait for that one to end") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield folder
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def published_together(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yields one staging path per target (a hidden file in the target's folder): write each file to its staging
    path inside the block. When the block ends, the staged files are renamed onto their targets in order; if the
    block raises (a full disk, a failed write) nothing is renamed and every staged file is removed, so the targets
    keep their previous contents together.

    Only the renames, back to back, are not one atomic step: a crash between two of them leaves the earlier targets
    new and the later ones old. Write last a file that records the others' SHA-256 (as the SID table records its
    quantizer's), so a reader can tell (:func:`check_recorded_sha256`).

    Example::

        with published_together("q.safetensors", "sids.safetensors") as (q_tmp, sids_tmp):
            quantizer.save(q_tmp)
            sids.save(sids_tmp)   # raises: neither file is replaced
    """
    paths = [Path(t) for t in targets]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    staged = [path.with_name(f".{path.name}.{os.getpid()}.staged") for path in paths]
    try:
        yield staged
        for tmp, path in zip(staged, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def check_recorded_sha256(path: str | os.PathLike, recorded: str | None, what: str) -> None:
    """Raises :class:`ChecksumError` when ``path`` is not the file whose SHA-256 ``recorded`` names (``what`` says
    who recorded it); ``recorded`` None (a file written before digests were recorded) checks nothing."""
    if recorded is None:
        return
    actual = sha256_file(path)
    if actual != recorded:
        raise ChecksumError(f"{path} is not the file {what} records (sha256 {actual[:12]}..., recorded "
                            f"{recorded[:12]}...): the two were not published together")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> None:
    """Raises :class:`ChecksumError` naming ``what`` when ``path`` is missing or its SHA-256 is not ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise ChecksumError(f"{what}: {path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{what}: {path} is corrupt or truncated (sha256 {actual[:12]}..., expected {expected[:12]}...)"
        )


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

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, tmp, metadata=header)
        except SafetensorError as e:  # safetensors reports a full disk or an I/O error as its own exception
            raise OSError(f"cannot write {path}: {e}") from e

    return atomic_write(path, write)


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
