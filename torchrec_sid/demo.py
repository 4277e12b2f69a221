"""The README's main job: MovieLens-100k end to end, printing what each stage produced."""

from __future__ import annotations

import time

import torch

from torchrec_sid.data import movielens
from torchrec_sid.data.batches import CtrBatches
from torchrec_sid.quantizers import SemanticIds, build_quantizer
from torchrec_sid.quantizers.metrics import quality_report


def nearest_titles(embeddings: torch.Tensor, titles: list[str], query: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` titles closest to ``query`` by cosine (``embeddings``: ``[I, D]``, L2-normalised rows)."""
    if query not in titles:
        raise ValueError(f"title {query!r} is not in the catalogue")
    i = titles.index(query)
    scores = embeddings @ embeddings[i]
    scores[i] = -float("inf")
    top = torch.topk(scores, k)
    return [(titles[j], float(s)) for s, j in zip(top.values, top.indices)]


def run(ml100k: str | None = None) -> None:
    """Loads the data (source A when ``ml100k`` is a folder, else the PyPI wheel), embeds the items, prints a summary."""
    t0 = time.perf_counter()
    ml = movielens.load(ml100k)
    print(ml.summary())
    print(f"[data] loaded in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    content = ml.content()
    print(f"[content] text {tuple(content.text.shape)} ({content.model}), genres {tuple(content.genres.shape)} "
          f"in {time.perf_counter() - t0:.1f} s")
    titles = ml.items["title"].tolist()
    for query in ("Star Wars (1977)", "Toy Story (1995)"):
        near = ", ".join(f"{t} ({s:.2f})" for t, s in nearest_titles(content.text, titles, query))
        print(f"[content] nearest to {query}: {near}")

    print("[sids] quantizer    levels x K   rmse     cosine loss  utilisation  collisions  recall@20")
    for method in ("rq_kmeans", "rq_gmm"):
        quantizer = build_quantizer(method, levels=3, codebook_size=64, seed=0).fit(content.text)
        sids = SemanticIds.from_quantizer(quantizer, content.text, quality_report(quantizer, content.text))
        m = sids.with_collision_suffix().metrics
        print(f"[sids] {method:<12} 3 x 64       {m['rmse']:.5f}  {m['cosine_loss']:.4f}       "
              f"{min(m['utilization']):.3f}        {m['collision_rate_before_suffix']:.3f}       {m['recall@20']:.3f}")

    batch = next(iter(CtrBatches(ml.interactions(), "train", batch_size=256, max_history=50, shuffle=True)))
    kjt = batch.sparse_features
    print(f"[batches] dense {tuple(batch.dense_features.shape)}, labels {tuple(batch.labels.shape)}, sparse keys "
          f"{kjt.keys()}, history lengths mean {kjt['history_item_ids'].lengths().float().mean():.1f}")
