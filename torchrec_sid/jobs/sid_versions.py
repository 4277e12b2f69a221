"""The SID-table lifecycle verbs of ``torchrec-sid quantize``: publish a table as a version, encode new items with
the frozen quantizer into a delta version, compare two versions.

Example::

    torchrec-sid quantize --data movielens --out sids.safetensors           # fit
    torchrec-sid quantize publish --sids sids.safetensors --store store/ --suffix-capacity 16   # version 1
    torchrec-sid quantize encode-new-items --store store/ --data new.npy   # version 2: a delta
    torchrec-sid quantize compare-versions --store store/ --old 1 --new 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from torchrec_sid.io import ChecksumError, atomic_write_json, sha256_file
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.semantic_ids import quantizer_path
from torchrec_sid.sid.versions import SidStore, SidVersionError, StabilityReport, compare


def read_item_ids(path: str | Path, num_rows: int, what: str = "--item-ids") -> torch.Tensor:
    """Item ids ``[num_rows]`` from a ``.npy`` file of integers; ValueError naming the file and the field."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: not a readable .npy array ({e})") from e
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{what} {path}: field dtype is {ids.dtype}; expected integer item ids")
    if ids.shape != (num_rows,):
        raise ValueError(f"{what} {path}: field shape is {list(ids.shape)}; expected [{num_rows}] (one id per row "
                         f"of --data)")
    return torch.from_numpy(ids.astype(np.int64))


def publish(sids_file: str, store_dir: str, item_ids_file: str | None = None, suffix_capacity: int | None = None,
            report_file: str | None = None) -> tuple[int, StabilityReport | None]:
    """Publishes the SID table ``sids_file`` (with the quantizer beside it) as version 1 of an empty store, or as a
    re-fit version with its stability report against the latest."""
    sids = SemanticIds.load(sids_file)
    ids = read_item_ids(item_ids_file, sids.num_items) if item_ids_file else None
    quantizer = quantizer_path(sids_file)
    quantizer_file = quantizer if quantizer.is_file() else None
    store = SidStore(store_dir)
    if not store.versions():
        return store.create(sids, ids, quantizer_file, suffix_capacity), None
    if suffix_capacity is not None:
        if sids.suffix_level is None:
            raise ValueError(f"--suffix-capacity: {sids_file} has no collision suffix level")
        sids = SemanticIds(sids.codes, [*sids.cardinalities[:-1], max(suffix_capacity, sids.cardinalities[-1])],
                           sids.quantizer, sids.config, sids.metrics, digit_centres=sids.digit_centres,
                           suffix_level=sids.suffix_level)
    version, report = store.publish_refit(sids, ids, quantizer_file)
    if report_file:
        atomic_write_json(report_file, report.to_dict())
    return version, report


def encode_new_items(store_dir: str, data: str, item_ids_file: str | None = None, parent: int | None = None,
                     chunk_rows: int = 1 << 16) -> tuple[int, int]:
    """Encodes the rows of ``data`` (``.npy`` ``[n, D]``, memory-mapped) with the store's frozen quantizer and
    publishes them as a delta on ``parent`` (None: the latest); returns ``(version, new items)``."""
    from torchrec_sid.jobs.scale import encode_streaming, open_embeddings, quantizer_dim
    from torchrec_sid.quantizers.base import Quantizer

    store = SidStore(store_dir)
    parent = store.latest() if parent is None else parent
    entry = store.entry(parent)
    table = store.table(parent)
    if not store.quantizer_path.is_file():
        raise ValueError(f"version {parent} of {store_dir}: no quantizer in the store ({store.quantizer_path}); "
                         f"publish the table with its quantizer beside it")
    _check_quantizer(store, parent, entry["file"])
    quantizer = Quantizer.load(store.quantizer_path)
    if quantizer.cardinalities != table.cardinalities[:table.code_levels]:
        raise ValueError(f"version {parent} ({store.folder / entry['file']}): field cardinalities "
                         f"{table.cardinalities[:table.code_levels]} differ from the quantizer's "
                         f"{quantizer.cardinalities} ({store.quantizer_path})")
    x = open_embeddings(data, dim=quantizer_dim(quantizer))
    if item_ids_file is not None:
        ids = read_item_ids(item_ids_file, len(x))
    else:  # the ids after the largest one the store holds
        first = int(table.item_ids.max()) + 1 if table.num_items else 0
        ids = torch.arange(first, first + len(x))
    codes = encode_streaming(quantizer, x, chunk_rows, path=data)
    return store.add_items(ids, codes, parent=parent), len(x)


