"""HSTU (Zhai et al., "Actions Speak Louder than Words", 2024): pointwise aggregated attention, stackable.

One layer, on a padded sequence ``x: [B, L, D]`` with ``mask: [B, L]``::

    U, V, Q, K = split(SiLU(f1(LayerNorm(x))))                    per head: d_v, d_v, d_qk, d_qk
    A = SiLU(Q Kᵀ + rab_pos(j − i) + rab_time(|t_j − t_i|)) / n   no softmax; n = valid tokens of the row
    y = x + f2(LayerNorm(A V) ⊙ U)

Padded keys get no weight and padded positions output zeros, so padding never changes the valid outputs.
Attention is O(L²): meant for short sequences such as DMQN's ~100 cluster tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def time_buckets(dt: Tensor, num_buckets: int) -> Tensor:
    """Log2 buckets of time differences: ``floor(log2(1 + |dt|))`` clamped to ``[0, num_buckets - 1]``.

    With seconds, bucket 12 ≈ 1 hour, 16 ≈ 18 hours, 20 ≈ 12 days, 25 ≈ 1 year.
    """
    return torch.log2(1.0 + dt.abs().double()).floor().clamp(0, num_buckets - 1).long()


class HSTULayer(nn.Module):
    """One HSTU layer: SiLU pointwise projection, SiLU pointwise attention with relative biases, U-gating.

    Args:
        embedding_dim: D.
        num_heads: H.
        attention_dim: d_qk per head.
        linear_dim: d_v per head.
        max_relative_position: position differences are clipped to ``±max_relative_position``, each value with
            a learned bias per head; None: no position bias (tokens without an order, e.g. clusters).
        num_time_buckets: learned bias per head for each :func:`time_buckets` bucket of ``|t_j − t_i|``; 0: no
            time bias (then passing timestamps is an error).
        causal: token i attends only to tokens j <= i.
        dropout: on the layer's update before the residual.

    Example::

        layer = HSTULayer(embedding_dim=8, num_heads=2, num_time_buckets=32)
        x, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
        timestamps = torch.tensor([[100, 160, 4000, 0], [50, 0, 0, 0]])  # seconds
        layer(x, mask, timestamps)  # [2, 4, 8]; zeros at padded positions
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 2,
        attention_dim: int = 16,
        linear_dim: int = 16,
        max_relative_position: int | None = 64,
        num_time_buckets: int = 0,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = {"embedding_dim": embedding_dim, "num_heads": num_heads, "attention_dim": attention_dim,
                 "linear_dim": linear_dim}
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"HSTULayer: {name} must be positive, got {value}")
        if max_relative_position is not None and max_relative_position < 0:
            raise ValueError(f"HSTULayer: max_relative_position must be >= 0 or None, got {max_relative_position}")
        if num_time_buckets < 0:
            raise ValueError(f"HSTULayer: num_time_buckets must be >= 0, got {num_time_buckets}")
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.split_sizes = [num_heads * linear_dim] * 2 + [num_heads * attention_dim] * 2
        self.max_relative_position = max_relative_position
        self.num_time_buckets = num_time_buckets
        self.causal = causal
        self.input_norm = nn.LayerNorm(embedding_dim)
        self.uvqk = nn.Linear(embedding_dim, sum(self.split_sizes))
        self.attention_norm = nn.LayerNorm(num_heads * linear_dim)
        self.output = nn.Linear(num_heads * linear_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        if max_relative_position is not None:
            self.position_bias = nn.Parameter(0.02 * torch.randn(num_heads, 2 * max_relative_position + 1))
        if num_time_buckets:
            self.time_bias = nn.Parameter(0.02 * torch.randn(num_heads, num_time_buckets))

    def _check(self, x: Tensor, mask: Tensor, timestamps: Tensor | None) -> None:
        if is_fx_symbolic_tracing():
            return
        if x.dim() != 3 or x.size(-1) != self.embedding_dim:
            raise ValueError(f"HSTULayer: x must be [B, L, D={self.embedding_dim}], got shape {tuple(x.shape)}")
        if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"HSTULayer: mask must be bool [B, L]={tuple(x.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if timestamps is not None and not self.num_time_buckets:
            raise ValueError("HSTULayer: timestamps given but the layer has no time bias (num_time_buckets=0)")
        if timestamps is not None and timestamps.shape != x.shape[:2]:
            raise ValueError(f"HSTULayer: timestamps must be [B, L]={tuple(x.shape[:2])}, got shape "
                             f"{tuple(timestamps.shape)}")

    def _bias(self, length: int, device: torch.device, timestamps: Tensor | None) -> Tensor | float:
        """Relative attention bias, ``[B or 1, H, L, L]`` (0.0 when the layer has none)."""
        bias: Tensor | float = 0.0
        if self.max_relative_position is not None:
            positions = torch.arange(length, device=device)
            relative = (positions[None, :] - positions[:, None]).clamp(-self.max_relative_position,
                                                                      self.max_relative_position)
            bias = self.position_bias[:, relative + self.max_relative_position][None]  # [1, H, L, L]
        if timestamps is not None:
            buckets = time_buckets(timestamps[:, None, :] - timestamps[:, :, None], self.num_time_buckets)
            bias = bias + self.time_bias[:, buckets].transpose(0, 1)  # [B, H, L, L]
        return bias

    def forward(self, x: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """``x: [B, L, D]``, ``mask: [B, L]`` bool, ``timestamps: [B, L]`` (int or float) → ``[B, L, D]``."""
        self._check(x, mask, timestamps)
        x = torch.where(mask[..., None], x, 0.0)
        if timestamps is not None:
            timestamps = torch.where(mask, timestamps, 0)
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split(self.split_sizes, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        scores = q @ k.transpose(-1, -2) + self._bias(x.size(1), x.device, timestamps)  # [B, H, L, L]
        allowed = mask[:, None, None, :]
        if self.causal:
            positions = torch.arange(x.size(1), device=x.device)
            allowed = allowed & (positions[None, :] <= positions[:, None])
        valid = mask.sum(dim=1).clamp(min=1).to(x.dtype)[:, None, None, None]
        attention = torch.where(allowed, F.silu(scores), 0.0) / valid
        mixed = (attention @ v).transpose(1, 2).flatten(2)  # [B, L, H * d_v]
        y = x + self.dropout(self.output(self.attention_norm(mixed) * u))
        return torch.where(mask[..., None], y, 0.0)


class HSTU(nn.Module):
    """A stack of :class:`HSTULayer`, applied in order with the same mask and timestamps.

    Args:
        layers: the layers (all with the same ``embedding_dim``).

    Example::

        hstu = HSTU([HSTULayer(embedding_dim=8) for _ in range(2)])
        x, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
        hstu(x, mask)  # [2, 4, 8]
    """

    def __init__(self, layers: Sequence[HSTULayer]) -> None:
        super().__init__()
        if not layers or len({layer.embedding_dim for layer in layers}) != 1:
            raise ValueError(f"HSTU: needs one or more layers of one embedding_dim, got "
                             f"{[layer.embedding_dim for layer in layers]}")
        self.embedding_dim = layers[0].embedding_dim
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """``x: [B, L, D]``, ``mask: [B, L]`` bool, ``timestamps: [B, L]`` → ``[B, L, D]``."""
        for layer in self.layers:
            x = layer(x, mask, timestamps)
        return x
