"""MovieLens "latest-small" (2016 release): 9,066 titled movies, 671 users, 100,004 ratings (1995-2016) with a long
tail: half the movies have 3 ratings or fewer.

Source: the R data object ``movielens`` inside Debian's ``r-cran-dslabs`` package, version 0.7.4-1. The ``.deb`` is
fetched with ``apt-get download`` (never installed; run ``apt-get update`` once on a fresh machine), checked
against its pinned size and SHA-256, and the object is read from the package's R lazy-load database
(``data/Rdata.rdx`` + ``Rdata.rdb``) with the PyPI ``rdata`` reader. The ratings table is cached as parquet in
``$TORCHREC_SID_CACHE/movielens_latest`` (checked by SHA-256 on every load). Offline: ``load(deb=PATH)`` or
``$TORCHREC_SID_DSLABS_DEB``.

Example::

    ml = movielens_latest.load()
    data = ml.interactions().with_long_tail()     # train / valid / test (temporal) + cold + tail
    signals = ml.signals()                          # text [9066, 384] ("title (year) | genres", MiniLM) + meta
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from torchrec_sid.data.batches import Catalog, Histories, InteractionData
from torchrec_sid.data.content import embed_texts
from torchrec_sid.data.movielens import DataSourceError
from torchrec_sid.data.ratings import rating_histories, temporal_interactions
from torchrec_sid.io import CACHE_ENV, atomic_write_bytes, atomic_write_json, cache_dir, sha256_file

logger = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-dslabs"
DEB_VERSION = "0.7.4-1"
DEB_FILE = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
DEB_SIZE = 4_654_136
DEB_SHA256 = "c3f93382c44d4581de9561792a87b110cb239c70771cac5ad63fa0a259e71ef3"
DEB_ENV = "TORCHREC_SID_DSLABS_DEB"
RDATA = "usr/lib/R/site-library/dslabs/data/Rdata"  # the lazy-load database, .rdx (index) + .rdb (objects)
OBJECT = "movielens"
COLUMNS = ("movieId", "title", "year", "genres", "userId", "rating", "timestamp")
NO_GENRE = "(no genres listed)"
CACHE_NAME = "movielens_latest"


@dataclass(frozen=True)
class MovieLensLatest:
    """The ratings and movies of MovieLens latest-small, ids from 0.

    Args:
        items: ``item_id, movie_id, title, year`` (nullable Int64), ``genres`` (list of names).
        ratings: ``user_id, item_id, rating, timestamp`` in chronological order (ratings in half stars).
        num_users: U (671).
        source: where the tables came from.
    """

    items: pd.DataFrame
    ratings: pd.DataFrame
    num_users: int
    source: str

    @cached_property
    def genre_names(self) -> list[str]:
        return sorted({g for genres in self.items["genres"] for g in genres})

    @cached_property
    def catalog(self) -> Catalog:
        """No user attributes (the release has none); the items' genres; the release year as a dense feature."""
        year = self.items["year"].astype("Float64").to_numpy(np.float32, na_value=np.nan)
        year = np.where(np.isnan(year), np.nanmean(year), year)
        return Catalog(
            num_users=self.num_users,
            num_items=len(self.items),
            user_features={},
            user_feature_cardinalities={},
            item_genres=self._genre_multi_hot(),
            genre_names=self.genre_names,
            dense_user=np.zeros((self.num_users, 0), dtype=np.float32),
            dense_item=((year - year.mean()) / (year.std() + 1e-8)).astype(np.float32)[:, None],
            item_titles=self.items["title"].tolist(),
        )

    def _genre_multi_hot(self) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.genre_names)}
        multi_hot = np.zeros((len(self.items), len(index)), dtype=bool)
        for row, genres in enumerate(self.items["genres"]):
            multi_hot[row, [index[g] for g in genres]] = True
        return multi_hot

    def texts(self) -> list[str]:
        """The sentence embedded for each item: ``"Toy Story (1995) | Adventure, Animation, Children"``."""
        return [f"{title}{'' if pd.isna(year) else f' ({int(year)})'}{' | ' + ', '.join(genres) if genres else ''}"
                for title, year, genres in zip(self.items["title"], self.items["year"], self.items["genres"],
                                               strict=True)]

    def signals(self, progress: bool = True) -> dict[str, torch.Tensor]:
        """``text``: MiniLM embeddings of :meth:`texts` ``[I, 384]`` (cached); ``meta``: genre multi-hot ``[I, G]``."""
        text = embed_texts(self.texts(), progress=progress)
        return {"text": torch.from_numpy(text).float(), "meta": torch.from_numpy(self._genre_multi_hot()).float()}

    def histories(self, exclude_items: np.ndarray | None = None) -> Histories:
        return rating_histories(self.ratings, self.num_users, exclude_items)

    def interactions(self, valid_frac: float = 0.1, test_frac: float = 0.1, cold_frac: float = 0.15,
                     positive_threshold: float = 4.0, seed: int = 0) -> InteractionData:
        """CTR samples (label = ``rating >= 4``) split by time, plus cold-start items
        (:func:`~torchrec_sid.data.ratings.temporal_interactions`)."""
        return temporal_interactions("movielens-latest-small", self.catalog, self.ratings, valid_frac, test_frac,
                                     cold_frac, positive_threshold, seed)

    def summary(self) -> str:
        counts = np.bincount(self.ratings["item_id"].to_numpy(), minlength=len(self.items))
        r = self.ratings
        return (f"MovieLens latest-small ({self.source}): {len(r):,} ratings, {self.num_users:,} users, "
                f"{len(self.items):,} items ({(counts <= 5).mean():.0%} with 5 ratings or fewer), "
                f"{len(self.genre_names)} genres; {pd.to_datetime(r['timestamp'].min(), unit='s').date()} to "
                f"{pd.to_datetime(r['timestamp'].max(), unit='s').date()}, positive rate (rating >= 4) "
                f"{(r['rating'] >= 4).mean():.3f}\n" + self.interactions().summary())


