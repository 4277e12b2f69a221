"""Item content features: text formatting, the MiniLM encoder, the embedding cache, and a semantic sanity check."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_sid.data.batches import Catalog
from torchrec_sid.data.content import (
    ContentFeatures,
    TextEncoder,
    content_features,
    default_encoder,
    embed_texts,
    genre_multi_hot,
    item_text,
)

# MovieLens-100k titles with their genres and years: 11 science-fiction films and a mix of action, war, drama,
# comedy, romance and children's films, several sharing Star Wars' Action/Adventure/Romance/War genres.
MOVIES = [
    ("Star Wars (1977)", ["Action", "Adventure", "Romance", "Sci-Fi", "War"], 1977),
    ("Return of the Jedi (1983)", ["Action", "Adventure", "Romance", "Sci-Fi", "War"], 1983),
    ("Empire Strikes Back, The (1980)", ["Action", "Adventure", "Drama", "Romance", "Sci-Fi", "War"], 1980),
    ("Star Trek: First Contact (1996)", ["Action", "Adventure", "Sci-Fi"], 1996),
    ("Star Trek: The Wrath of Khan (1982)", ["Action", "Adventure", "Sci-Fi"], 1982),
    ("Alien (1979)", ["Action", "Horror", "Sci-Fi", "Thriller"], 1979),
    ("Aliens (1986)", ["Action", "Sci-Fi", "Thriller", "War"], 1986),
    ("Blade Runner (1982)", ["Film-Noir", "Sci-Fi"], 1982),
    ("Terminator, The (1984)", ["Action", "Sci-Fi", "Thriller"], 1984),
    ("Independence Day (ID4) (1996)", ["Action", "Sci-Fi", "War"], 1996),
    ("Contact (1997)", ["Drama", "Sci-Fi"], 1997),
    ("Raiders of the Lost Ark (1981)", ["Action", "Adventure"], 1981),
    ("Die Hard (1988)", ["Action", "Thriller"], 1988),
    ("Braveheart (1995)", ["Action", "Drama", "War"], 1995),
    ("Top Gun (1986)", ["Action", "Romance"], 1986),
    ("Apocalypse Now (1979)", ["Drama", "War"], 1979),
    ("Sense and Sensibility (1995)", ["Drama", "Romance"], 1995),
    ("Babe (1995)", ["Children's", "Comedy", "Drama"], 1995),
    ("Toy Story (1995)", ["Animation", "Children's", "Comedy"], 1995),
    ("Fargo (1996)", ["Crime", "Drama", "Thriller"], 1996),
    ("Clueless (1995)", ["Comedy", "Romance"], 1995),
    ("Dead Man Walking (1995)", ["Drama"], 1995),
    ("Mr. Holland's Opus (1995)", ["Drama"], 1995),
    ("Birdcage, The (1996)", ["Comedy"], 1996),
    ("Emma (1996)", ["Drama", "Romance"], 1996),
    ("Jerry Maguire (1996)", ["Drama", "Romance"], 1996),
    ("English Patient, The (1996)", ["Drama", "Romance", "War"], 1996),
    ("Titanic (1997)", ["Action", "Drama", "Romance"], 1997),
    ("Pulp Fiction (1994)", ["Crime", "Drama"], 1994),
    ("Forrest Gump (1994)", ["Comedy", "Romance", "War"], 1994),
    ("Lion King, The (1994)", ["Animation", "Children's", "Musical"], 1994),
    ("Aladdin (1992)", ["Animation", "Children's", "Comedy", "Musical"], 1992),
    ("Mrs. Doubtfire (1993)", ["Comedy"], 1993),
    ("Groundhog Day (1993)", ["Comedy", "Romance"], 1993),
    ("Sleepless in Seattle (1993)", ["Comedy", "Romance"], 1993),
    ("When Harry Met Sally... (1989)", ["Comedy", "Romance"], 1989),
    ("Shawshank Redemption, The (1994)", ["Drama"], 1994),
    ("Schindler's List (1993)", ["Drama", "War"], 1993),
    ("Casablanca (1942)", ["Drama", "Romance", "War"], 1942),
    ("Godfather, The (1972)", ["Action", "Crime", "Drama"], 1972),
    ("Silence of the Lambs, The (1991)", ["Drama", "Thriller"], 1991),
    ("Willy Wonka and the Chocolate Factory (1971)", ["Adventure", "Children's", "Comedy"], 1971),
    ("Princess Bride, The (1987)", ["Action", "Adventure", "Comedy", "Romance"], 1987),
]
TEXTS = [item_text(*movie) for movie in MOVIES]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache folder."""
    monkeypatch.setenv("TORCHREC_SID_CACHE", str(tmp_path))
    return tmp_path / "embeddings"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The process-wide real encoder, loaded once for the module."""
    return default_encoder()


class FakeEncoder(TextEncoder):
    """Deterministic unit vectors from a text hash, counting calls; exercises the cache without the model."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def model_id(self) -> str:
        return "fake@0"

    def encode(self, texts, batch_size=128, progress=True):
        self.calls += 1
        rows = [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts]
        emb = np.stack(rows).astype(np.float32)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_item_text_formats_title_genres_and_year() -> None:
    assert item_text("Star Wars (1977)", ["Action", "Adventure", "Romance", "Sci-Fi", "War"], 1977) == (
        "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War. Released 1977.")
    assert item_text("Fargo (1996)", ["Crime"], None) == "Fargo (1996). Genres: Crime."
    assert item_text("  Babe (1995) ", [], 1995) == "Babe (1995). Released 1995."
    assert item_text("Airplane!", ["", "Comedy"], None) == "Airplane! Genres: Comedy."
    assert item_text("unknown", [], None) == "unknown."


