"""MMQ stage 2, behaviour-aware fine-tuning (``papers/mmq.md`` section 2.6): SID token embeddings whose lookup is
differentiable with respect to the tokenizer, so a ranking loss trains the tokenizer that makes the SIDs.

Each of the E tokens of item i is embedded as ``soft_one_hot(p_e(i), tau) @ W_e``, where ``p_e(i): [K]`` are the
cosine similarities of expert e's output to its codebook and ``W_e: [K, d]`` is the token table. The forward
value is exactly the row ``W_e[c_e]`` of the item's hard token ``c_e`` (the one-hot of the argmax), so the
model sees discrete SIDs; the gradient of ``softmax(p / tau)`` reaches the experts, gates and codebooks. The
content encoders are frozen: the items' content signals are constant buffers. After fine-tuning,
:meth:`SoftSidEmbedding.codes` gives the items' new hard SIDs, which are exported as a ``SemanticIds`` artifact and
used like any other (sharded token tables).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftIndexTokenizer(Protocol):
    """What :class:`SoftSidEmbedding` needs of a tokenizer (an ``nn.Module``; e.g.
    :class:`~torchrec_sid.quantizers.mmq.MMQTokenizer`), so that this module never imports the quantizers."""

    dims: dict[str, int]  # modality -> input dimension
    codebooks: Sequence[nn.Embedding]  # E codebooks of K rows each

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def similarities(self, signals: Mapping[str, Tensor]) -> Tensor:
        """``{m: [B, D_m]}`` -> cosine similarity of each expert's output to its codebook ``[B, E, K]``."""
        ...

    def loss_terms(self, signals: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``({"recon", "aux", "vq"}: scalars, codes)`` of the tokenizer's own objective on ``signals``."""
        ...

    def encode(self, signals: Mapping[str, Tensor]) -> Tensor:
        """``{m: [B, D_m]}`` -> hard SIDs ``[B, E]``."""
        ...


PAPER_STAGE2_WEIGHTS = {"recon_weight": 0.5, "aux_weight": 0.5, "vq_weight": 0.0}  # L_down + 0.5 L_recon + 0.5 L_aux


def soft_one_hot(similarities: Tensor, tau: float) -> Tensor:
    """Stage-2 soft index: ``[..., K]`` -> one-hot of the argmax (forward), gradient of ``softmax(p / tau)``."""
    soft = torch.softmax(similarities / tau, dim=-1)
    hard = F.one_hot(similarities.argmax(-1), similarities.shape[-1]).to(soft.dtype)
    return soft + (hard - soft).detach()


class _AddAuxiliaryLoss(torch.autograd.Function):
    """``x`` unchanged; backward also sends gradient 1 to ``loss``, so the loss joins any loss computed from x."""

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor) -> Tensor:
        ctx.dtype, ctx.device = loss.dtype, loss.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones((), dtype=ctx.dtype, device=ctx.device)


@torch.fx.wrap
def add_auxiliary_loss(x: Tensor, loss: Tensor) -> Tensor:
    """Returns ``x``; a backward pass from anything computed from it also minimises the scalar ``loss``."""
    return _AddAuxiliaryLoss.apply(x, loss)


