"""Quality metrics of a quantizer: reconstruction, codebook usage, collisions and neighbour recall.

* ``rmse``: per-element root mean squared error ``sqrt(mean_{i,d} (x - x_hat)^2)`` (the RQ-GMM paper's RMSE).
* ``cosine_loss``: mean ``1 - cos(x_i, x_hat_i)`` (the SIDE paper's Table 1).
* ``utilization`` / ``perplexity`` per level: fraction of the K codes used; ``exp`` of the entropy of code usage.
* ``collision_rate``: fraction of items whose full SID is shared (:func:`torchrec_sid.sid.codes.collision_rate`).
* ``recall@k``: for each query item, the raw space's top-``reference_k`` neighbours by cosine (itself excluded)
  against the top-``k`` in reconstructed space: ``|top20_raw & topk_recon| / 20``, averaged (SIDE Table 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_sid.quantizers.base import (
    Quantizer,
    QuantizerInput,
    ResidualQuantizer,
    as_signals,
    check_codes,
    check_embeddings,
    row_chunks,
)
from torchrec_sid.sid.codes import collision_rate


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")


def rmse(x: Tensor, x_hat: Tensor) -> float:
    """Per-element RMSE of ``x_hat: [N, D]`` against ``x: [N, D]``."""
    _check_pair(x, x_hat)
    return math.sqrt(((x - x_hat) ** 2).double().mean().item())


def cosine_loss(x: Tensor, x_hat: Tensor) -> float:
    """Mean of ``1 - cos(x_i, x_hat_i)`` over rows of ``[N, D]`` (a zero row counts as cosine 0)."""
    _check_pair(x, x_hat)
    return (1.0 - F.cosine_similarity(x.double(), x_hat.double(), dim=1)).mean().item()


def _usage(codes: Tensor, cardinalities: list[int]) -> list[Tensor]:
    codes = check_codes(codes, cardinalities)
    return [torch.bincount(codes[:, level], minlength=k).double() for level, k in enumerate(cardinalities)]


def utilization(codes: Tensor, cardinalities: list[int]) -> list[float]:
    """Per level, the fraction of the ``cardinalities[l]`` codes used by ``codes: [N, levels]``."""
    return [(counts > 0).double().mean().item() for counts in _usage(codes, cardinalities)]


def perplexity(codes: Tensor, cardinalities: list[int]) -> list[float]:
    """Per level, ``exp(H)`` of the code-usage distribution (K for uniform usage, 1 for a single code)."""
    out = []
    for counts in _usage(codes, cardinalities):
        p = counts[counts > 0] / counts.sum()
        out.append(math.exp(-(p * p.log()).sum().item()))
    return out


def _top_neighbours(unit: Tensor, queries: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` most cosine-similar rows of ``unit: [N, D]`` (unit rows) to each query row, excluding
    the query itself. ``queries: [b]`` -> ``[b, k]``."""
    similarity = unit[queries] @ unit.T  # [b, N]
    similarity[torch.arange(len(queries)), queries] = float("-inf")
    return similarity.topk(k, dim=1).indices


def recall_at_k(x: Tensor, x_hat: Tensor, ks: Sequence[int] = (20, 50, 100), *, reference_k: int = 20,
                num_queries: int | None = 1000, seed: int = 0, chunk_size: int = 256) -> dict[str, float]:
    """SIDE-style neighbour recall of the reconstruction ``x_hat: [N, D]`` against ``x: [N, D]``.

    Args:
        ks: neighbour counts in reconstructed space; each must be below N.
        reference_k: raw-space neighbours per query (20 in SIDE).
        num_queries: seeded sample of query items (``None``: every item).
        seed: seed of the query sample.
        chunk_size: queries per similarity matmul (memory ``O(chunk_size * N)``).

    Returns:
        ``{"recall@k": float}`` for each ``k`` in ``ks``.
    """
    _check_pair(x, x_hat)
    n = len(x)
    too_large = [k for k in (*ks, reference_k) if not 1 <= k < n]
    if too_large:
        raise ValueError(f"neighbour counts must be in [1, N) with N={n} items, got {too_large}")
    queries = torch.arange(n)
    if num_queries is not None and num_queries < n:
        queries = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_queries]
    raw, recon = F.normalize(x.float(), dim=1), F.normalize(x_hat.float(), dim=1)
    last = torch.tensor(ks) - 1
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for rows in row_chunks(len(queries), chunk_size):
        truth = _top_neighbours(raw, queries[rows], reference_k)  # [b, reference_k]
        found = _top_neighbours(recon, queries[rows], max(ks))  # [b, max(ks)]
        is_true = (found[:, :, None] == truth[:, None, :]).any(dim=2)  # [b, max(ks)]
        hits += is_true.cumsum(dim=1)[:, last].sum(0)
    recall = hits / (len(queries) * reference_k)
    return {f"recall@{k}": r for k, r in zip(ks, recall.tolist(), strict=True)}


def quality_report(quantizer: Quantizer, x: QuantizerInput, *, codes: Tensor | None = None,
                   ks: Sequence[int] = (20, 50, 100), num_queries: int | None = 1000, seed: int = 0) -> dict[str, Any]:
    """Every metric above for a fitted ``quantizer`` on its input ``x`` (what :class:`SemanticIds` stores).

    ``codes: [N, levels]`` defaults to ``quantizer.encode(x)``; recall is reported for the ``ks`` below N (none
    when N <= 20). A residual quantizer also gets ``rmse_per_level`` (reconstruction from the first l levels).
    A quantizer of several signals ``{m: [N, D_m]}`` gets ``rmse`` / ``cosine_loss`` per signal (``{m: value}``,
    from :meth:`~Quantizer.decode_signals`) and recall on the concatenation of the L2-normalised signals.
    """
    codes = quantizer.encode(x) if codes is None else codes
    signals = {m: check_embeddings(v, what=m) for m, v in as_signals(x, quantizer.signal_names).items()}
    report: dict[str, Any] = {
        "num_items": len(next(iter(signals.values()))),
        "utilization": utilization(codes, quantizer.cardinalities),
        "perplexity": perplexity(codes, quantizer.cardinalities),
        "collision_rate": collision_rate(codes),
    }
    if len(signals) == 1:
        x_all, x_hat = next(iter(signals.values())), quantizer.decode(codes)
        report.update(rmse=rmse(x_all, x_hat), cosine_loss=cosine_loss(x_all, x_hat))
    else:
        decoded = quantizer.decode_signals(codes)
        report.update(rmse={m: rmse(v, decoded[m]) for m, v in signals.items()},
                      cosine_loss={m: cosine_loss(v, decoded[m]) for m, v in signals.items()})
        x_all = torch.cat([F.normalize(v, dim=1) for v in signals.values()], dim=1)
        x_hat = torch.cat([F.normalize(decoded[m].float(), dim=1) for m in signals], dim=1)
    if isinstance(quantizer, ResidualQuantizer):
        report["rmse_per_level"] = [rmse(x_all, quantizer.decode(codes[:, : level + 1]))
                                    for level in range(codes.shape[1])]
    ks = [k for k in ks if k < len(x_all)]
    if ks and len(x_all) > 20:
        report.update(recall_at_k(x_all, x_hat, ks, num_queries=num_queries, seed=seed))
    return report
