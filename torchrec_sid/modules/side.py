"""SIDE (Ramasamy et al., ``papers/side.md``): semantic IDs back to embeddings without a table.

A packed SID ``s = sum_l c_l * prod_{j<l} r_j`` (first level least significant, as
:func:`~torchrec_sid.sid.packing.pack_codes`) is unpacked by integer division and modulo (shifts and masks when
every radix is a power of two) into its digits ``c_l``, each recentred (``h_l = c_l - centre_l``: ternary DPCA
digits centre at 1, an FSQ level with ``L`` values at ``(L - 1) / 2``), and the digit vector ``h: [levels]`` is
projected by a learned ``Ω: [levels, d]``. Parameters: ``levels * d`` (plus ``d`` of bias), against
``prod_l r_l * d`` for a table over the same SIDs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.pt2.checks import is_pt2_compiling
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import radix_weights


def _checks_skipped() -> bool:
    """True under fx symbolic tracing and torch.compile / export, where data-dependent checks are skipped."""
    return is_fx_symbolic_tracing() or is_pt2_compiling()


class SIDEmbedding(nn.Module):
    """Table-free SID embedding: packed SIDs → centred digit vectors ``[..., levels]`` → ``[..., output_dim]``.

    ``forward`` embeds a tensor of packed SIDs of any shape; :meth:`pooled` and :meth:`sequence` read a
    KeyedJaggedTensor feature of packed SIDs (so a data pipeline can log only the packed id) and return a pooled
    ``[B, output_dim]`` or a JaggedTensor with values ``[sum L, output_dim]``.

    With ``per_level_projections``, level ``l`` has its own projection ``ω_l: [d]`` and its own output slice:
    the output is the concatenation ``[h_0 ω_0, ..., h_{n-1} ω_{n-1}]`` of width ``levels * d``, so the first
    ``k * d`` dimensions depend on the coarsest ``k`` levels only (a coarse-to-fine embedding). The parameter count
    is the same, ``levels * d``; only the output width changes.

    Args:
        radices: values per level ``r_l`` (the artifact's cardinalities), first level least significant.
        embedding_dim: d.
        centres: subtracted from each level's digit; None: ``(r_l - 1) / 2``, which is the ternary and FSQ centring
            (an artifact's ``digit_centres``, see :meth:`from_semantic_ids`).
        per_level_projections: one projection and one output slice per level (see above).
        bias: add a learned bias (``[d]``, or ``[levels * d]`` with per-level projections).

    Example::

        # 2 examples of DPCA SIDs (4 ternary levels, packed ids in [0, 81));
        # history_sids: [[5, 80], []]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["history_sids"], values=torch.tensor([5, 80]), lengths=torch.tensor([2, 0]),
        )
        side = SIDEmbedding(radices=[3, 3, 3, 3], embedding_dim=16)
        side.unpack(torch.tensor([5]))                 # [[2, 1, 0, 0]]: 5 = 2 + 1 * 3
        side.pooled(features, "history_sids")          # [2, 16]; row 1 (no events) is zeros
        side.sequence(features, "history_sids")        # JaggedTensor: values [2, 16], lengths [2, 0]
        side.num_parameters([3, 3, 3, 3], 16)          # 64, against 81 * 16 rows of a table
    """

    if TYPE_CHECKING:  # buffer types for mypy; TorchScript cannot read class-level annotations here
        radix_weights: Tensor
        radix: Tensor
        bit_shifts: Tensor | None
        centres: Tensor

    def __init__(
        self,
        radices: Sequence[int],
        embedding_dim: int,
        centres: Sequence[float] | None = None,
        per_level_projections: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        weights = radix_weights(radices)  # validates the radices and that packed ids fit int64
        centres = [(r - 1) / 2 for r in radices] if centres is None else list(centres)
        if len(centres) != len(radices):
            raise ValueError(f"SIDEmbedding: {len(centres)} centres for {len(radices)} levels")
        if embedding_dim < 1:
            raise ValueError(f"SIDEmbedding: embedding_dim must be >= 1, got {embedding_dim}")
        self.radices: list[int] = list(radices)
        self.num_levels = len(radices)
        self.embedding_dim = embedding_dim
        self.per_level_projections = per_level_projections
        self.output_dim = embedding_dim * (self.num_levels if per_level_projections else 1)
        self.num_sids = math.prod(self.radices)
        self.register_buffer("radix_weights", weights, persistent=False)
        self.register_buffer("radix", torch.tensor(self.radices), persistent=False)
        power_of_two = all(r & (r - 1) == 0 for r in self.radices)  # then shifts and masks replace division
        self.register_buffer("bit_shifts", weights.log2().long() if power_of_two else None, persistent=False)
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32), persistent=False)
        self.projection = nn.Parameter(self._initial_projection())
        self.bias = nn.Parameter(torch.zeros(self.output_dim)) if bias else None

    def _initial_projection(self) -> Tensor:
        """``[levels, d]`` Gaussian, scaled so that a uniformly random SID's output has about unit variance."""
        variances = torch.tensor([(r * r - 1) / 12 for r in self.radices]).clamp(min=1e-6)  # of a uniform digit
        scale = variances.rsqrt() if self.per_level_projections else variances.sum().rsqrt().expand(self.num_levels)
        return torch.randn(self.num_levels, self.embedding_dim) * scale[:, None]

    @staticmethod
    def num_parameters(radices: Sequence[int], embedding_dim: int, per_level_projections: bool = False,
                       bias: bool = False) -> int:
        """Exact parameter count of ``SIDEmbedding(radices, embedding_dim, ...)``: ``levels * d`` (+ bias)."""
        output_dim = embedding_dim * (len(radices) if per_level_projections else 1)
        return len(radices) * embedding_dim + (output_dim if bias else 0)

    @classmethod
    def from_semantic_ids(
        cls,
        semantic_ids: SemanticIds,
        embedding_dim: int,
        num_levels: int | None = None,
        per_level_projections: bool = False,
        bias: bool = False,
    ) -> SIDEmbedding:
        """A SIDEmbedding for the first ``num_levels`` levels of an artifact with ordinal digits (None: every level
        before the collision suffix, :attr:`~torchrec_sid.sid.SemanticIds.code_levels`).

        Radices are the artifact's cardinalities, centres its ``digit_centres`` (DPCA, FSQ). Raises ValueError for
        an artifact with categorical codes (``digit_centres`` None: RQ-KMeans, RQ-GMM, ...; its codes are indices,
        not values, so only a table embeds them, :class:`SidFeatureTransform`, unless the constructor is given
        radices and centres explicitly) and for ``num_levels`` that reaches the collision-suffix level (an item's
        rank among the items sharing its code, not a digit). Pack the same levels for :meth:`forward`:
        ``pack_codes(codes[:, :side.num_levels], side.radices)``.
        """
        suffix = semantic_ids.suffix_level
        num_levels = semantic_ids.code_levels if num_levels is None else num_levels
        if suffix is not None and num_levels > suffix:
            raise ValueError(f"SIDEmbedding: num_levels={num_levels} would read level {suffix}, the collision "
                             f"suffix of the SemanticIds artifact (cardinality {semantic_ids.cardinalities[suffix]}): "
                             f"it numbers the items that share a code and is no ordinal digit; use "
                             f"num_levels <= {suffix} (the default)")
        if not 1 <= num_levels <= semantic_ids.num_levels:
            raise ValueError(f"SIDEmbedding: num_levels={num_levels} requested, the SemanticIds artifact has "
                             f"{semantic_ids.num_levels} levels")
        if semantic_ids.digit_centres is None:
            raise ValueError(f"SIDEmbedding: the SemanticIds artifact of quantizer {semantic_ids.quantizer!r} has "
                             f"categorical codes (digit_centres is None); SIDE reads ordinal digits (DPCA, FSQ). "
                             f"Use SidFeatureTransform tables, or pass radices and centres to SIDEmbedding")
        return cls(semantic_ids.cardinalities[:num_levels], embedding_dim, semantic_ids.digit_centres[:num_levels],
                   per_level_projections, bias)

    @torch.jit.unused
    def check_packed(self, packed: Tensor, what: str = "input") -> None:
        """Raises ValueError, naming ``what``, the id and the limit, unless ``0 <= packed < prod(radices)``.

        Skipped under fx tracing and compiling, and absent from TorchScript: traced and scripted modules run
        unchecked.
        """
        if _checks_skipped() or packed.numel() == 0:
            return
        bad = (packed < 0) | (packed >= self.num_sids)
        if bool(bad.any()):
            raise ValueError(f"SIDEmbedding: {what} has packed SID {int(packed[bad][0])}, outside "
                             f"[0, {self.num_sids}) for radices {self.radices} ({int(bad.sum())} bad ids)")

    def unpack(self, packed: Tensor) -> Tensor:
        """Packed SIDs ``[...]`` in ``[0, prod(radices))`` → digits ``[..., levels]`` (long): ``pack_codes``'s
        inverse."""
        packed = packed.long()[..., None]
        shifts = self.bit_shifts
        if shifts is not None:  # about 4x faster than integer division
            return (packed >> shifts) & (self.radix - 1)
        return torch.div(packed, self.radix_weights, rounding_mode="trunc") % self.radix

    def digits(self, packed: Tensor) -> Tensor:
        """Packed SIDs ``[...]`` → centred digit vectors ``h: [..., levels]`` (float)."""
        return self.unpack(packed).to(self.centres.dtype) - self.centres

    def project(self, h: Tensor, count: Tensor | None = None) -> Tensor:
        """Centred digits ``h: [..., levels]`` → ``[..., output_dim]``.

        ``count: [...]`` scales the bias, for ``h`` that sums ``count`` digit vectors (pooling before projecting).
        """
        out = (h[..., None] * self.projection).flatten(-2) if self.per_level_projections else h @ self.projection
        if self.bias is None:
            return out
        return out + self.bias if count is None else out + count[..., None].to(out.dtype) * self.bias

    def forward(self, packed: Tensor) -> Tensor:
        """Packed SIDs ``[...]`` (e.g. ``[B]`` or ``[B, L]``) → embeddings ``[..., output_dim]``."""
        if not torch.jit.is_scripting():
            self.check_packed(packed)
        return self.project(self.digits(packed))

    def pooled(self, features: KeyedJaggedTensor, feature_name: str, mean: bool = False) -> Tensor:
        """Sum (or mean) of the embeddings of each example's packed SIDs in ``features[feature_name]``: ``[B, D_out]``
        (``D_out = output_dim``).

        The projection is linear, so digit vectors are pooled first and projected once per example (cost
        O(sum L * levels + B * levels * d)). An example with no values gives zeros.
        """
        jt = features[feature_name]
        values, lengths = jt.values(), jt.lengths()
        if not torch.jit.is_scripting():
            self.check_packed(values, f"feature '{feature_name}'")
        pooled = torch.segment_reduce(self.digits(values), "sum", lengths=lengths, unsafe=True)  # [B, levels]
        if mean:
            return self.project(pooled / lengths.clamp(min=1)[:, None], lengths.clamp(max=1))
        return self.project(pooled, lengths)

    def sequence(self, features: KeyedJaggedTensor, feature_name: str) -> JaggedTensor:
        """One embedding per packed SID of ``features[feature_name]``: values ``[sum L, D_out]``, same lengths."""
        jt = features[feature_name]
        if not torch.jit.is_scripting():
            self.check_packed(jt.values(), f"feature '{feature_name}'")
        return JaggedTensor(values=self.project(self.digits(jt.values())), lengths=jt.lengths())