class SoftSidEmbedding(nn.Module):
    """Item vectors ``[N, d]`` from an MMQ tokenizer's soft-indexed SID tokens (the sum of the E token vectors).

    In training, the tokenizer's stage-2 regulariser ``recon_weight L_recon + aux_weight L_aux + L_vq`` on the
    batch's distinct items rides on the output (:func:`add_auxiliary_loss`): the ranking loss computed from the
    model's logits carries it, and no training loop needs to know. Its last value is :attr:`last_regulariser`.

    Args:
        tokenizer: a stage-1 tokenizer (:class:`SoftIndexTokenizer`, e.g. MMQ's); trained in place.
        signals: the items' frozen content ``{m: [I, D_m]}``, the tokenizer's modalities.
        embedding_dim: d.
        tau: soft-index temperature (the cosines are in ``[-1, 1]``).
        recon_weight, aux_weight: alpha' and beta' (paper: 0.5 and 0.5, the defaults here; the model config
            defaults to stage 1's 12 and 10, see :class:`~torchrec_sid.models.dlrm.SoftSidConfig`).
        vq_weight: weight of the tokenizer's spherical-VQ codebook term ``L_vq`` in the regulariser (default 1; the
            paper's stage-2 loss has no such term: 0). :data:`PAPER_STAGE2_WEIGHTS` is the paper's setting.

    Weights measured (the fidelity audit; the MovieLens demo's stage-1 tokenizer fine-tuned 2 epochs inside the
    DLRM, tau 0.1, one seed): the paper's 0.5 / 0.5 collapsed one expert to a single code (codes used per expert
    [55, 58, 64, 64, 1, 57] of 64; collision rate 0.31 -> 0.69, 44% of tokens changed) with valid AUC 0.6892 and
    NE 0.9205; 12 / 10 kept all 64 codes in every expert (collisions 0.31 -> 0.15, 33% of tokens changed) with
    AUC 0.6854 and NE 0.9265. The config's 12 / 10 trades behaviour alignment (the ranking loss moves the tokenizer
    20-24x less) for code health; the paper's setting is ``SoftSidEmbedding(..., **PAPER_STAGE2_WEIGHTS)``.

    Example::

        tokenizer = MMQ.load("outputs/movielens_mmq.quantizer.safetensors").model_
        soft = SoftSidEmbedding(tokenizer, movielens.load().signals(), embedding_dim=32)
        soft(torch.tensor([3, 3, 7]))  # [3, 32]
        soft.codes()                   # [1682, 6], the items' current hard SIDs
    """

    if TYPE_CHECKING:  # buffer types for mypy; TorchScript cannot read class-level annotations here
        tokenizer: SoftIndexTokenizer
        signal_0: Tensor

    def __init__(self, tokenizer: SoftIndexTokenizer, signals: dict[str, Tensor], embedding_dim: int, tau: float = 0.1,
                 recon_weight: float = 0.5, aux_weight: float = 0.5, vq_weight: float = 1.0) -> None:
        super().__init__()
        if set(signals) != set(tokenizer.dims):
            raise ValueError(f"signals {sorted(signals)} do not match the tokenizer's modalities "
                             f"{sorted(tokenizer.dims)}")
        for m, dim in tokenizer.dims.items():
            if signals[m].ndim != 2 or signals[m].shape[1] != dim:
                raise ValueError(f"signal {m!r} must be [I, {dim}] for the tokenizer, got {tuple(signals[m].shape)}")
        if len({len(x) for x in signals.values()}) != 1:
            raise ValueError(f"signals must have one row per item each, got {[len(x) for x in signals.values()]}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        for name, weight in (("recon_weight", recon_weight), ("aux_weight", aux_weight), ("vq_weight", vq_weight)):
            if not weight >= 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        tokenizer.train()
        self.tokenizer = tokenizer
        self.modalities = list(tokenizer.dims)
        for i, m in enumerate(self.modalities):
            self.register_buffer(f"signal_{i}", signals[m].float().clone())
        num_tokens, size = len(tokenizer.codebooks), len(tokenizer.codebooks[0].weight)
        bound = 1.0 / math.sqrt(size)  # torchrec's default table init, uniform(-sqrt(1 / K), sqrt(1 / K))
        self.tables = nn.Parameter(torch.empty(num_tokens, size, embedding_dim).uniform_(-bound, bound))
        self.tau, self.recon_weight, self.aux_weight, self.vq_weight = tau, recon_weight, aux_weight, vq_weight
        self.last_regulariser: Tensor | None = None

    @property
    def num_items(self) -> int:
        return len(self.signal_0)

    def _signals(self, items: Tensor) -> dict[str, Tensor]:
        return {m: getattr(self, f"signal_{i}")[items] for i, m in enumerate(self.modalities)}

    def forward(self, item_ids: Tensor) -> Tensor:
        """``item_ids: [N]`` -> ``[N, d]``."""
        items, inverse = torch.unique(item_ids, return_inverse=True)
        signals = self._signals(items)
        index = soft_one_hot(self.tokenizer.similarities(signals), self.tau)  # [U, E, K]
        vectors = torch.einsum("uek,ekd->ud", index, self.tables)[inverse]
        if not self.training:
            return vectors
        losses, _ = self.tokenizer.loss_terms(signals)
        regulariser = (self.recon_weight * losses["recon"] + self.aux_weight * losses["aux"]
                       + self.vq_weight * losses["vq"])
        self.last_regulariser = regulariser.detach()
        return add_auxiliary_loss(vectors, regulariser)

    @torch.no_grad()
    def codes(self, chunk_size: int = 4096) -> Tensor:
        """Every item's current hard SID ``[I, E]`` (argmax of the similarities)."""
        device = self.signal_0.device
        return torch.cat([self.tokenizer.encode(self._signals(torch.arange(start, min(start + chunk_size,
                                                                                       self.num_items),
                                                                           device=device)))
                          for start in range(0, self.num_items, chunk_size)])
