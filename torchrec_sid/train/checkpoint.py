"""Checkpoints of a sharded model: torch.distributed.checkpoint (DCP) for the sharded state, written atomically.

A checkpoint is a folder ``<root>/step_<N>/`` holding the DCP files (each rank writes its shards), one
``rank<r>.pt`` per rank (RNG states and progress, which differ per rank) and ``manifest.json`` with the SHA-256 of
every file and the run's *identity* (config hash, data fingerprint, world size). Everything is first written to
``step_<N>.tmp/``; rank 0 writes the manifest and renames the folder, so a folder without the ``.tmp`` suffix is
always complete. :func:`load` verifies every checksum and the identity before it reads, and reads no pickle that
could run code: ``rank<r>.pt`` with ``weights_only=True``, and DCP's pickled ``.metadata`` only after a restricted
unpickler has checked that it names nothing but DCP's own metadata types.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torchrec_sid._dist import is_distributed
from torchrec_sid.io import ChecksumError, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _rank_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class IdentityMismatch(ValueError):
    """A checkpoint was written by a run with another config, data or world size."""


def rng_state() -> dict[str, Any]:
    """Torch, numpy and Python RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = cast(tuple[Any, ...], np.random.get_state())
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": list(random.getstate())}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(root: str | Path, step: int, state: dict[str, Any], progress: dict[str, Any],
         identity: dict[str, Any] | None = None) -> Path:
    """Writes ``state`` (model / optimizer state dicts, possibly sharded) and this rank's ``progress`` + RNG.

    ``identity`` (JSON values: config hash, data fingerprint, ...) is recorded with the world size; :func:`load`
    compares it. Every rank must call it. Returns the checkpoint folder.
    """
    rank, world_size = _rank_world()
    final = Path(root) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"progress": progress, "rng": rng_state(), "world_size": world_size}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / MANIFEST, {"identity": {**(identity or {}), "world_size": world_size},
                                           "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files}})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier()
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None when there is none)."""
    folders = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def verify(folder: str | Path) -> dict[str, Any]:
    """Raises :class:`ChecksumError` naming the file when any file of the checkpoint is missing or altered, or when
    its DCP metadata holds anything but DCP's own types; returns the recorded identity."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ChecksumError(f"{folder} is not a complete checkpoint: {MANIFEST} is missing")
    recorded = json.loads(manifest.read_text())
    if not isinstance(recorded, dict) or set(recorded) != {"identity", "files"}:
        raise ChecksumError(f"checkpoint {folder}: {MANIFEST} is not a manifest of this library's format")
    for name, digest in recorded["files"].items():
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"checkpoint {folder}: {name} is missing")
        if sha256_file(path) != digest:
            raise ChecksumError(f"checkpoint {folder}: {name} is corrupt or truncated (SHA-256 mismatch)")
    _check_metadata_pickle(folder / ".metadata")
    return dict(recorded["identity"])


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what DCP's ``.metadata`` is made of; anything else (``os.system``...) is refused."""

    SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
            ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.SAFE_MODULES) or (module, name) in self.SAFE or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _check_metadata_pickle(path: Path) -> None:
    if not path.is_file():
        raise ChecksumError(f"checkpoint {path.parent}: {path.name} is missing")
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ChecksumError(f"checkpoint {path.parent}: {path.name} is refused, it is not DCP metadata ({e})") from e


def load(folder: str | Path, state: dict[str, Any], identity: dict[str, Any] | None = None,
         allow_mismatch: bool = False) -> dict[str, Any]:
    """Verifies ``folder`` and that it was written by a run of this ``identity`` and world size, reads it into
    ``state`` in place (DCP), restores this rank's RNG; returns its progress.

    Raises :class:`IdentityMismatch` naming the fields that differ, unless ``allow_mismatch`` (then it warns).
    """
    folder = Path(folder)
    recorded = verify(folder)
    identity = identity or {}
    rank, world_size = _rank_world()
    if recorded.get("world_size") != world_size:
        raise IdentityMismatch(f"checkpoint {folder} was written by {recorded.get('world_size')} processes, this run "
                               f"has {world_size}: resume with the same number of processes")
    differ = sorted(k for k in {*identity, *recorded} - {"world_size"} if identity.get(k) != recorded.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {recorded.get(k)!r}, this run {identity.get(k)!r}" for k in differ)
        if not allow_mismatch:
            raise IdentityMismatch(f"checkpoint {folder} belongs to another run ({detail}); resuming would mix "
                                   f"them. Use a new --out, or --resume-anyway to continue regardless")
        logger.warning("resuming %s although it belongs to another run (%s)", folder, detail)
    try:
        extra = torch.load(folder / f"rank{rank}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ChecksumError(f"checkpoint {folder}: rank{rank}.pt is refused, it holds more than tensors and plain "
                            f"values ({str(e).splitlines()[0]})") from e
    dcp.load(state, checkpoint_id=str(folder))
    set_rng_state(extra["rng"])
    return dict(extra["progress"])
