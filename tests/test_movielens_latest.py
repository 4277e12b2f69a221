"""MovieLens latest-small from Debian's r-cran-dslabs .deb: pinned digest, R object checks, nothing cached half."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from torchrec_sid.data import movielens_latest
from torchrec_sid.data.movielens import DataSourceError


def test_a_different_deb_is_refused_saying_what_was_expected(tmp_path: Path, isolated_cache: Path) -> None:
    fake = tmp_path / "r-cran-dslabs_0.7.4-1_all.deb"
    fake.write_bytes(b"!<arch>\n" + b"x" * 100)
    with pytest.raises(DataSourceError, match=r"is not r-cran-dslabs_0.7.4-1_all.deb: 108 bytes, sha256 .*; expected "
                                              r"4,654,136 bytes, sha256 c3f93382c44d\.\.\."):
        movielens_latest.load(deb=fake)
    assert not any(isolated_cache.rglob("*.parquet"))  # nothing cached


def test_missing_deb_is_named(tmp_path: Path, isolated_cache: Path) -> None:
    with pytest.raises(DataSourceError, match=r"nope.deb: no such file \(expected r-cran-dslabs_0.7.4-1_all.deb\)"):
        movielens_latest.load(deb=tmp_path / "nope.deb")


def test_an_r_object_without_a_column_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = tmp_path / "d.deb"
    deb.write_bytes(b"")
    monkeypatch.setattr(movielens_latest, "DEB_SIZE", 0)
    monkeypatch.setattr(movielens_latest, "DEB_SHA256", hashlib.sha256(b"").hexdigest())
    monkeypatch.setattr(movielens_latest, "_rdata_files", lambda data, path: {".rdx": b"", ".rdb": b""})
    frame = pd.DataFrame({c: [1] for c in movielens_latest.COLUMNS if c != "timestamp"})
    monkeypatch.setattr(movielens_latest, "_read_lazy_load_object", lambda rdx, rdb, name, path: frame)
    with pytest.raises(DataSourceError, match=r"the R object 'movielens' lacks the column\(s\) \['timestamp'\]"):
        movielens_latest.read_deb(deb)


def test_not_a_deb_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"is not a Debian package \(no ar header\)"):
        movielens_latest._rdata_files(b"PK\x03\x04", tmp_path / "x.deb")


@pytest.mark.network
def test_real_movielens_latest_from_the_debian_package(isolated_cache: Path) -> None:
    ml = movielens_latest.load()
    assert (len(ml.ratings), ml.num_users, len(ml.items)) == (100_004, 671, 9_066)
    assert ml.texts()[0] == "Toy Story (1995) | Adventure, Animation, Children, Comedy, Fantasy"
    data = ml.interactions()
    assert set(data.splits) == {"train", "valid", "test", "cold"} and len(data.splits["cold"]) > 0
    counts = ml.ratings["item_id"].value_counts().reindex(range(len(ml.items)), fill_value=0)
    assert (counts <= 5).mean() > 0.5  # the long tail
    cache = list(isolated_cache.rglob("movielens.parquet"))
    assert len(cache) == 1 and movielens_latest.load().ratings.equals(ml.ratings)
