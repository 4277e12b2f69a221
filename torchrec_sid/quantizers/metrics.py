"""Quality metrics of a quantizer: reconstruction, codebook usage, collisions and neighbour recall.

* ``rmse``: per-element root mean squared error ``sqrt(mean_{i,d} (x - x_hat)^2)`` over all items and dimensions.
  Not the RQ-GMM paper's number: its values (0.117-0.132 on 768-d BERT embeddings) exceed ``sqrt(1/768) = 0.036``,
  the per-element RMSE of reconstructing unit-norm rows by zero, so the paper's rows were not unit-norm or its
  RMSE is defined otherwise. Ours on L2-normalised D-dim rows is at most ``sqrt(1/D)`` for any sensible decoder.
* ``cosine_loss``: mean ``1 - cos(x_i, x_hat_i)`` (the SIDE paper's Table 1).
* ``utilization`` / ``perplexity`` per level: fraction of the K codes used; ``exp`` of the entropy of code usage.
  Utilisation alone hides collapse (it reads 1.0 when one code holds 91% of the items and every other code one
  item), so every report also has, per level (:func:`code_balance`): ``perplexity_ratio`` (perplexity / K),
  ``max_code_share`` (the largest code's fraction of the items) and ``share_in_codes_over_1pct`` (the fraction of
  items in codes that hold more than 1% of the items each).
* ``collision_rate``: fraction of items whose full SID is shared (:func:`torchrec_sid.sid.codes.collision_rate`),
  before any collision-suffix level (after the suffix it is 0 by construction); ``suffix_cardinality``: the
  cardinality a suffix level needs to make every SID unique (the most items sharing one SID).
* ``utilization_before_reseed`` / ``reseeded`` per level (:func:`reseeding`, RQ-KMeans and RQ-GMM, from the fit
  history): the lowest utilisation an assignment pass of the level's final stage found before empty codes were
  re-seeded, and how many codes were re-seeded in it (a re-seeded code counts as used afterwards).
* ``rmse_posterior_mean`` (RQ-GMM): the mixture's soft reconstruction of ``x``
  (:meth:`~torchrec_sid.quantizers.rq_gmm.RQGMM.posterior_mean_reconstruction`), next to ``rmse``, the MAP decode.
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
from torchrec_sid.quantizers.rq_gmm import RQGMM
from torchrec_sid.sid.codes import add_collision_suffix, collision_rate

LARGE_CODE_SHARE = 0.01  # share_in_codes_over_1pct counts the items of codes holding more than this share


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")


def rmse(x: Tensor, x_hat: Tensor, chunk_size: int = 4096) -> float:
    """Per-element RMSE of ``x_hat: [N, D]`` against ``x: [N, D]`` (module docstring), summed in float64 chunk
    by chunk (no ``[N, D]`` temporary)."""
    _check_pair(x, x_hat)
    total = sum(((x[rows] - x_hat[rows]) ** 2).sum(dtype=torch.float64).item()
                for rows in row_chunks(len(x), chunk_size))
    return math.sqrt(total / x.numel())


def cosine_loss(x: Tensor, x_hat: Tensor) -> float:
    """Mean of ``1 - cos(x_i, x_hat_i)`` over rows of ``[N, D]`` (a zero row counts as cosine 0)."""
    _check_pair(x, x_hat)
    total = sum((1.0 - F.cosine_similarity(x[rows].double(), x_hat[rows].double(), dim=1)).sum().item()
                for rows in row_chunks(len(x), 4096))
    return total / len(x)


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


def code_balance(codes: Tensor, cardinalities: list[int]) -> dict[str, list[float]]:
    """Per level, how evenly ``codes: [N, levels]`` spread the items: ``perplexity``, ``perplexity_ratio``
    (perplexity / K), ``max_code_share`` and ``share_in_codes_over_1pct`` (module docstring).

    Example::

        code_balance(torch.tensor([[0], [0], [0], [1]]), [4])["max_code_share"]  # [0.75]
    """
    out: dict[str, list[float]] = {"perplexity": [], "perplexity_ratio": [], "max_code_share": [],
                                   "share_in_codes_over_1pct": []}
    for counts, k in zip(_usage(codes, cardinalities), cardinalities, strict=True):
        share = counts / counts.sum()
        p = share[share > 0]
        ppl = math.exp(-(p * p.log()).sum().item())
        out["perplexity"].append(ppl)
        out["perplexity_ratio"].append(ppl / k)
        out["max_code_share"].append(share.max().item())
        out["share_in_codes_over_1pct"].append(share[share > LARGE_CODE_SHARE].sum().item())
    return out


def collisions(codes: Tensor) -> dict[str, float | int]:
    """``collision_rate`` of ``codes: [N, levels]`` (before any suffix level) and ``suffix_cardinality``, the
    cardinality of the suffix level that makes every SID unique (1: none needed)."""
    return {"collision_rate": collision_rate(codes), "suffix_cardinality": add_collision_suffix(codes)[1]}


def reseeding(history: Sequence[dict[str, Any]], levels: int) -> dict[str, list[float]]:
    """Per level, ``utilization_before_reseed`` (lowest utilisation of an assignment pass of the level's final
    stage, measured before its empty codes were re-seeded) and ``reseeded`` (codes re-seeded in that stage), from
    an RQ-KMeans / RQ-GMM fit history. The final stage is EM for RQ-GMM, else the k-means run that was kept."""
    out: dict[str, list[float]] = {"utilization_before_reseed": [], "reseeded": []}
    for level in range(levels):
        entries = [h for h in history if h.get("level") == level]
        choice = next((h for h in entries if "chosen" in h), None)
        if any(h["stage"] == "em" for h in entries):
            stage = "em"
        elif choice is not None and choice["chosen"] != "progressive":
            stage = f"{choice['stage'].removesuffix('_choice')}_{choice['chosen']}"
        else:
            stage = "kmeans"
        final = [h for h in entries if h["stage"] == stage and "utilization" in h]
        out["utilization_before_reseed"].append(min((h["utilization"] for h in final), default=float("nan")))
        out["reseeded"].append(float(sum(h.get("reseeded", 0) for h in final)))
    return out


def _top_neighbours(x: Tensor, inverse_norms: Tensor, queries: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` most cosine-similar rows of ``x: [N, D]`` (``inverse_norms: [N]``, 1 / row norm) to
    each query row, excluding the query itself. ``queries: [b]`` -> ``[b, k]``. The query's own norm does not change
    its ranking, so no normalised copy of ``x`` is made."""
    similarity = (x[queries] @ x.T).mul_(inverse_norms)  # [b, N]
    similarity[torch.arange(len(queries)), queries] = float("-inf")
    return similarity.topk(k, dim=1).indices