def load(deb: str | os.PathLike | None = None) -> MovieLensLatest:
    """Loads MovieLens latest-small from the cache, or from the ``r-cran-dslabs`` .deb (``deb``,
    ``$TORCHREC_SID_DSLABS_DEB``, or ``apt-get download``), caching it; every step is checked."""
    folder = cache_dir(CACHE_NAME)
    table = folder / "movielens.parquet"
    cached = _read_cache(table, folder / "movielens.json")
    if cached is None:
        deb_path = Path(deb or os.environ.get(DEB_ENV) or _apt_download(folder))
        cached = read_deb(deb_path)
        data = io.BytesIO()
        cached.to_parquet(data, index=False)
        atomic_write_bytes(table, data.getvalue())
        atomic_write_json(folder / "movielens.json", {"sha256": sha256_file(table), "source": DEB_FILE})
    return _normalise(cached, source=f"{DEB_FILE} (cached in ${CACHE_ENV} / {folder})")


def _read_cache(table: Path, meta: Path) -> pd.DataFrame | None:
    if not (table.is_file() and meta.is_file()):
        return None
    recorded = json.loads(meta.read_text()).get("sha256")
    if sha256_file(table) != recorded:
        logger.warning("cache %s is corrupt or incomplete (sha256 mismatch); reading the .deb again", table)
        return None
    return pd.read_parquet(table)


def _apt_download(folder: Path) -> Path:
    """``apt-get download r-cran-dslabs=0.7.4-1`` into ``folder``; the .deb's path."""
    target = folder / DEB_FILE
    if target.is_file():
        return target
    command = ["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"]
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise DataSourceError(f"apt-get is not available to fetch {DEB_FILE}; download it on a Debian machine and "
                              f"pass load(deb=PATH) or set ${DEB_ENV}") from e
    if done.returncode != 0:
        raise DataSourceError(f"apt-get download {DEB_PACKAGE}={DEB_VERSION} failed: {done.stderr.strip()[-300:]} "
                              f"(run `apt-get update` once, or pass load(deb=PATH) / set ${DEB_ENV})")
    if not target.is_file():
        raise DataSourceError(f"apt-get download did not produce {target}")
    return target


