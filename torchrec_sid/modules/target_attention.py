"""Long-history baselines: DIN target attention, SIM hard search + target attention, and mean pooling.

All three implement :class:`~torchrec_sid.modules.sequence.HistoryBlock`; :class:`TargetAttention` (DIN's
activation unit) is also DMQN's cluster-aware target attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchrec_sid.modules.history import HistoryBlock, check_history_inputs, masked_softmax


class TargetAttention(nn.Module):
    """DIN activation unit: candidates attend over keys with weights from an MLP over ``[t, e, t−e, t⊙e]``.

    ``w = softmax over valid events of MLP([t, e, t−e, t⊙e])``, output ``Σ w·e``. The weights are normalised
    (softmax) rather than DIN's raw scores, so the output's scale does not grow with L. The MLP's first layer is
    stored in the equivalent form ``t·A + e·B + (t⊙e)·C + b``; ``e·B`` is computed once per key, not per pair.

    Args:
        embedding_dim: D of keys and queries.
        hidden_dims: widths of the MLP's hidden layers (PReLU after each).

    Example::

        attention = TargetAttention(embedding_dim=8)
        keys, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
        attention(keys, mask, queries=torch.randn(2, 3, 8))  # [2, 3, 8]: 3 candidates per row
    """

    def __init__(self, embedding_dim: int, hidden_dims: Sequence[int] = (80, 40)) -> None:
        super().__init__()
        if embedding_dim <= 0 or not hidden_dims or min(hidden_dims) <= 0:
            raise ValueError(f"TargetAttention: embedding_dim and hidden_dims must be positive and non-empty, "
                             f"got {embedding_dim} and {tuple(hidden_dims)}")
        first = hidden_dims[0]
        self.query_proj = nn.Linear(embedding_dim, first)
        self.key_proj = nn.Linear(embedding_dim, first, bias=False)
        self.product_weight = nn.Parameter(torch.randn(embedding_dim, first) / embedding_dim**0.5)
        layers: list[nn.Module] = [nn.PReLU()]
        for width_in, width_out in zip(hidden_dims, [*hidden_dims[1:], 1]):
            layers += [nn.Linear(width_in, width_out), nn.PReLU()]
        self.mlp = nn.Sequential(*layers[:-1])

    def forward(self, keys: Tensor, mask: Tensor, queries: Tensor) -> Tensor:
        """``keys: [B, L, D]``, ``mask: [B, L]`` bool, ``queries: [B, C, D]`` → ``[B, C, D]``.

        A row with no valid key gives zeros; padded keys are never read.
        """
        keys = torch.where(mask[..., None], keys, 0.0)
        pairs = keys[:, None] @ (queries[..., :, None] * self.product_weight)  # [B, C, L, H]
        hidden = pairs + self.key_proj(keys)[:, None] + self.query_proj(queries)[:, :, None]
        logits = self.mlp(hidden).squeeze(-1)  # [B, C, L]
        valid = mask[:, None, :]
        weights = masked_softmax(logits, valid)
        return weights @ keys


class DIN(HistoryBlock):
    """DIN: target attention of the candidate over every event of the history (cost O(L) per candidate).

    Args:
        embedding_dim: D of history and candidate embeddings; also ``output_dim``.
        attention_hidden_dims: hidden widths of the activation unit.

    Example::

        # 2 users: 3 events and 1 event (padded to L=3), one candidate each
        din = DIN(embedding_dim=8)
        history, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
        din(history, mask, candidate=torch.randn(2, 8))  # [2, 8]
    """

    def __init__(self, embedding_dim: int, attention_hidden_dims: Sequence[int] = (80, 40)) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.output_dim = embedding_dim
        self.attention = TargetAttention(embedding_dim, attention_hidden_dims)

    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor:
        """``history: [B, L, D]``, ``mask: [B, L]``, ``candidate: [B, D]`` → ``[B, D]``; other inputs unused."""
        check_history_inputs("DIN", self.embedding_dim, history, mask, candidate)
        return self.attention(history, mask, candidate[:, None]).squeeze(1)


@torch.fx.wrap
def hard_search(mask: Tensor, history_keys: Tensor, candidate_key: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """SIM's hard search: the ``k = min(top_k, L)`` most recent valid events whose key equals the candidate's.

    ``mask, history_keys: [B, L]`` (events oldest first), ``candidate_key: [B]`` → ``(index [B, k] long,
    found [B, k] bool)``; ``found`` is False where a row has fewer than k matching events. An fx leaf, since k
    depends on L.
    """
    match = mask & (history_keys == candidate_key[:, None])
    positions = torch.arange(mask.size(1), device=mask.device)
    recency, index = torch.where(match, positions, -1).topk(min(top_k, mask.size(1)), dim=1)
    return index, recency >= 0


class SIM(HistoryBlock):
    """SIM (hard search): target attention over the ``top_k`` most recent events sharing the candidate's key.

    The key is a category per event: a genre, or a SID prefix. Needs ``history_keys: [B, L]`` and
    ``candidate_key: [B]`` (long); ignores ``history_timestamps``.

    Args:
        embedding_dim: D of history and candidate embeddings; also ``output_dim``.
        top_k: events kept per candidate.
        attention_hidden_dims: hidden widths of the activation unit.

    Example::

        sim = SIM(embedding_dim=8, top_k=2)
        history, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
        genres = torch.tensor([[3, 5, 3, 3], [5, 3, 0, 0]])  # one genre per event
        sim(history, mask, torch.randn(2, 8), history_keys=genres, candidate_key=torch.tensor([3, 5]))
        # row 0 attends over events 2 and 3 (the 2 most recent with genre 3), row 1 over event 0: [2, 8]
    """

    def __init__(self, embedding_dim: int, top_k: int = 200, attention_hidden_dims: Sequence[int] = (80, 40)) -> None:
        super().__init__()
        if top_k <= 0:
            raise ValueError(f"SIM: top_k must be positive, got {top_k}")
        self.embedding_dim = embedding_dim
        self.output_dim = embedding_dim
        self.top_k = top_k
        self.attention = TargetAttention(embedding_dim, attention_hidden_dims)

    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor:
        """``history: [B, L, D]``, ``mask: [B, L]``, ``candidate: [B, D]``, ``history_keys: [B, L]``,
        ``candidate_key: [B]`` → ``[B, D]``."""
        if history_keys is None or candidate_key is None:
            raise ValueError("SIM: hard search needs history_keys [B, L] and candidate_key [B] (e.g. genre ids)")
        check_history_inputs("SIM", self.embedding_dim, history, mask, candidate,
                             history_keys=history_keys, candidate_key=candidate_key)
        index, found = hard_search(mask, history_keys, candidate_key, self.top_k)
        selected = history.gather(1, index[..., None].expand(-1, -1, history.size(-1)))  # [B, k, D]
        return self.attention(selected, found, candidate[:, None]).squeeze(1)


class MeanPooling(HistoryBlock):
    """Mean of the valid history embeddings; ignores the candidate.

    Args:
        embedding_dim: D; also ``output_dim``.

    Example::

        pooling = MeanPooling(embedding_dim=8)
        history, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
        pooling(history, mask, candidate=torch.randn(2, 8))  # [2, 8]; row 1 (no events) is zeros
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.output_dim = embedding_dim

    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor:
        """``history: [B, L, D]``, ``mask: [B, L]`` → ``[B, D]``; other inputs unused."""
        check_history_inputs("MeanPooling", self.embedding_dim, history, mask, candidate)
        total = torch.where(mask[..., None], history, 0.0).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