def _inverse_norms(x: Tensor, chunk_size: int = 4096) -> Tensor:
    """``1 / ||x_i||`` of the rows of ``x: [N, D]`` (0 for a zero row, which then ranks as cosine 0)."""
    norms = torch.cat([x[rows].float().norm(dim=1) for rows in row_chunks(len(x), chunk_size)])
    return torch.where(norms > 0, 1.0 / norms, torch.zeros(()))


def recall_at_k(x: Tensor, x_hat: Tensor, ks: Sequence[int] = (20, 50, 100), *, reference_k: int = 20,
                num_queries: int | None = 1000, seed: int = 0, chunk_size: int = 128) -> dict[str, float]:
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
    raw, recon = x.float(), x_hat.float()
    raw_inverse, recon_inverse = _inverse_norms(raw), _inverse_norms(recon)
    last = torch.tensor(ks) - 1
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for rows in row_chunks(len(queries), chunk_size):
        truth = _top_neighbours(raw, raw_inverse, queries[rows], reference_k)  # [b, reference_k]
        found = _top_neighbours(recon, recon_inverse, queries[rows], max(ks))  # [b, max(ks)]
        is_true = (found[:, :, None] == truth[:, None, :]).any(dim=2)  # [b, max(ks)]
        hits += is_true.cumsum(dim=1)[:, last].sum(0)
    recall = hits / (len(queries) * reference_k)
    return {f"recall@{k}": r for k, r in zip(ks, recall.tolist(), strict=True)}


def _prefix_rmse(quantizer: ResidualQuantizer, x: Tensor, codes: Tensor, levels: int,
                 chunk_size: int = 4096) -> float:
    """:func:`rmse` of ``x: [N, D]`` against the decode of the first ``levels`` levels of ``codes: [N, L]``."""
    total = sum(((x[rows] - quantizer.decode(codes[rows, :levels])) ** 2).sum(dtype=torch.float64).item()
                for rows in row_chunks(len(x), chunk_size))
    return math.sqrt(total / x.numel())


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
        **code_balance(codes, quantizer.cardinalities),
        **collisions(codes),
    }
    if isinstance(quantizer, ResidualQuantizer) and hasattr(quantizer, "history_"):
        report.update(reseeding(quantizer.history_, quantizer.levels))
    if len(signals) == 1:
        x_all, x_hat = next(iter(signals.values())), quantizer.decode(codes)
        report.update(rmse=rmse(x_all, x_hat), cosine_loss=cosine_loss(x_all, x_hat))
        if isinstance(quantizer, RQGMM):
            report["rmse_posterior_mean"] = rmse(x_all, quantizer.posterior_mean_reconstruction(x_all))
    else:
        decoded = quantizer.decode_signals(codes)
        report.update(rmse={m: rmse(v, decoded[m]) for m, v in signals.items()},
                      cosine_loss={m: cosine_loss(v, decoded[m]) for m, v in signals.items()})
        x_all = torch.cat([F.normalize(v, dim=1) for v in signals.values()], dim=1)
        x_hat = torch.cat([F.normalize(decoded[m].float(), dim=1) for m in signals], dim=1)
    if isinstance(quantizer, ResidualQuantizer):  # decoded chunk by chunk: no [N, D] prefix reconstructions
        report["rmse_per_level"] = [_prefix_rmse(quantizer, x_all, codes, level + 1)
                                    for level in range(codes.shape[1] - 1)] + [report["rmse"]]
    ks = [k for k in ks if k < len(x_all)]
    if ks and len(x_all) > 20:
        report.update(recall_at_k(x_all, x_hat, ks, num_queries=num_queries, seed=seed))
    return report