def read_deb(path: Path) -> pd.DataFrame:
    """The raw ``movielens`` R data frame from the pinned ``r-cran-dslabs`` .deb at ``path``.

    Raises :class:`~torchrec_sid.data.movielens.DataSourceError` naming the file and what was expected when it is
    missing, of another size or digest, not a .deb, or lacks the object or one of its columns.
    """
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file (expected {DEB_FILE})")
    size, digest = path.stat().st_size, sha256_file(path)
    if (size, digest) != (DEB_SIZE, DEB_SHA256):
        raise DataSourceError(f"{path} is not {DEB_FILE}: {size:,} bytes, sha256 {digest[:12]}...; expected "
                              f"{DEB_SIZE:,} bytes, sha256 {DEB_SHA256[:12]}... (version {DEB_VERSION} of "
                              f"{DEB_PACKAGE})")
    members = _rdata_files(path.read_bytes(), path)
    frame = _read_lazy_load_object(members[".rdx"], members[".rdb"], OBJECT, path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataSourceError(f"{path}: the R object {OBJECT!r} lacks the column(s) {missing}; it has "
                              f"{list(frame.columns)}")
    return frame[list(COLUMNS)]


def _rdata_files(deb: bytes, path: Path) -> dict[str, bytes]:
    """The ``Rdata.rdx`` and ``Rdata.rdb`` files inside the .deb's ``data.tar.xz`` (a .deb is an ``ar`` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataSourceError(f"{path} is not a Debian package (no ar header)")
    offset, data_tar = 8, None
    while offset + 60 <= len(deb):
        header = deb[offset:offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            data_tar = deb[offset + 60:offset + 60 + size]
        offset += 60 + size + size % 2
    if data_tar is None:
        raise DataSourceError(f"{path} has no data.tar member")
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        found = {}
        for suffix in (".rdx", ".rdb"):
            try:
                member = tar.extractfile(f"./{RDATA}{suffix}")
            except KeyError:
                member = None
            if member is None:
                raise DataSourceError(f"{path} has no {RDATA}{suffix}")
            found[suffix] = member.read()
    return found


def _read_lazy_load_object(rdx: bytes, rdb: bytes, name: str, path: Path) -> pd.DataFrame:
    """Object ``name`` of an R lazy-load database: the index (.rdx, a compressed serialised list of
    ``variables: name -> (offset, length)``) locates a zlib-compressed serialised object in the .rdb."""
    import rdata

    def parse(raw: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    variables = {str(k): v for k, v in index["variables"].items()}
    if name not in variables:
        raise DataSourceError(f"{path}: the R data has no object {name!r} (it has {sorted(variables)[:8]}...)")
    offset, length = (int(v) for v in variables[name])
    frame = parse(zlib.decompress(rdb[offset + 4:offset + length]))  # 4 bytes: the uncompressed length
    if not isinstance(frame, pd.DataFrame):
        raise DataSourceError(f"{path}: the R object {name!r} is a {type(frame).__name__}, not a data frame")
    return frame


def _normalise(raw: pd.DataFrame, source: str) -> MovieLensLatest:
    """Ids from 0 (movies by movieId, users by userId), ratings in time order, one row per movie."""
    raw = raw.dropna(subset=["movieId", "userId", "rating", "timestamp"])
    movies = raw.drop_duplicates("movieId").sort_values("movieId")
    movie_ids = movies["movieId"].to_numpy(np.int64)
    user_ids = np.sort(raw["userId"].unique().astype(np.int64))
    items = pd.DataFrame({
        "item_id": np.arange(len(movies), dtype=np.int64),
        "movie_id": movie_ids,
        "title": movies["title"].fillna("unknown").astype(str).str.strip().to_numpy(),
        "year": movies["year"].astype("Int64").to_numpy(),
        "genres": [[g for g in str(genres).split("|") if g and g != NO_GENRE] for genres in movies["genres"]],
    })
    ratings = pd.DataFrame({
        "user_id": np.searchsorted(user_ids, raw["userId"].to_numpy(np.int64)),
        "item_id": np.searchsorted(movie_ids, raw["movieId"].to_numpy(np.int64)),
        "rating": raw["rating"].to_numpy(np.float64),
        "timestamp": raw["timestamp"].to_numpy(np.int64),
    }).sort_values("timestamp", kind="stable").reset_index(drop=True)
    return MovieLensLatest(items, ratings, len(user_ids), source)