def _check_quantizer(store: SidStore, version: int, file: str) -> None:
    """ChecksumError unless the store's quantizer is the one version ``version`` recorded."""
    from torchrec_sid.io import load_artifact

    _, meta = load_artifact(store.folder / file, "sid_version")
    recorded = meta.get("quantizer_sha256")
    if recorded is not None and sha256_file(store.quantizer_path) != recorded:
        raise ChecksumError(f"version {version} ({store.folder / file}): field quantizer_sha256 does not match "
                            f"{store.quantizer_path}; the quantizer was replaced after this version")


def compare_versions(store_dir: str, old: int, new: int, out: str | None = None) -> StabilityReport:
    """The stability report of version ``new`` against ``old`` (written to ``out`` as JSON when given)."""
    store = SidStore(store_dir)
    report = compare(store.table(old), store.table(new))
    if out:
        atomic_write_json(out, report.to_dict())
    return report


def _run_publish(args: argparse.Namespace) -> None:
    version, report = publish(args.sids, args.store, args.item_ids, args.suffix_capacity, args.report)
    print(f"{args.store}: version {version} published from {args.sids}")
    if report is not None:
        print(report.table())


def _run_encode(args: argparse.Namespace) -> None:
    version, count = encode_new_items(args.store, args.data, args.item_ids, args.parent)
    print(f"{args.store}: version {version} published, {count:,} new items encoded from {args.data}")


def _run_compare(args: argparse.Namespace) -> None:
    report = compare_versions(args.store, args.old, args.new, args.out)
    print(report.table())
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "remaps"}, indent=2))


def add_verbs(parser: argparse.ArgumentParser) -> None:
    """Adds ``publish``, ``encode-new-items`` and ``compare-versions`` to the ``quantize`` command (which without
    a verb still fits a quantizer)."""
    verbs = parser.add_subparsers(dest="verb", metavar="{publish,encode-new-items,compare-versions}")
    p = verbs.add_parser("publish", help="publish a SID table as version 1 of a store, or as a re-fit version")
    p.add_argument("--sids", required=True, help="the SemanticIds file (its quantizer file beside it is copied in)")
    p.add_argument("--store", required=True, metavar="DIR", help="the SID store folder")
    p.add_argument("--item-ids", metavar="NPY", help="catalogue id of each row (.npy int [N]; default: the row)")
    p.add_argument("--suffix-capacity", type=int, help="collision suffix room for new items (default: the table's)")
    p.add_argument("--report", metavar="JSON", help="write a re-fit's stability report here")
    p.set_defaults(run=_run_publish)
    p = verbs.add_parser("encode-new-items", help="encode new items with the store's frozen quantizer: a delta")
    p.add_argument("--store", required=True, metavar="DIR", help="the SID store folder")
    p.add_argument("--data", required=True, metavar="NPY", help="the new items' embeddings (.npy [n, D])")
    p.add_argument("--item-ids", metavar="NPY", help="their catalogue ids (.npy int [n]; default: after the largest)")
    p.add_argument("--parent", type=int, help="the version the delta is on (default: the latest; must be the latest)")
    p.set_defaults(run=_run_encode)
    p = verbs.add_parser("compare-versions", help="stability report: SIDs changed per prefix length, remaps")
    p.add_argument("--store", required=True, metavar="DIR", help="the SID store folder")
    p.add_argument("--old", type=int, required=True, help="the old version")
    p.add_argument("--new", type=int, required=True, help="the new version")
    p.add_argument("--out", metavar="JSON", help="write the report (with the remaps) here")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(run=_run_compare)
    for verb in verbs.choices.values():
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")


__all__ = ["SidVersionError", "add_verbs", "compare_versions", "encode_new_items", "publish", "read_item_ids"]