def test_embeddings_are_unit_norm_and_deterministic(encoder: TextEncoder) -> None:
    first = encoder.encode(TEXTS[:8], progress=False)
    assert first.shape == (8, 384) and first.dtype == np.float32 and encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    second = TextEncoder().encode(TEXTS[:8], batch_size=3, progress=False)  # a fresh model, other batches
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-5)
    assert np.abs(first[0] - first[1]).max() > 1e-2  # distinct texts, distinct vectors


def test_cache_hit_loads_no_model(encoder: TextEncoder, _cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    computed = embed_texts(TEXTS, encoder=encoder, progress=False)
    assert len(list(_cache.rglob("*.npy"))) == 1 and len(list(_cache.rglob("*.json"))) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("cache hit must not load or run the model")

    monkeypatch.setattr(TextEncoder, "_load", forbidden)
    monkeypatch.setattr(TextEncoder, "encode", forbidden)
    fresh = TextEncoder()
    np.testing.assert_array_equal(embed_texts(TEXTS, encoder=fresh, progress=False), computed)
    np.testing.assert_array_equal(embed_texts(TEXTS, progress=False), computed)  # the default encoder too
    assert fresh._model is None


def test_cache_key_is_the_whole_text_list() -> None:
    fake = FakeEncoder()
    embed_texts(["a", "b"], encoder=fake)
    embed_texts(["b", "a"], encoder=fake)
    embed_texts(["a"], encoder=fake)
    embed_texts(["a", "b"], encoder=fake)
    assert fake.calls == 3


def test_no_cache_writes_nothing(_cache: Path) -> None:
    fake = FakeEncoder()
    embed_texts(["a", "b"], cache=False, encoder=fake)
    embed_texts(["a", "b"], cache=False, encoder=fake)
    assert fake.calls == 2 and not list(_cache.rglob("*.*"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage_sidecar", "missing_sidecar"])
def test_corrupt_cache_is_detected_and_rewritten(damage: str, _cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEncoder()
    expected = embed_texts(TEXTS, encoder=fake)
    (array_path,) = _cache.rglob("*.npy")
    sidecar = array_path.with_suffix(".json")
    data = array_path.read_bytes()
    if damage == "truncate":
        array_path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        array_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "garbage_sidecar":
        sidecar.write_text("{not json")
    else:
        sidecar.unlink()

    with caplog.at_level(logging.WARNING, logger="torchrec_sid.data.content"):
        np.testing.assert_array_equal(embed_texts(TEXTS, encoder=fake), expected)
    assert fake.calls == 2
    assert any("corrupt" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert array_path.read_bytes() == data and json.loads(sidecar.read_text())["num_texts"] == len(TEXTS)
    embed_texts(TEXTS, encoder=fake)  # rewritten entry is valid again
    assert fake.calls == 2


def test_star_wars_neighbours_are_science_fiction(encoder: TextEncoder) -> None:
    emb = embed_texts(TEXTS, encoder=encoder, progress=False)
    similarity = emb @ emb[0]
    neighbours = [i for i in np.argsort(-similarity) if i != 0][:5]
    titles = [MOVIES[i][0] for i in neighbours]
    # Measured with the bundled model: Return of the Jedi, Empire Strikes Back, Wrath of Khan, Terminator, Aliens;
    # the first non-sci-fi film (Schindler's List) comes 6th, ahead of Alien.
    assert set(titles[:2]) == {"Return of the Jedi (1983)", "Empire Strikes Back, The (1980)"}, titles
    assert all("Sci-Fi" in MOVIES[i][1] for i in neighbours), titles


def test_bad_inputs_raise_before_loading() -> None:
    fresh = TextEncoder()
    with pytest.raises(ValueError, match="empty"):
        embed_texts([], encoder=fresh)
    with pytest.raises(ValueError, match=r"texts\[2\] is int"):
        embed_texts(["a", "b", 3], encoder=fresh)
    with pytest.raises(ValueError, match=r"texts\[1\] is NoneType"):
        fresh.encode(["a", None])
    with pytest.raises(ValueError, match="single string"):
        embed_texts("Star Wars (1977)", encoder=fresh)
    assert fresh._model is None


def test_genre_multi_hot_and_content_features(encoder: TextEncoder) -> None:
    names = ["Action", "Comedy", "Sci-Fi"]
    multi_hot = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    catalog = Catalog(
        num_users=1, num_items=3, user_features={}, user_feature_cardinalities={}, item_genres=multi_hot,
        genre_names=names, dense_user=np.zeros((1, 0), np.float32), dense_item=np.zeros((3, 0), np.float32),
        item_titles=["Alien (1979)", "Clueless (1995)", "unknown"],
    )
    genres = genre_multi_hot(catalog)
    assert genres.dtype == torch.float32 and genres.tolist() == multi_hot.astype(float).tolist()

    item_genres = [[names[g] for g in np.flatnonzero(row)] for row in multi_hot]
    features = content_features(catalog.item_titles, item_genres, [1979, 1995, None], multi_hot, progress=False)
    assert isinstance(features, ContentFeatures) and features.model == encoder.model_id
    assert features.text.shape == (3, 384) and features.text.dtype == torch.float32
    assert torch.equal(features.genres, genres)
    texts = [item_text(t, g, y) for t, g, y in zip(catalog.item_titles, item_genres, [1979, 1995, None])]
    np.testing.assert_allclose(features.text.numpy(), encoder.encode(texts, progress=False), atol=1e-6)

    with pytest.raises(ValueError, match="one entry per item"):
        content_features(catalog.item_titles, item_genres, [1979, 1995], multi_hot, progress=False)
