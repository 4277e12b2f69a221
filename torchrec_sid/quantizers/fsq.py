"""FSQ (finite scalar quantization): a bounded latent rounded per dimension; the codebook is implicit.

Dimension ``j`` of the latent ``z: [B, n]`` has ``L_j`` levels and centre ``m_j = (L_j - 1) / 2``:
``y_j = m_j tanh(z_j) + m_j`` lies in ``(0, L_j - 1)``; the digit is ``c_j = round(y_j)`` in ``{0, ..., L_j - 1}``
(straight-through); the decoder reads ``(c_j - m_j) / m_j`` in ``[-1, 1]``, symmetric for odd and even ``L_j``.
Ternary FSQ is ``levels = [3] * n`` (values {-1, 0, 1}). No codebook, so no codebook or commitment loss.
The code of an item is its digit vector: ordinal digits with centres ``m_j``, which SIDE reads without a table
(:attr:`FSQ.digit_centres`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchrec_sid.quantizers.autoencoder import Bottleneck, Quantized, straight_through
from torchrec_sid.quantizers.base import register, setting
from torchrec_sid.quantizers.fusion import FusionQuantizer


def check_levels(name: str, levels: Any) -> None:
    """The check of FSQ's ``levels``: a non-empty list (or tuple) of integer level counts, each >= 2."""
    if not isinstance(levels, Sequence) or isinstance(levels, str) or not levels:
        raise ValueError(f"{name} must list each latent dimension's number of levels (integers >= 2), e.g. "
                         f"[8, 8, 8, 5, 5, 5], got {levels!r}")
    for j, count in enumerate(levels):
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ValueError(f"{name}[{j}] = {count!r}: every dimension needs an integer number of levels >= 2")


class FSQBottleneck(Bottleneck):
    """Rounds ``z: [B, len(levels)]`` to per-dimension digits; ``lookup`` maps digits to values in [-1, 1]."""

    centre: Tensor  # [n], (L_j - 1) / 2

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        self.latent_dim = len(levels)
        check_levels("levels", levels)
        self.register_buffer("centre", (torch.tensor(list(levels), dtype=torch.float32) - 1) / 2,
                             persistent=False)

    def forward(self, z: Tensor) -> Quantized:
        bounded = self.centre * torch.tanh(z) + self.centre  # [B, n] in (0, L - 1)
        digits = bounded.round()
        rounded = straight_through(bounded, digits)
        return Quantized((rounded - self.centre) / self.centre, digits.long(), z.new_zeros(()))

    def lookup(self, codes: Tensor) -> Tensor:
        return (codes.float() - self.centre) / self.centre


@register("fsq")
@dataclass(kw_only=True, eq=False)
class FSQ(FusionQuantizer):
    """Finite scalar quantization: MLP encoder to ``len(levels)`` bounded dimensions, rounding, MLP decoder.

    Args:
        levels: number of levels per latent dimension, e.g. ``[8, 8, 8, 5, 5, 5]`` or ``[3] * 15`` (ternary);
            ``sum_j log2 L_j`` bits.
        signals, signal_weights, hidden_dim and the training settings (max_epochs, batch_size, lr, patience, tol,
            valid_frac, init_rows, chunk_size, seed): as in :class:`~torchrec_sid.quantizers.fusion.FusionQuantizer`.

    Codes: ``[N, len(levels)]``, digit ``j`` in ``[0, levels[j])``; :attr:`digit_centres` = ``(L_j - 1) / 2``.

    Example::

        x = torch.randn(1000, 32)  # [N, D]
        q = FSQ(levels=[8, 5, 5, 5], max_epochs=5).fit(x)
        codes = q.encode(x)  # [1000, 4]; codes[:, 0] in [0, 8), the others in [0, 5)
        packed = pack_codes(codes, q.cardinalities)  # [1000], one integer per item (torchrec_sid.sid)
    """

    levels: Sequence[int] = setting(check=check_levels, factory=lambda: [8, 8, 8, 5, 5, 5])

    @property
    def cardinalities(self) -> list[int]:
        return list(self.levels)

    @property
    def digit_centres(self) -> list[float]:
        return [(count - 1) / 2 for count in self.levels]

    def _bottleneck(self) -> FSQBottleneck:
        return FSQBottleneck(self.levels)
