"""Versioned SID tables for a living catalogue: a folder of versions, each a full table or a delta on its parent.

A :class:`SidStore` is a folder::

    versions.json            the index: every version's file, SHA-256, parent and kind, and the latest version
    v000001.safetensors      version 1: a full table (item ids [N], codes [N, levels]), kind "base"
    v000002.safetensors      version 2: a delta on version 1, only the new items, kind "delta"
    v000003.safetensors      version 3: a re-fit, a full table again, kind "refit"
    quantizer.safetensors    the frozen quantizer that encodes new items (copied in by :meth:`SidStore.create`)

Every file is written atomically (:func:`~torchrec_sid.io.save_artifact`) and the index last, so a reader sees the
previous version or the new one, never half of one. A delta records its parent's SHA-256: a delta published on
another parent, or a parent changed after it, is refused by name. Existing items keep their SIDs bit-identical
across a delta; a new item whose code collides with existing items gets the next free collision suffix, within the
suffix capacity fixed by version 1 (token tables are sized by it, so a running model needs no rebuild).

A re-fit is a new full version plus a :class:`StabilityReport` (:func:`compare`): the share of items whose SID
changed at each prefix length, and the prefix remap old -> new where one exists.

Example::

    store = SidStore("sids/")
    store.create(sids, quantizer_file="sids.quantizer.safetensors", suffix_capacity=8)   # version 1
    store.add_items(new_ids, quantizer.encode(new_content), parent=1)                     # version 2
    store.codes_of(torch.tensor([0, new_ids[0]]))  # [2, levels]; -1 rows for items no version holds
    compare(store.table(1), store.table(2)).table()
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchrec_sid.io import (
    ChecksumError,
    atomic_write,
    atomic_write_json,
    folder_lock,
    load_artifact,
    save_artifact,
    sha256_file,
)
from torchrec_sid.sid.codes import check_codes
from torchrec_sid.sid.features import lookup_sorted
from torchrec_sid.sid.packing import MAX_PACKED
from torchrec_sid.sid.semantic_ids import SemanticIds

VERSION_KIND = "sid_version"
INDEX_FILE = "versions.json"
QUANTIZER_FILE = "quantizer.safetensors"
INDEX_FORMAT = 1


def _copy_file(source: str | os.PathLike, target: Path) -> None:
    """Copies ``source`` onto ``target`` atomically."""
    data = Path(source).read_bytes()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(target, write)


class SidVersionError(ValueError):
    """A version that does not exist, a delta on the wrong parent, or a file that does not fit its index."""


@dataclass(frozen=True, eq=False)
class SidTable:
    """One resolved version of a SID table: the codes of every item it holds.

    Args:
        version: the version number (0 for a table that belongs to no store).
        item_ids: ``LongTensor[N]``, sorted and distinct catalogue ids.
        codes: ``LongTensor[N, levels]``, row i = the item ``item_ids[i]``.
        cardinalities, quantizer, config, suffix_level, digit_centres: as :class:`SemanticIds`.
    """

    version: int
    item_ids: Tensor
    codes: Tensor
    cardinalities: list[int]
    quantizer: str
    config: dict[str, Any] = field(default_factory=dict)
    suffix_level: int | None = None
    digit_centres: list[float] | None = None

    @property
    def num_items(self) -> int:
        return self.item_ids.numel()

    @property
    def num_levels(self) -> int:
        return len(self.cardinalities)

    @property
    def code_levels(self) -> int:
        """Levels before the collision suffix (all levels without one)."""
        return self.num_levels if self.suffix_level is None else self.suffix_level

    def codes_of(self, item_ids: Tensor | np.ndarray) -> Tensor:
        """``item_ids: [n]`` -> codes ``LongTensor[n, levels]``, ``-1`` rows for items this version does not hold."""
        return lookup_sorted(item_ids, self.item_ids, self.codes)

    def semantic_ids(self) -> SemanticIds:
        """The table as a :class:`SemanticIds` (row i = the item ``item_ids[i]``; the cardinalities, suffix capacity
        included, are what token tables are sized by)."""
        return SemanticIds(self.codes, list(self.cardinalities), self.quantizer, dict(self.config),
                           digit_centres=self.digit_centres, suffix_level=self.suffix_level)

    @classmethod
    def from_semantic_ids(cls, sids: SemanticIds, item_ids: Tensor | None = None, version: int = 0) -> SidTable:
        """The table of ``sids``, item ``item_ids[i]`` (None: ``i``) on row i."""
        ids = torch.arange(sids.num_items) if item_ids is None else _distinct_ids(item_ids, "item_ids")
        if ids.numel() != sids.num_items:
            raise ValueError(f"item_ids has {ids.numel()} ids for {sids.num_items} SIDs")
        order = ids.argsort()
        return cls(version, ids[order].contiguous(), sids.codes[order].contiguous(), list(sids.cardinalities),
                   sids.quantizer, dict(sids.config), sids.suffix_level, sids.digit_centres)


def _distinct_ids(item_ids: Tensor | np.ndarray, what: str) -> Tensor:
    """``item_ids`` as int64 ``[n]``; ValueError naming ``what`` on another shape or dtype, or a repeated id."""
    ids = torch.as_tensor(np.asarray(item_ids) if isinstance(item_ids, np.ndarray) else item_ids)
    if ids.ndim != 1:
        raise ValueError(f"{what}: expected item ids [n], got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer item ids, got {ids.dtype}")
    ids = ids.long()
    sorted_ids = ids.sort().values
    same = (sorted_ids[1:] == sorted_ids[:-1]).nonzero().flatten()
    if len(same):
        raise ValueError(f"{what}: item id {int(sorted_ids[int(same[0])])} is given twice")
    return ids


def _group_keys(codes: Tensor, cardinalities: list[int]) -> Tensor:
    """One int64 key per row of ``codes: [N, L]``, equal iff the rows are equal (packed when it fits int64)."""
    if math.prod(cardinalities) - 1 <= MAX_PACKED:
        weights = torch.tensor([math.prod(cardinalities[:k]) for k in range(len(cardinalities))])
        return (codes.long() * weights).sum(1)
    return torch.unique(codes, dim=0, return_inverse=True)[1]


def next_free_suffixes(parent: SidTable, new_codes: Tensor, what: str) -> Tensor:
    """The collision suffix ``[n]`` of each new item with codes ``new_codes: [n, code_levels]``: one past the largest
    suffix of the existing items that share its code, then in item order among the new items; SidVersionError
    when that reaches the suffix capacity (the suffix level's cardinality)."""
    levels = parent.code_levels
    assert parent.suffix_level is not None
    capacity = parent.cardinalities[parent.suffix_level]
    keys = _group_keys(torch.cat([parent.codes[:, :levels], new_codes]), parent.cardinalities[:levels])
    groups, inverse = torch.unique(keys, return_inverse=True)
    old, new = inverse[:parent.num_items], inverse[parent.num_items:]
    next_free = torch.zeros(len(groups), dtype=torch.long)
    next_free.scatter_reduce_(0, old, parent.codes[:, levels] + 1, "amax")
    order = torch.sort(new, stable=True)
    rank = torch.empty_like(new)
    rank[order.indices] = torch.arange(len(new)) - torch.searchsorted(order.values, order.values)
    suffix = next_free[new] + rank
    full = (suffix >= capacity).nonzero().flatten()
    if len(full):
        i = int(full[0])
        raise SidVersionError(f"{what}: new item {i} has code {new_codes[i].tolist()}, which {int(suffix[i])} items "
                              f"already hold; the collision suffix capacity is {capacity} ({len(full)} new items "
                              f"over it). Publish a re-fit with a larger suffix capacity")
    return suffix


@dataclass(frozen=True)
class StabilityReport:
    """How a new version's SIDs differ from an old one's, over the items both hold.

    Args:
        old_version, new_version: the versions compared.
        common_items, added_items, removed_items: items in both / only the new / only the old version.
        prefix: per prefix length p (1 .. the code levels both share): ``changed_share`` (items whose first p levels
            differ), ``bijective`` (old p-prefixes map one-to-one onto new ones, so embedding rows keyed by the old
            prefix can be moved), ``mapped_share`` (items whose new prefix is the most common image of their old one).
        full_changed_share: items whose whole SID (every level, the suffix included) differs.
        remaps: prefix length -> ``LongTensor[M, 2]`` of (old packed prefix, new packed prefix) pairs, for each
            bijective prefix length.
    """

    old_version: int
    new_version: int
    common_items: int
    added_items: int
    removed_items: int
    prefix: list[dict[str, Any]]
    full_changed_share: float
    remaps: dict[int, Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the figures and each remap as ``[[old, new], ...]``."""
        return {"old_version": self.old_version, "new_version": self.new_version, "common_items": self.common_items,
                "added_items": self.added_items, "removed_items": self.removed_items, "prefix": self.prefix,
                "full_changed_share": self.full_changed_share,
                "remaps": {str(p): pairs.tolist() for p, pairs in self.remaps.items()}}

    def table(self) -> str:
        """A plain-text table, one row per prefix length."""
        lines = [f"SID stability, version {self.old_version} -> {self.new_version}: {self.common_items:,} items in "
                 f"both, {self.added_items:,} added, {self.removed_items:,} removed",
                 f"{'prefix':>6}  {'changed':>8}  {'mapped':>8}  remap"]
        for row in self.prefix:
            remap = f"yes ({len(self.remaps[row['length']]):,} pairs)" if row["bijective"] else "no"
            lines.append(f"{row['length']:>6}  {row['changed_share']:>8.2%}  {row['mapped_share']:>8.2%}  {remap}")
        lines.append(f"{'full':>6}  {self.full_changed_share:>8.2%}")
        return "\n".join(lines)


def compare(old: SidTable, new: SidTable) -> StabilityReport:
    """The :class:`StabilityReport` of ``new`` against ``old`` (see there)."""
    common = torch.from_numpy(np.intersect1d(old.item_ids.numpy(), new.item_ids.numpy()))
    a, b = old.codes_of(common), new.codes_of(common)
    prefix, remaps = [], {}
    n = max(len(common), 1)
    for p in range(1, min(old.code_levels, new.code_levels) + 1):
        ka, kb = _group_keys(a[:, :p], old.cardinalities[:p]), _group_keys(b[:, :p], new.cardinalities[:p])
        pairs, counts = torch.unique(torch.stack([ka, kb], 1), dim=0, return_counts=True)
        olds, images = torch.unique(pairs[:, 0], return_counts=True)
        news = torch.unique(pairs[:, 1])
        bijective = len(common) > 0 and bool((images == 1).all()) and len(news) == len(olds)
        best = torch.zeros(len(olds), dtype=torch.long).scatter_reduce_(
            0, torch.searchsorted(olds, pairs[:, 0].contiguous()), counts, "amax")
        prefix.append({"length": p, "changed_share": float((a[:, :p] != b[:, :p]).any(1).sum()) / n,
                       "bijective": bijective, "mapped_share": float(best.sum()) / n})
        if bijective:
            remaps[p] = pairs
    full = float((a != b).any(1).sum()) / n if a.shape[1] == b.shape[1] else 1.0
    return StabilityReport(old.version, new.version, len(common), new.num_items - len(common),
                           old.num_items - len(common), prefix, full if len(common) else 0.0, remaps)


class SidStore:
    """A folder of SID table versions (module docstring): publishes versions and reads them by number.

    Reading is cheap to repeat: :meth:`codes_of` re-reads the index only when its file changed, and resolved
    versions are cached, so a data pipeline can call it every batch and picks up a new version at the next batch.

    Args:
        folder: the store's folder (created by :meth:`create`).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._tables: dict[int, SidTable] = {}
        self._index: dict[str, Any] | None = None
        self._index_stat: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------------------------------------ reading

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILE

    @property
    def quantizer_path(self) -> Path:
        return self.folder / QUANTIZER_FILE

    def _read_index(self) -> dict[str, Any]:
        path = self.index_path
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise SidVersionError(f"{self.folder} is not a SID store: {path} is missing (create it with "
                                  f"SidStore.create or `torchrec-sid quantize publish`)") from None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._index is None or key != self._index_stat:
            try:
                index = json.loads(path.read_text())
                index["versions"] = {int(v): entry for v, entry in index["versions"].items()}
                int(index["latest"])
            except (ValueError, KeyError, TypeError) as e:
                raise SidVersionError(f"{path} is not a SID store index ({e})") from e
            self._index, self._index_stat = index, key
        assert self._index is not None
        return self._index

    def versions(self) -> list[int]:
        """The published versions, oldest first (empty before :meth:`create`)."""
        return sorted(self._read_index()["versions"]) if self.index_path.exists() else []

    def latest(self) -> int:
        """The newest version."""
        return int(self._read_index()["latest"])

    def entry(self, version: int) -> dict[str, Any]:
        """The index entry of ``version``: file, sha256, parent, kind, items."""
        index = self._read_index()
        if version not in index["versions"]:
            have = sorted(index["versions"])
            raise SidVersionError(f"version {version} does not exist in {self.index_path} (versions "
                                  f"{have[0]}..{have[-1]})" if have else f"version {version}: {self.index_path} "
                                  f"lists no version")
        return dict(index["versions"][version])

    def table(self, version: int | None = None) -> SidTable:
        """Version ``version`` (None: the latest), resolved through its deltas; checked against the index."""
        version = self.latest() if version is None else version
        if version in self._tables:
            return self._tables[version]
        entry = self.entry(version)
        path = self.folder / entry["file"]
        what = f"version {version} ({path})"
        if not path.is_file():
            raise SidVersionError(f"{what}: the file is missing")
        if sha256_file(path) != entry["sha256"]:
            raise ChecksumError(f"{what}: sha256 differs from the one {self.index_path} records; the file was "
                                f"changed after it was published")
        tensors, meta = load_artifact(path, VERSION_KIND)
        if meta.get("version") != version:
            raise SidVersionError(f"{what}: field version is {meta.get('version')}, the index says {version}")
        codes = check_codes(tensors["codes"], meta["cardinalities"], what=f"{what}: field codes")
        ids = _distinct_ids(tensors["item_ids"], f"{what}: field item_ids")
        if meta["kind"] == "delta":
            table = self._apply_delta(version, what, meta, ids, codes)
        else:
            table = SidTable.from_semantic_ids(
                SemanticIds(codes, meta["cardinalities"], meta["quantizer"], meta["config"],
                            digit_centres=meta.get("digit_centres"), suffix_level=meta.get("suffix_level")),
                ids, version)
        self._tables[version] = table
        return table

    def _apply_delta(self, version: int, what: str, meta: dict[str, Any], ids: Tensor, codes: Tensor) -> SidTable:
        parent_version = meta["parent"]
        parent_entry = self.entry(parent_version)
        if meta.get("parent_sha256") != parent_entry["sha256"]:
            raise SidVersionError(f"{what}: field parent_sha256 does not match version {parent_version} "
                                  f"({self.folder / parent_entry['file']}): this delta was made on another "
                                  f"version {parent_version}")
        parent = self.table(parent_version)
        if meta["cardinalities"] != parent.cardinalities:
            raise SidVersionError(f"{what}: field cardinalities {meta['cardinalities']} differ from version "
                                  f"{parent_version}'s {parent.cardinalities}")
        known = torch.from_numpy(np.isin(ids.numpy(), parent.item_ids.numpy()))
        if known.any():
            raise SidVersionError(f"{what}: field item_ids: item {int(ids[known][0])} is already in version "
                                  f"{parent_version}; a delta adds new items only")
        all_ids, all_codes = torch.cat([parent.item_ids, ids]), torch.cat([parent.codes, codes])
        if len(ids) and len(parent.item_ids) and not bool(ids[1:].ge(ids[:-1]).all() and ids[0] > parent.item_ids[-1]):
            order = all_ids.argsort()
            all_ids, all_codes = all_ids[order], all_codes[order]
        return replace(parent, version=version, item_ids=all_ids.contiguous(), codes=all_codes.contiguous())

    @property
    def num_levels(self) -> int:
        return self.table().num_levels

    def codes_of(self, item_ids: Tensor | np.ndarray, version: int | None = None) -> Tensor:
        """Codes ``[n, levels]`` of ``item_ids`` in ``version`` (None: the latest, re-read when a new one is
        published); ``-1`` rows for items that version does not hold."""
        return self.table(version).codes_of(item_ids)

    # ------------------------------------------------------------------------------------------------ writing

    def create(self, sids: SemanticIds, item_ids: Tensor | None = None, quantizer_file: str | os.PathLike | None = None,
               suffix_capacity: int | None = None) -> int:
        """Publishes ``sids`` as version 1 (item ``item_ids[i]``, None: ``i``, on row i) and copies the quantizer
        file in; ``suffix_capacity`` raises the collision suffix's cardinality so later deltas have room."""
        if suffix_capacity is not None:
            if sids.suffix_level is None:
                raise ValueError("suffix_capacity is given but the SID table has no collision suffix level")
            current = sids.cardinalities[sids.suffix_level]
            if suffix_capacity < current:
                raise ValueError(f"suffix_capacity = {suffix_capacity} is below the table's suffix cardinality "
                                 f"{current} (the most items sharing one code)")
            sids = replace(sids, cardinalities=[*sids.cardinalities[:-1], suffix_capacity])
        with folder_lock(self.folder, "SID store publisher"):
            if self.index_path.exists():
                raise SidVersionError(f"{self.folder} already holds versions {self.versions()}; publish a re-fit "
                                      f"(publish_refit) or a delta (add_items) instead")
            table = SidTable.from_semantic_ids(sids, item_ids, 1)
            if quantizer_file is not None:
                _copy_file(quantizer_file, self.quantizer_path)
            return self._publish(table, "base", None, {}, table.item_ids, table.codes)

    def add_items(self, item_ids: Tensor | np.ndarray, codes: Tensor, parent: int) -> int:
        """Publishes a delta on ``parent`` (which must be the latest version) adding items ``item_ids: [n]`` with
        codes ``[n, code_levels]`` (the quantizer's levels; the collision suffix is assigned here). Returns the new
        version number."""
        with folder_lock(self.folder, "SID store publisher"):
            latest = self.latest()
            if parent != latest:
                raise SidVersionError(f"delta on version {parent}, but the latest version in {self.index_path} is "
                                      f"{latest}: encode the new items against version {latest}")
            base = self.table(parent)
            what = f"new items for version {latest + 1} of {self.folder}"
            ids = _distinct_ids(item_ids, f"{what}: field item_ids")
            codes = torch.as_tensor(codes)
            if codes.ndim != 2 or codes.shape[1] != base.code_levels or len(codes) != len(ids):
                raise ValueError(f"{what}: field codes must be [{len(ids)}, {base.code_levels}] (one row per item, "
                                 f"the quantizer's levels), got shape {tuple(codes.shape)}")
            codes = check_codes(codes, base.cardinalities[:base.code_levels], what=f"{what}: field codes")
            known = torch.from_numpy(np.isin(ids.numpy(), base.item_ids.numpy()))
            if known.any():
                raise SidVersionError(f"{what}: field item_ids: item {int(ids[known][0])} is already in version "
                                      f"{parent}; existing items keep their SIDs")
            if base.suffix_level is not None:
                codes = torch.cat([codes, next_free_suffixes(base, codes, what)[:, None]], 1)
            entry = self.entry(parent)
            return self._publish(base, "delta", parent, {"parent_sha256": entry["sha256"]}, ids, codes)

    def publish_refit(self, sids: SemanticIds, item_ids: Tensor | None = None,
                      quantizer_file: str | os.PathLike | None = None) -> tuple[int, StabilityReport]:
        """Publishes a re-fit's table as a new full version on the latest one; returns it and the stability report
        against its parent. ``quantizer_file`` (the re-fit quantizer) replaces the store's."""
        with folder_lock(self.folder, "SID store publisher"):
            parent = self.latest()
            table = SidTable.from_semantic_ids(sids, item_ids, parent + 1)
            if quantizer_file is not None:
                _copy_file(quantizer_file, self.quantizer_path)
            version = self._publish(table, "refit", parent, {"parent_sha256": self.entry(parent)["sha256"]},
                                    table.item_ids, table.codes)
        return version, compare(self.table(parent), self.table(version))

    def _publish(self, table: SidTable, kind: str, parent: int | None, extra: dict[str, Any], ids: Tensor,
                 codes: Tensor) -> int:
        """Writes the version file, then the index (both atomic); returns the version number."""
        index: dict[str, Any] = (self._read_index() if self.index_path.exists()
                                 else {"format": INDEX_FORMAT, "latest": 0, "versions": {}})
        version = int(index["latest"]) + 1
        meta = {"version": version, "parent": parent, "kind": kind, "cardinalities": table.cardinalities,
                "quantizer": table.quantizer, "config": table.config, "suffix_level": table.suffix_level,
                "digit_centres": table.digit_centres, **extra}
        if self.quantizer_path.is_file():
            meta["quantizer_sha256"] = sha256_file(self.quantizer_path)
        name = f"v{version:06d}.safetensors"
        path = save_artifact(self.folder / name, VERSION_KIND, {"item_ids": ids.long(), "codes": codes.long()}, meta)
        entries = {str(v): e for v, e in index["versions"].items()}
        entries[str(version)] = {"file": name, "sha256": sha256_file(path), "parent": parent, "kind": kind,
                                 "items": int(len(ids)) + (table.num_items if kind == "delta" else 0),
                                 "new_items": int(len(ids))}
        atomic_write_json(self.index_path, {"format": INDEX_FORMAT, "latest": version, "versions": entries})
        return version
