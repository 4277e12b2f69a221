"""PMA: pooled multi-head attention over a user's history (Set Transformer; the SIDE paper's history block).

``U = softmax(Q Kᵀ / sqrt(d_h)) V`` per head, with ``V = [e_1 … e_L]`` the history embeddings, ``K = V Θ`` and
``k`` queries ``Q`` derived from other features (the candidate, or candidate and user embeddings concatenated).
Implements :class:`~torchrec_sid.modules.sequence.HistoryBlock`, so a model swaps it for DIN, SIM, mean pooling
or DMQN by config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from torchrec_sid.modules.history import HistoryBlock, check_history_inputs, masked_softmax


class PMA(HistoryBlock):
    """Pooled multi-head attention: ``k`` queries attend over the history, outputs flattened to ``[B, k * D]``.

    Queries: ``Q = S + (candidate W_q + b_q).view(B, k, D)``, learned seeds ``S: [k, D]`` (Set Transformer's PMA)
    shifted by a learned map of the query features. Keys ``K = V Θ``; values are the history embeddings ``V``
    themselves, split into ``num_heads`` heads of ``D / num_heads`` dims. Padded events are never read; a row with no
    events gives zeros. With ``k > 1`` the ``k`` pooled vectors ``U: [B, k, D]`` are concatenated, query-major:
    ``out[:, j * D:(j + 1) * D] = U[:, j]``.

    Args:
        embedding_dim: D of the history embeddings.
        num_outputs: k, the number of queries (pooled vectors); ``output_dim = k * D``.
        num_heads: attention heads; must divide D.
        query_dim: width of the ``candidate`` input the queries are derived from (None: D).

    Example::

        # 2 users: history_item_ids [[3, 1, 4], [1]]; candidates item_id [5, 9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["history_item_ids", "item_id"], values=torch.tensor([3, 1, 4, 1, 5, 9]),
            lengths=torch.tensor([3, 1, 1, 1]),
        )
        table = EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=10,
                                feature_names=["history_item_ids", "item_id"])
        embedded = EmbeddingCollection(tables=[table])(kjt)  # feature -> JaggedTensor, values [sum L, 8]
        history, mask = jagged_to_padded(embedded["history_item_ids"], max_len=4)  # [2, 4, 8], [2, 4]
        pma = PMA(embedding_dim=8, num_outputs=2, num_heads=2)
        pma(history, mask, candidate=embedded["item_id"].values())  # [2, 16]: 2 pooled vectors per user
    """

    def __init__(self, embedding_dim: int, num_outputs: int = 1, num_heads: int = 1,
                 query_dim: int | None = None) -> None:
        super().__init__()
        query_dim = embedding_dim if query_dim is None else query_dim
        if min(embedding_dim, num_outputs, num_heads, query_dim) < 1 or embedding_dim % num_heads:
            raise ValueError(f"PMA: embedding_dim, num_outputs, num_heads, query_dim must be positive and num_heads "
                             f"must divide embedding_dim, got {embedding_dim}, {num_outputs}, {num_heads}, {query_dim}")
        self.embedding_dim = embedding_dim
        self.num_outputs = num_outputs
        self.num_heads = num_heads
        self.query_dim = query_dim
        self.output_dim = num_outputs * embedding_dim
        self.seeds = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_outputs, embedding_dim)))
        self.query_proj = nn.Linear(query_dim, num_outputs * embedding_dim)
        self.key_proj = nn.Linear(embedding_dim, embedding_dim, bias=False)  # Θ

    def _check_candidate(self, candidate: Tensor, batch_size: int) -> None:
        if is_fx_symbolic_tracing():
            return
        if tuple(candidate.shape) != (batch_size, self.query_dim):
            raise ValueError(f"PMA: candidate must be [B, query_dim]={(batch_size, self.query_dim)}, got shape "
                             f"{tuple(candidate.shape)}")

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, n, D]`` → ``[B, heads, n, D / heads]``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor:
        """``history: [B, L, D]``, ``mask: [B, L]`` bool, ``candidate: [B, query_dim]`` → ``[B, k * D]``.

        Other inputs unused.
        """
        check_history_inputs("PMA", self.embedding_dim, history, mask)
        self._check_candidate(candidate, history.size(0))
        values = torch.where(mask[..., None], history, 0.0)  # padding never read, even NaN
        queries = self.seeds + self.query_proj(candidate).unflatten(-1, (self.num_outputs, self.embedding_dim))
        q, k, v = self._heads(queries), self._heads(self.key_proj(values)), self._heads(values)
        logits = q @ k.transpose(-1, -2) / (self.embedding_dim // self.num_heads) ** 0.5  # [B, heads, k, L]
        valid = mask[:, None, None, :]
        weights = masked_softmax(logits, valid)
        pooled = (weights @ v).transpose(1, 2).flatten(-2)  # [B, k, D]
        return pooled.flatten(1)
