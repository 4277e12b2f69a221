"""CTR samples as sharded parquet files, each rank streaming its own files: the large-data path of
:class:`~torchrec_sid.data.batches.CtrBatches` (which holds one in-memory table and stays the small-data path).

:func:`write_shards` materialises a sample set once: one row per sample, one ``list<int64>`` column per sparse
feature of the ``CtrBatches`` batch (in its key order, recorded in the schema metadata), ``dense`` (``list<float>``)
and ``label``; a sample's history is stored with it, so a reader needs no history table. :class:`ParquetCtrBatches`
reads the files of its rank (``files[rank::world_size]``) row group by row group and yields the same ``Batch`` as
``CtrBatches``, with the SID code features of a SID table / store added at read time when asked (the newest
version, so items published after the files were written get their SIDs).

Example::

    files = write_shards(CtrBatches(data, "train", batch_size=4096, max_history=50), "shards/", num_files=8)
    for batch in ParquetCtrBatches(files, batch_size=512, rank=rank, world_size=2, sid_codes=SidStore("sids/")):
        ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch

from torchrec_sid.data.batches import CODE_SOURCES, Column, CtrBatches, code_columns, columns_to_kjt
from torchrec_sid.io import atomic_write
from torchrec_sid.sid.features import CodeSource

SCHEMA_KEY = b"torchrec_sid.sparse_keys"


def _table(batch: Batch) -> pa.Table:
    """One row per example of ``batch``: its sparse features (list columns), dense features and label."""
    kjt = batch.sparse_features
    columns, names = [], []
    for key, jt in kjt.to_dict().items():
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), jt.lengths().long().cumsum(0)]).numpy()
        columns.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(jt.values().numpy())))
        names.append(key)
    dense = batch.dense_features.numpy()
    dense_offsets = np.arange(0, dense.size + 1, dense.shape[1], dtype=np.int32)
    columns += [pa.ListArray.from_arrays(pa.array(dense_offsets), pa.array(dense.reshape(-1))),
                pa.array(batch.labels.numpy())]
    names += ["dense", "label"]
    return pa.Table.from_arrays(columns, names=names).replace_schema_metadata(
        {SCHEMA_KEY: json.dumps(list(kjt.keys())).encode()})


def write_shards(batches: CtrBatches, folder: str | os.PathLike, num_files: int,
                 rows_per_group: int = 1 << 14) -> list[Path]:
    """Writes every sample of ``batches`` (its order, ``batch_size`` rows at a time) into ``num_files`` parquet files
    ``part-00000.parquet ...`` of near-equal size, each atomically; returns their paths."""
    if num_files < 1:
        raise ValueError(f"num_files must be >= 1, got {num_files}")
    if batches.world_size != 1 or batches.sid_codes is not None:
        raise ValueError("write_shards: give the CtrBatches of the whole split (world_size 1) without sid_codes; "
                         "SID codes are added when the shards are read")
    n = len(batches.samples)
    bounds = np.linspace(0, n, num_files + 1).round().astype(int)
    order = np.random.default_rng(batches.seed).permutation(n) if batches.shuffle else np.arange(n)
    paths = []
    for f in range(num_files):
        rows = order[bounds[f]:bounds[f + 1]]

        def write(tmp: Path, rows: np.ndarray = rows) -> None:
            writer: pq.ParquetWriter | None = None
            try:
                for start in range(0, max(len(rows), 1), batches.batch_size):
                    table = _table(batches.build(rows[start:start + batches.batch_size]))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table, row_group_size=rows_per_group)
            finally:
                if writer is not None:
                    writer.close()

        paths.append(atomic_write(Path(folder) / f"part-{f:05d}.parquet", write))
    return paths


class ParquetCtrBatches(torch.utils.data.IterableDataset):
    """Streams parquet shards written by :func:`write_shards` as TorchRec ``Batch`` objects.

    Rank ``r`` of ``world_size`` reads ``files[r::world_size]`` and nothing else, holding one row group at a time;
    every rank yields the same number of batches, ``min over ranks (its rows // batch_size)`` (read from the files'
    footers), so sharded training steps in lockstep.

    Args:
        files: the shard files (a folder: its ``*.parquet`` in name order).
        batch_size: examples per batch (B).
        rank, world_size: this process and the number of processes.
        sid_codes: add the SID code features of ``item_id`` / ``history_item_ids`` (looked up at every batch, see
            :class:`~torchrec_sid.data.batches.CtrBatches`).
        code_levels: code levels carried (None: all).
    """

    def __init__(self, files: Sequence[str | os.PathLike] | str | os.PathLike, batch_size: int, rank: int = 0,
                 world_size: int = 1, sid_codes: CodeSource | None = None, code_levels: int | None = None) -> None:
        super().__init__()
        if isinstance(files, (str, os.PathLike)):
            files = sorted(Path(files).glob("*.parquet"))
        self.files = [Path(f) for f in files]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(self.files) < world_size:
            raise ValueError(f"{len(self.files)} parquet files for {world_size} ranks: every rank needs a file")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.sid_codes, self.code_levels = sid_codes, code_levels
        self.my_files = self.files[rank::world_size]
        self.num_batches = min(rows_per_rank(self.files, world_size)) // batch_size
        metadata = pq.ParquetFile(self.files[0]).schema_arrow.metadata or {}
        if SCHEMA_KEY not in metadata:
            raise ValueError(f"{self.files[0]} was not written by write_shards (no {SCHEMA_KEY.decode()} metadata)")
        self.keys: list[str] = json.loads(metadata[SCHEMA_KEY])

    def __len__(self) -> int:
        return self.num_batches

    def _record_batches(self) -> Iterator[pa.RecordBatch]:
        for path in self.my_files:
            yield from pq.ParquetFile(path).iter_batches(batch_size=self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[pa.RecordBatch] = []
        held, produced = 0, 0
        for record_batch in self._record_batches():
            pending.append(record_batch)
            held += record_batch.num_rows
            while held >= self.batch_size and produced < self.num_batches:
                table = pa.Table.from_batches(pending)
                yield self.build(table.slice(0, self.batch_size))
                produced += 1
                rest = table.slice(self.batch_size)
                pending, held = rest.to_batches(), rest.num_rows
            if produced >= self.num_batches:
                return

    def build(self, table: pa.Table) -> Batch:
        """The ``Batch`` of ``table``'s rows (B of them)."""
        columns: list[Column] = []
        for key in self.keys:
            array = table.column(key).combine_chunks()
            columns.append((key, array.flatten().to_numpy().astype(np.int64),
                            array.value_lengths().to_numpy().astype(np.int64)))
        if self.sid_codes is not None:
            columns += code_columns(columns, self.sid_codes, CODE_SOURCES, self.code_levels)
        dense = table.column("dense").combine_chunks()
        width = int(dense.value_lengths()[0].as_py()) if len(dense) else 0
        dense_values = dense.flatten().to_numpy().reshape(len(dense), width)
        return Batch(dense_features=torch.from_numpy(np.array(dense_values, dtype=np.float32)),
                     sparse_features=columns_to_kjt(columns),
                     labels=torch.from_numpy(table.column("label").to_numpy().astype(np.float32)))


def rows_per_rank(files: Sequence[str | os.PathLike], world_size: int) -> list[int]:
    """Samples each rank's files hold (from the footers)."""
    return [sum(pq.ParquetFile(f).metadata.num_rows for f in list(files)[r::world_size]) for r in range(world_size)]


__all__ = ["ParquetCtrBatches", "rows_per_rank", "write_shards"]
