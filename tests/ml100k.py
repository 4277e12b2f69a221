"""A tiny MovieLens-100k folder in the official GroupLens format (a helper module: tests import it, and
conftest.py's fixtures use it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from torchrec_sid.data.movielens import GENRES

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Star Wars (1977)", "Fargo (1996)", "Babe (1995)",
          "Alien (1979)", "Heat (1995)", "Clueless (1995)"]


def write_ml100k(folder: Path, num_users: int = 6, num_ratings: int = 40, seed: int = 0) -> Path:
    """Writes u.data / u.item / u.user for ``num_users`` users and ``len(TITLES)`` items in GroupLens format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = rng.permutation([(u, i) for u in range(1, num_users + 1) for i in range(1, len(TITLES) + 1)])[:num_ratings]
    times = 880000000 + np.sort(rng.choice(10**6, size=num_ratings, replace=False))
    rows = [f"{u}\t{i}\t{rng.integers(1, 6)}\t{t}" for (u, i), t in zip(pairs, rng.permutation(times))]
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    items = []
    for i, title in enumerate(TITLES, start=1):
        flags = ["1" if (i + g) % 5 == 0 else "0" for g in range(len(GENRES))]
        date = "" if i == 8 else f"01-Jan-{title[-5:-1]}"
        items.append("|".join([str(i), title, date, "", f"http://example/{i}", *flags]))
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    users = [f"{u}|{20 + 7 * u}|{'MF'[u % 2]}|{['writer', 'student', 'other'][u % 3]}|0{u}123"
             for u in range(1, num_users + 1)]
    (folder / "u.user").write_text("\n".join(users) + "\n")
    return folder
