"""DPCA (Discrete-PCA, SIDE): residual structured quantization with scalar weights along learned directions.

The latent ``z: [B, d]`` is batch-normalised (zero mean, unit variance per dimension, no affine; running
statistics at inference) and split into ``groups`` product-quantization groups of ``d / groups`` dimensions. In
each group, level ``l`` has a direction ``u_l`` and an offset ``b_l`` and quantizes the residual ``r_l`` (what
levels ``< l`` left) to the nearest of the ``buckets`` collinear points ``{s u_l + b_l}``, ``s`` in the centred
scalar codebook ``{-m, -m + 1, ..., m}``, ``m = (buckets - 1) / 2``: ``c_l = clamp(round(<r_l - b_l, u_l> /
||u_l||^2 + m), 0, buckets - 1)``, ``s_l = c_l - m``, ``r_{l+1} = r_l - (s_l u_l + b_l)``. A group reconstructs
``sum_l (s_l u_l + b_l)``. ``buckets = 3`` (the default) is the paper's ternary DPCA, s in {-1, 0, 1}: PCA with
projection weights restricted to three values; the paper's ranking setups use 4 and 64 buckets (SIDE section
6.2.1). ``u_l`` is not unit: its norm is the step of the uniform scalar quantizer.

Training: the decoder reads ``z + sg(z_q - z)``; per level the VQ-VAE codebook term
``||sg(r_l) - (s_l u_l + b_l)||^2`` trains ``u_l`` and ``b_l`` (a Lloyd step for collinear codewords), plus a
commitment term of weight ``commitment`` in one of two forms (``commitment_target``):

* ``"total"`` (default): ``||z - sg(sum_l q_l)||^2`` on the full reconstruction, once (VQ-VAE's commitment with
  the whole stack as the codebook; one reading of the paper's "commitment and codebook losses").
* ``"level"``: per level on the cumulative reconstruction, ``||r_l - sg(q_l)||^2 = ||z - sg(sum_{j<=l} q_j)||^2``
  (RQ-VAE's form).

Measured (``benchmarks/side_tables.py --dpca``: MovieLens text, 3 groups x 5 ternary levels, latent 48, 60 epochs,
seed 0): at commitment 0.25 the per-level form collapses the codes (1 distinct code of 1,682 items, cosine loss
0.321) while the full-reconstruction form does not (1,547 codes, 0.249), hence ``"total"`` is the default form;
``commitment = 0`` (the default) still gives the lowest cosine loss (0.189, 1,657 codes), the batch normalisation
fixing the latent's scale, which is what commitment guards in VQ-VAE. The paper's ranking setups at 1 group x 9
levels: 4 buckets 0.204 (18 bits), 64 buckets 0.194 (54 bits, digit utilisation 0.28).
Initialisation (on the encoder outputs of up to ``init_rows`` training rows): the normalisation's statistics,
then level by level ``b_l`` = the residual's mean and ``u_l`` = its top principal direction scaled by the step of
the optimal uniform ``buckets``-level quantizer of a Gaussian times the projection's standard deviation (1.224 for
3 levels, the Lloyd-Max ternary quantizer: thresholds +-0.612 sigma; 0.996 for 4; 0.104 for 64).

Codes: ``[N, depth * groups]`` digits ``c = s + m`` in ``[0, buckets)``, level-major (all groups' level-0 digits
first), so a prefix of ``groups * l`` digits is the coarse code of the first ``l`` levels (Matryoshka-like).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_sid.quantizers.autoencoder import Bottleneck, Quantized, straight_through, vq_loss
from torchrec_sid.quantizers.base import integer, one_of, real, register, setting
from torchrec_sid.quantizers.fusion import FusionQuantizer

TERNARY_SCALE = 1.224  # Lloyd-Max 3-level quantizer of N(0, 1): levels 0, +-1.224; thresholds +-0.612
COMMITMENT_TARGETS = ("total", "level")


@cache
def gaussian_uniform_step(buckets: int) -> float:
    """The step of the uniform ``buckets``-level quantizer (levels centred on 0) with the least mean squared error
    on N(0, 1), by quadrature and a grid search: 1.224 for 3 levels, 0.996 for 4, 0.104 for 64."""
    x = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    density = torch.exp(-x * x / 2)
    density /= density.sum()
    m = (buckets - 1) / 2
    steps = torch.linspace(0.01, 2.0, 1991, dtype=torch.float64)
    digits = torch.clamp(torch.round(x[None] / steps[:, None] + m), 0, buckets - 1) - m
    error = (((x[None] - digits * steps[:, None]) ** 2) * density).sum(1)
    return float(steps[error.argmin()])


class DPCABottleneck(Bottleneck):
    """Residual scalar quantization (``buckets`` values per digit) of ``z: [B, latent_dim]`` in ``groups`` groups of
    ``depth`` levels.

    Parameters: ``directions: [groups, depth, latent_dim / groups]`` (``u``), ``offsets`` of the same shape (``b``);
    ``norm``: the latent's batch normalisation.
    """

    def __init__(self, groups: int, depth: int, latent_dim: int, commitment: float, buckets: int = 3,
                 commitment_target: str = "total") -> None:
        super().__init__()
        if latent_dim % groups:
            raise ValueError(f"latent_dim={latent_dim} must be a multiple of groups={groups}")
        if buckets < 2:
            raise ValueError(f"buckets={buckets}: a digit needs at least 2 values")
        if commitment_target not in COMMITMENT_TARGETS:
            raise ValueError(f"commitment_target must be one of {list(COMMITMENT_TARGETS)}, got {commitment_target!r}")
        group_dim = latent_dim // groups
        self.latent_dim, self.groups, self.depth, self.commitment = latent_dim, groups, depth, commitment
        self.buckets, self.centre, self.commitment_target = buckets, (buckets - 1) / 2, commitment_target
        self.norm = nn.BatchNorm1d(latent_dim, affine=False)
        self.directions = nn.Parameter(torch.randn(groups, depth, group_dim) / group_dim**0.5)
        self.offsets = nn.Parameter(torch.zeros(groups, depth, group_dim))

    def _digits(self, residual: Tensor, level: int) -> Tensor:
        """``residual: [B, groups, group_dim]`` -> digits ``c: [B, groups]`` in ``[0, buckets)`` (float)."""
        u, b = self.directions[:, level].detach(), self.offsets[:, level].detach()
        coefficient = ((residual - b) * u).sum(-1) / (u * u).sum(-1).clamp_min(1e-12)
        return (coefficient + self.centre).round().clamp(0, self.buckets - 1)

    def forward(self, z: Tensor) -> Quantized:
        z = self.norm(z)
        residual = z.view(len(z), self.groups, -1)
        per_level = self.commitment if self.commitment_target == "level" else 0.0
        total, digits, loss = torch.zeros_like(residual), [], z.new_zeros(())
        for level in range(self.depth):
            c = self._digits(residual.detach(), level)  # [B, G]
            q = (c - self.centre)[..., None] * self.directions[:, level] + self.offsets[:, level]  # [B, G, group_dim]
            loss = loss + vq_loss(residual.flatten(1), q.flatten(1), per_level)
            residual = residual - q.detach()
            total = total + q.detach()
            digits.append(c)
        if self.commitment_target == "total" and self.commitment:
            loss = loss + self.commitment * ((z - total.flatten(1)) ** 2).sum(-1).mean()
        codes = torch.stack(digits, dim=1).long().flatten(1)  # [B, depth * G], level-major
        return Quantized(straight_through(z, total.flatten(1)), codes, loss)

    def lookup(self, codes: Tensor) -> Tensor:
        s = codes.view(len(codes), self.depth, self.groups).float() - self.centre  # [B, depth, G]
        return (torch.einsum("blg,glk->bgk", s, self.directions) + self.offsets.sum(1)).flatten(1)

    @torch.no_grad()
    def initialise(self, z: Tensor, generator: torch.Generator) -> None:
        """Level by level and group by group: offset = mean, direction = scaled top principal direction."""
        mean, var = self.norm.running_mean, self.norm.running_var
        assert mean is not None and var is not None  # BatchNorm1d tracks running statistics by default
        mean.copy_(z.mean(0))
        var.copy_(z.var(0))
        scale = TERNARY_SCALE if self.buckets == 3 else gaussian_uniform_step(self.buckets)
        residual = F.batch_norm(z, mean, var).view(len(z), self.groups, -1)
        for level in range(self.depth):
            mean = residual.mean(0)  # [G, group_dim]
            centred = residual - mean
            top = torch.linalg.svd(centred.transpose(0, 1), full_matrices=False).Vh[:, 0]  # [G, group_dim]
            spread = (centred * top).sum(-1).std(0).clamp_min(1e-3)  # [G]
            self.directions[:, level] = scale * spread[:, None] * top
            self.offsets[:, level] = mean
            c = self._digits(residual, level)
            residual -= (c - self.centre)[..., None] * self.directions[:, level] + self.offsets[:, level]


@register("dpca")
@dataclass(kw_only=True, eq=False)
class DPCA(FusionQuantizer):
    """Discrete-PCA: MLP encoder, residual scalar quantization along learned directions in product groups, MLP
    decoder.

    Args:
        groups: p, product-quantization groups (parallel).
        depth: residual levels per group (serial); ``groups * depth`` digits, ``log2(buckets)`` bits each.
        latent_dim: width of the quantized latent, a multiple of ``groups``.
        buckets: values per digit (the scalar codebook): 3 (default) is the paper's ternary DPCA; its ranking
            setups use 4 and 64 (e.g. ``groups=1, depth=9, buckets=64``).
        commitment: weight of the commitment loss (0: none; see the module docstring).
        commitment_target: ``"total"`` (on the full reconstruction, default) or ``"level"`` (per level).
        signals, signal_weights, hidden_dim and the training settings (max_epochs, batch_size, lr, patience, tol,
            valid_frac, init_rows, chunk_size, seed): as in :class:`~torchrec_sid.quantizers.fusion.FusionQuantizer`.

    Codes: ``[N, depth * groups]`` in ``[0, buckets)`` (scalar weight + ``(buckets - 1) / 2``, level-major);
    :attr:`digit_centres` = ``(buckets - 1) / 2`` (1 for ternary).

    Example::

        x = torch.randn(1000, 32)  # [N, D]
        q = DPCA(groups=3, depth=5, latent_dim=48, max_epochs=5).fit(x)  # 15 digits, 23.8 bits
        codes = q.encode(x)  # [1000, 15] in {0, 1, 2}
        sid = pack_codes(codes, q.cardinalities)  # [1000]: sum_k 3^(k-1) (1 + s_k) (torchrec_sid.sid)
    """

    groups: int = setting(3, integer(1))
    depth: int = setting(5, integer(1))
    latent_dim: int = setting(48, integer(1))
    buckets: int = setting(3, integer(2))
    commitment: float = setting(0.0, real(0.0))
    commitment_target: str = setting("total", one_of(*COMMITMENT_TARGETS))

    def _check_param_relations(self) -> None:
        super()._check_param_relations()
        if self.latent_dim % self.groups:
            raise ValueError(f"latent_dim={self.latent_dim} must be a multiple of groups={self.groups}")

    @property
    def cardinalities(self) -> list[int]:
        return [self.buckets] * (self.groups * self.depth)

    @property
    def digit_centres(self) -> list[float]:
        return [(self.buckets - 1) / 2] * (self.groups * self.depth)

    def _bottleneck(self) -> DPCABottleneck:
        return DPCABottleneck(self.groups, self.depth, self.latent_dim, self.commitment, self.buckets,
                              self.commitment_target)
