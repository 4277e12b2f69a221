"""Files the library writes: the cache folder, atomic writes and checksums.

Every artifact (data caches, embeddings, SID tables, checkpoints) is written to a temporary file in the target's
folder and renamed into place, so a reader never sees half a file; its SHA-256 is recorded and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "TORCHREC_SID_CACHE"


class ChecksumError(ValueError):
    """A file's content does not match the checksum recorded for it."""


def cache_dir(*parts: str) -> Path:
    """The library's cache folder (``$TORCHREC_SID_CACHE`` or ``~/.cache/torchrec_sid``), created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "torchrec_sid")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
