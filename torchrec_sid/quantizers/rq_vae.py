"""RQ-VAE: an autoencoder whose latent is quantized by ``levels`` residual codebooks (the neural baseline).

Level ``l`` quantizes the residual ``r_l = z - sum_{j<l} c_j`` to its nearest codeword ``c_l`` (L2); the decoder
reads ``z + sg(sum_l c_l - z)``. Loss per level: ``||sg(r_l) - c_l||^2 + commitment ||r_l - sg(c_l)||^2``.
Codebooks start from residual k-means on the encoder outputs of up to ``init_rows`` training rows; codes unused
in an epoch are re-seeded (:class:`~torchrec_sid.quantizers.autoencoder.VectorCodebook`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from torchrec_sid.quantizers.autoencoder import Bottleneck, Quantized, VectorCodebook, straight_through
from torchrec_sid.quantizers.base import integer, real, register, setting
from torchrec_sid.quantizers.fusion import FusionQuantizer


class ResidualVQ(Bottleneck):
    """``levels`` L2 codebooks of ``codebook_size`` codewords over residuals of ``z: [B, latent_dim]``."""

    def __init__(self, levels: int, codebook_size: int, latent_dim: int, commitment: float) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.codebooks = nn.ModuleList(VectorCodebook(codebook_size, latent_dim, "l2", commitment)
                                       for _ in range(levels))

    @property
    def level_codebooks(self) -> list[VectorCodebook]:
        """The codebook of each level."""
        return cast(list[VectorCodebook], list(self.codebooks))

    def forward(self, z: Tensor) -> Quantized:
        residual, total, codes, loss = z, torch.zeros_like(z), [], z.new_zeros(())
        for codebook in self.level_codebooks:
            level = codebook(residual)
            residual = residual - level.z_q.detach()
            total = total + level.z_q.detach()
            codes.append(level.codes)
            loss = loss + level.loss
        return Quantized(straight_through(z, total), torch.cat(codes, dim=1), loss)

    def lookup(self, codes: Tensor) -> Tensor:
        return sum((cb.weight[codes[:, level]] for level, cb in enumerate(self.level_codebooks)),
                   start=torch.zeros(len(codes), self.latent_dim))

    @torch.no_grad()
    def initialise(self, z: Tensor, generator: torch.Generator) -> None:
        """Residual k-means: level ``l``'s codewords from k-means on the residuals left by levels ``< l``."""
        residual = z.clone()
        for codebook in self.level_codebooks:
            codebook.initialise(residual, generator)
            residual -= codebook.weight[codebook.assign(residual)]


@register("rq_vae")
@dataclass(kw_only=True, eq=False)
class RQVAE(FusionQuantizer):
    """RQ-VAE: MLP encoder, residual vector quantization (``levels`` x ``codebook_size``), MLP decoder.

    Args:
        levels: number of residual codebooks (SID length).
        codebook_size: K, codewords per level (``levels * log2 K`` bits).
        latent_dim: width of the quantized latent.
        commitment: weight of the commitment loss.
        signals, signal_weights, hidden_dim and the training settings (max_epochs, batch_size, lr, patience, tol,
            valid_frac, init_rows, chunk_size, seed): as in :class:`~torchrec_sid.quantizers.fusion.FusionQuantizer`.

    Example::

        x = torch.randn(1000, 32)  # [N, D]
        q = RQVAE(levels=2, codebook_size=16, max_epochs=5).fit(x)
        codes = q.encode(x)  # [1000, 2], values in [0, 16)
        x_hat = q.decode(codes)  # [1000, 32], unit rows (cosine loss)
    """

    levels: int = setting(3, integer(1))
    codebook_size: int = setting(256, integer(1))
    latent_dim: int = setting(32, integer(1))
    commitment: float = setting(0.25, real(0.0))

    @property
    def cardinalities(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def _bottleneck(self) -> ResidualVQ:
        return ResidualVQ(self.levels, self.codebook_size, self.latent_dim, self.commitment)
