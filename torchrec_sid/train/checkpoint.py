"""Checkpoints of a sharded model: torch.distributed.checkpoint (DCP) for the sharded state, written atomically.

A checkpoint is a folder ``<root>/step_<N>/`` holding the DCP files (each rank writes its shards), one
``rank<r>.pt`` per rank (RNG states and progress, which differ per rank) and ``manifest.json`` with the SHA-256 of
every file. Everything is first written to ``step_<N>.tmp/``; rank 0 writes the manifest and renames the folder,
so a folder without the ``.tmp`` suffix is always complete. :func:`load` verifies every checksum before it reads.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torchrec_sid._dist import is_distributed
from torchrec_sid.io import ChecksumError, atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def _rank_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(root: str | Path, step: int, state: dict[str, Any], progress: dict[str, Any]) -> Path:
    """Writes ``state`` (model / optimizer state dicts, possibly sharded) and this rank's ``progress`` + RNG.

    Every rank must call it. Returns the checkpoint folder.
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
        atomic_write_json(tmp / MANIFEST, {str(p.relative_to(tmp)): sha256_file(p) for p in files})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier()
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None when there is none)."""
    folders = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def verify(folder: str | Path) -> None:
    """Raises :class:`ChecksumError` naming the file when any file of the checkpoint is missing or altered."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ChecksumError(f"{folder} is not a complete checkpoint: {MANIFEST} is missing")
    for name, digest in json.loads(manifest.read_text()).items():
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"checkpoint {folder}: {name} is missing")
        if sha256_file(path) != digest:
            raise ChecksumError(f"checkpoint {folder}: {name} is corrupt or truncated (SHA-256 mismatch)")


def load(folder: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Verifies ``folder``, reads it into ``state`` in place (DCP), restores this rank's RNG; returns its progress."""
    folder = Path(folder)
    verify(folder)
    rank, world_size = _rank_world()
    extra = torch.load(folder / f"rank{rank}.pt", weights_only=False)
    if extra["world_size"] != world_size:
        raise ValueError(f"checkpoint {folder} was written by {extra['world_size']} processes, this run has "
                         f"{world_size}: resume with the same number of processes")
    dcp.load(state, checkpoint_id=str(folder))
    set_rng_state(extra["rng"])
    return extra["progress"]
