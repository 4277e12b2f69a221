"""MMQ tokenizer, stage 1 (Multimodal Mixture-of-Quantization, arXiv 2508.15281; notes: shared/papers/mmq.md).

Modalities ``{m: [B, D_m]}`` (the signals). Experts, each ``Linear(in, H) -> ReLU -> Linear(H, d)``:

* ``N_s`` shared experts read the concatenation ``[x_1; ...; x_M]``; ``N_m`` specific experts per modality read
  ``x_m``; a softmax gate per modality, ``g_m = softmax(Linear(x_m))`` ``[B, N_m]``, weights its experts.
* Each expert output ``z_e`` is L2-normalised and quantized to its own codebook's most cosine-similar unit
  codeword ``c_e`` (one token per expert: a parallel SID, not residual), straight-through.
* Fused latent ``z_q = sum_shared c_e + sum_m sum_i g_m,i c_m,i``; ``Dec(z_q)`` reconstructs the concatenation
  (``L_recon``, split per modality); ``Dec_m(sum_i g_m,i c_m,i)`` reconstructs modality m from its own
  specific tokens only (``L_aux``, summed over modalities).
* ``L_ortho = sum over groups ||V V^T - I||_F^2`` (``sum_{i != j} cos^2(v_i, v_j)``) over the experts of a
  group; groups: {shared}, {specific to m} for each m (no cross-group term). What ``v_i`` is, the setting
  ``orthogonality``: ``"outputs"`` (default) expert i's outputs on the batch, centred over the batch and
  flattened (``[B * d]``), so the penalty makes the experts compute different things; ``"layers"`` the paper's
  weight form applied per layer (one ``||V V^T - I||^2`` per Linear layer, V that layer's flattened weights, summed);
  ``"weights"`` every Linear weight of an expert flattened into one vector (the form before this setting existed).
  Measured (``benchmarks/mmq_stage1.py --orthogonality``: MovieLens text + meta, K = d = 32, H = 128, 40 epochs,
  seed 0), the within-group ``|cos|`` of the experts' centred outputs is 0.766 without the penalty; the weight forms
  leave it there (``weights``: 0.757 / 0.752 at gamma 0.005 / 0.5; ``layers``: 0.769 / 0.770), because flattened
  random MLP weights are already near-orthogonal (``|cos| ~ 1 / sqrt(P)``) and hidden-unit permutations make weight
  orthogonality say nothing about function; ``outputs`` lowers it to 0.748 / 0.345 at an equal reconstruction loss
  (valid 24.84 / 24.90 against 25.45) and utilisation 0.99. The paper's gamma = 0.005 stays the default; at this
  scale the penalty needs a larger gamma (0.5) to separate the experts clearly.
* ``loss = alpha L_recon + beta L_aux + gamma L_ortho + L_vq`` with the paper's alpha = 12, beta = 10,
  gamma = 0.005. ``L_vq`` (not in the paper's loss, which gives the codebooks no gradient; the notes' default)
  is spherical VQ per expert: ``||sg(z^_e) - c_e||^2 + commitment ||z^_e - sg(c_e)||^2`` on unit vectors.
  Codebooks start from k-means on the unit expert outputs of up to ``init_rows`` training rows; codes unused in
  an epoch are re-seeded. The validation criterion is ``alpha L_recon + beta L_aux``.

Token order: the shared experts, then each modality's specific experts, modalities in name order.
Gates are not part of the SID: :meth:`MMQ.decode` uses the training items' mean gate,
:meth:`MMQ.reconstruct_signals` an item's own gates. Stage 2 (behaviour-aware fine-tuning,
:class:`~torchrec_sid.modules.SoftSidEmbedding`) trains ``model_`` further inside a ranking model with soft
indexing: :meth:`MMQTokenizer.similarities` gives, per expert, the cosine similarities to its codebook
``[B, E, K]`` (differentiable), and :func:`~torchrec_sid.modules.soft_sid.soft_one_hot` turns them into the
straight-through one-hot ``softmax(p / tau) + sg(one_hot(argmax p) - softmax(p / tau))``, whose product with a
downstream table is a row lookup in the forward pass; :meth:`MMQTokenizer.loss_terms` gives the reconstruction
terms that keep the content in the tokens meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_sid.quantizers.autoencoder import (
    NeuralQuantizer,
    QuantizedAutoencoder,
    Signals,
    Step,
    VectorCodebook,
    check_signal_spec,
    mlp,
    signal_loss,
    signal_output,
)
from torchrec_sid.quantizers.base import QuantizerInput, integer, one_of, real, register, setting


def flat_weights(experts: Iterable[nn.Module]) -> Tensor:
    """Each expert's Linear weights (biases excluded) flattened into one row: ``[E, P]``."""
    return torch.stack([torch.cat([m.weight.flatten() for m in expert.modules() if isinstance(m, nn.Linear)])
                        for expert in experts])


def orthogonality_loss(vectors: Tensor) -> Tensor:
    """``||V V^T - I||_F^2`` of the L2-normalised rows of ``vectors: [E, P]`` (``sum_{i != j} cos^2``)."""
    unit = F.normalize(vectors, dim=1)
    return ((unit @ unit.T - torch.eye(len(unit))) ** 2).sum()


def layer_weights(experts: Iterable[nn.Module]) -> list[Tensor]:
    """Per Linear layer, every expert's weight of that layer flattened: ``L x [E, P_l]`` (experts of one shape)."""
    layers = [[m.weight.flatten() for m in expert.modules() if isinstance(m, nn.Linear)] for expert in experts]
    return [torch.stack(per_layer) for per_layer in zip(*layers, strict=True)]


def centred_outputs(outputs: list[Tensor]) -> Tensor:
    """Experts' outputs ``E x [B, d]``, each centred over the batch and flattened: ``[E, B * d]``."""
    return torch.stack([(z - z.mean(0)).flatten() for z in outputs])


ORTHOGONALITY = ("outputs", "layers", "weights")


def mean_abs_cosine(vectors: Tensor) -> float:
    """Mean ``|cos|`` over the distinct pairs of rows of ``vectors: [E, P]`` (NaN for fewer than two rows)."""
    unit = F.normalize(vectors.detach().double(), dim=1)
    pairs = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[pairs[0], pairs[1]].abs().mean().item()


class MMQTokenizer(QuantizedAutoencoder):
    """Shared and modality-specific experts, gates, one cosine codebook per expert, fused and auxiliary decoders.

    Args:
        dims: ``{m: D_m}``, the modalities in order.
        losses: ``{m: loss}`` (``cosine``, ``mse`` or ``bce``) for ``L_recon`` and ``L_aux``.
        num_shared: N_s, shared experts.
        num_specific: N_m, experts per modality.
        hidden_dim: H, hidden width of experts and decoders.
        latent_dim: d, width of expert outputs and codewords.
        codebook_size: K, codewords per expert.
        alpha, beta, gamma: weights of ``L_recon``, ``L_aux``, ``L_ortho``.
        commitment: weight of the spherical-VQ commitment term.
        orthogonality: what ``L_ortho`` decorrelates: ``"outputs"``, ``"layers"`` or ``"weights"`` (module docstring).

    Example::

        model = MMQTokenizer({"text": 384, "meta": 28}, {"text": "mse", "meta": "mse"}, 2, 2, 256, 64, 64,
                             12.0, 10.0, 0.005, 0.25)
        step = model({"text": torch.randn(8, 384), "meta": torch.rand(8, 28)})  # step.codes: [8, 6]
        p = model.similarities({"text": torch.randn(8, 384), "meta": torch.rand(8, 28)})  # [8, 6, 64]
    """

    mean_gates: Tensor  # [M, N_m], the training items' mean gate (set by calibrate)

    def __init__(self, dims: dict[str, int], losses: dict[str, str], num_shared: int, num_specific: int,
                 hidden_dim: int, latent_dim: int, codebook_size: int, alpha: float, beta: float, gamma: float,
                 commitment: float, orthogonality: str = "outputs") -> None:
        super().__init__()
        if orthogonality not in ORTHOGONALITY:
            raise ValueError(f"orthogonality must be one of {list(ORTHOGONALITY)}, got {orthogonality!r}")
        self.orthogonality = orthogonality
        self.dims, self.losses = dict(dims), dict(losses)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        total = sum(dims.values())
        self.shared = nn.ModuleList(mlp(total, hidden_dim, latent_dim) for _ in range(num_shared))
        self.specific = nn.ModuleDict({m: nn.ModuleList(mlp(d, hidden_dim, latent_dim) for _ in range(num_specific))
                                       for m, d in dims.items()})
        self.gates = nn.ModuleDict({m: nn.Linear(d, num_specific) for m, d in dims.items()})
        num_experts = num_shared + num_specific * len(dims)
        self.codebooks = nn.ModuleList(VectorCodebook(codebook_size, latent_dim, "cosine", commitment)
                                       for _ in range(num_experts))
        self.decoder = mlp(latent_dim, hidden_dim, total)
        self.aux_decoders = nn.ModuleDict({m: mlp(latent_dim, hidden_dim, d) for m, d in dims.items()})
        self.register_buffer("mean_gates", torch.full((len(dims), num_specific), 1.0 / num_specific))

    @property
    def expert_groups(self) -> dict[str, nn.ModuleList]:
        """``{"shared": experts, m: experts specific to m}``: the orthogonality groups."""
        return {"shared": self.shared, **cast(dict[str, nn.ModuleList], dict(self.specific))}

    @property
    def expert_codebooks(self) -> list[VectorCodebook]:
        """One codebook per expert, in token order."""
        return cast(list[VectorCodebook], list(self.codebooks))

    def expert_outputs(self, signals: Signals) -> list[Tensor]:
        """Every expert's output ``[B, latent_dim]``, in token order."""
        joint = torch.cat([signals[m] for m in self.dims], dim=1)
        groups = self.expert_groups
        return [e(joint) for e in groups["shared"]] + [e(signals[m]) for m in self.dims for e in groups[m]]

    def gate_weights(self, signals: Signals) -> Tensor:
        """Softmax gates ``[B, M, N_m]`` of the modality-specific experts."""
        return torch.stack([torch.softmax(self.gates[m](signals[m]), dim=1) for m in self.dims], dim=1)

    def similarities(self, signals: Signals) -> Tensor:
        """Cosine similarity of each expert's output to each codeword of its codebook: ``[B, E, K]``."""
        outputs = self.expert_outputs(signals)
        return torch.stack([cb.similarities(z) for cb, z in zip(self.expert_codebooks, outputs, strict=True)], dim=1)

    def _fuse(self, quantized: list[Tensor], gates: Tensor) -> tuple[Tensor, Tensor]:
        """Per-expert vectors ``E x [B, d]`` and gates ``[B, M, N_m]`` -> fused ``[B, d]`` and the gated sum of each
        modality's specific vectors ``[M, B, d]``."""
        num_shared = len(self.shared)
        specific = torch.stack(quantized[num_shared:]).view(len(self.dims), gates.shape[2], *quantized[0].shape)
        per_modality = torch.einsum("msbd,bms->mbd", specific, gates)
        return sum(quantized[:num_shared]) + per_modality.sum(0), per_modality

    def _outputs(self, fused: Tensor, per_modality: Tensor) -> tuple[Signals, Signals]:
        """Decoder outputs: ``Dec(fused)`` split by modality, and ``Dec_m`` of each modality's gated vector."""
        joint = dict(zip(self.dims, self.decoder(fused).split(list(self.dims.values()), dim=1), strict=True))
        aux = {m: self.aux_decoders[m](per_modality[i]) for i, m in enumerate(self.dims)}
        return joint, aux

    def grouped_outputs(self, outputs: list[Tensor]) -> dict[str, list[Tensor]]:
        """Experts' outputs (token order) split by orthogonality group: ``{"shared": [...], m: [...]}``."""
        sizes = {name: len(group) for name, group in self.expert_groups.items()}
        chunks = iter(outputs)
        return {name: [next(chunks) for _ in range(size)] for name, size in sizes.items()}

    def orthogonality_loss(self, outputs: list[Tensor]) -> Tensor:
        """``L_ortho`` summed over the groups of more than one expert, in the form ``self.orthogonality``."""
        total = torch.zeros(())
        for name, group in self.expert_groups.items():
            if len(group) < 2:
                continue
            if self.orthogonality == "outputs":
                total = total + orthogonality_loss(centred_outputs(self.grouped_outputs(outputs)[name]))
            elif self.orthogonality == "layers":
                total = total + sum(orthogonality_loss(w) for w in layer_weights(group))
            else:
                total = total + orthogonality_loss(flat_weights(group))
        return total

    def loss_terms(self, signals: Signals) -> tuple[dict[str, Tensor], Tensor]:
        """The unweighted losses ``{"recon", "aux", "vq", "ortho"}`` (scalars, with their graphs) and the codes
        ``[B, E]``."""
        outputs = self.expert_outputs(signals)
        quantized = [cb(z) for cb, z in zip(self.expert_codebooks, outputs, strict=True)]
        joint, aux = self._outputs(*self._fuse([q.z_q for q in quantized], self.gate_weights(signals)))
        losses = {"recon": sum(signal_loss(self.losses[m], signals[m], joint[m]) for m in self.dims),
                  "aux": sum(signal_loss(self.losses[m], signals[m], aux[m]) for m in self.dims),
                  "vq": sum(q.loss for q in quantized), "ortho": self.orthogonality_loss(outputs)}
        return losses, torch.cat([q.codes for q in quantized], dim=1)

    def forward(self, signals: Signals) -> Step:
        losses, codes = self.loss_terms(signals)
        reconstruction = self.alpha * losses["recon"] + self.beta * losses["aux"]
        parts = {k: v.detach() for k, v in losses.items()}
        return Step(reconstruction + self.gamma * losses["ortho"] + losses["vq"], reconstruction, codes, parts)

    @torch.no_grad()
    def output_similarity(self, signals: Signals) -> dict[str, float]:
        """Per group of more than one expert, the mean ``|cos|`` between two experts' centred outputs on
        ``signals`` (what the ``"outputs"`` penalty lowers)."""
        grouped = self.grouped_outputs(self.expert_outputs(signals))
        return {name: mean_abs_cosine(centred_outputs(outs)) for name, outs in grouped.items() if len(outs) > 1}

    def encode(self, signals: Signals) -> Tensor:
        return self.similarities(signals).argmax(dim=-1)

    def decode(self, codes: Tensor) -> Signals:
        quantized = [cb.codewords()[codes[:, e]] for e, cb in enumerate(self.expert_codebooks)]
        joint, _ = self._outputs(*self._fuse(quantized, self.mean_gates.expand(len(codes), -1, -1)))
        return {m: signal_output(self.losses[m], out) for m, out in joint.items()}

    def reconstruct(self, signals: Signals) -> Signals:
        """Reconstructions ``{m: [B, D_m]}`` from the items' tokens and their own gates."""
        quantized = [cb.codewords()[cb.assign(z)] for cb, z in zip(self.expert_codebooks, self.expert_outputs(signals),
                                                                     strict=True)]
        joint, _ = self._outputs(*self._fuse(quantized, self.gate_weights(signals)))
        return {m: signal_output(self.losses[m], out) for m, out in joint.items()}

    def initialise(self, signals: Signals, generator: torch.Generator) -> None:
        for cb, z in zip(self.expert_codebooks, self.expert_outputs(signals), strict=True):
            cb.initialise(z, generator)

    def calibrate(self, signals: Signals) -> None:
        """Sets ``mean_gates`` to the mean gate of the training items."""
        self.mean_gates.copy_(self.gate_weights(signals).mean(0))


@register("mmq")
@dataclass(kw_only=True, eq=False)
class MMQ(NeuralQuantizer):
    """MMQ stage-1 tokenizer: a parallel SID of one token per expert (:class:`MMQTokenizer`).

    Args:
        signals: ``{modality: loss}``, e.g. ``{"text": "mse", "meta": "mse"}`` (the paper's squared errors);
            None: one embedding with cosine loss. The one setting that may be passed positionally.
        num_shared: N_s, shared experts (paper: 2).
        num_specific: N_m, experts per modality (paper: 2).
        codebook_size: K, codewords per expert.
        latent_dim: d, width of expert outputs and codewords.
        alpha, beta, gamma: weights of ``L_recon``, ``L_aux``, ``L_ortho`` (paper: 12, 10, 0.005).
        commitment: weight of the spherical-VQ commitment term.
        orthogonality: what ``L_ortho`` decorrelates: ``"outputs"`` (default; the experts' centred outputs),
            ``"layers"`` (the paper's weight form, per layer) or ``"weights"`` (all of an expert's weights flattened
            together, which measurably does nothing: module docstring).
        hidden_dim (H, hidden width of experts and decoders) and the training settings (max_epochs, batch_size,
            lr, patience, tol, valid_frac, init_rows, chunk_size, seed): as in
            :class:`~torchrec_sid.quantizers.autoencoder.NeuralQuantizer`.

    Codes: ``[N, N_s + M N_m]``, token e in ``[0, K)`` (:attr:`token_names` gives each column's expert).
    ``decode`` uses the training items' mean gates; :meth:`reconstruct_signals` the items' own.

    Example::

        x = {"text": torch.randn(1000, 384), "meta": torch.rand(1000, 28)}  # {modality: [N, D_m]}
        q = MMQ({"text": "mse", "meta": "mse"}, codebook_size=32, max_epochs=5).fit(x)
        codes = q.encode(x)  # [1000, 6]: shared_0, shared_1, meta_0, meta_1, text_0, text_1
        p = q.similarities(x)  # [1000, 6, 32] cosine similarities, for stage-2 soft indexing
    """

    signals: dict[str, str] | None = field(default=None, kw_only=False, metadata={"check": check_signal_spec})
    num_shared: int = setting(2, integer(0))
    num_specific: int = setting(2, integer(1))
    codebook_size: int = setting(64, integer(1))
    latent_dim: int = setting(64, integer(1))
    alpha: float = setting(12.0, real(0.0))
    beta: float = setting(10.0, real(0.0))
    gamma: float = setting(0.005, real(0.0))
    commitment: float = setting(0.25, real(0.0))
    orthogonality: str = setting("outputs", one_of(*ORTHOGONALITY))
    model_: MMQTokenizer = field(init=False, repr=False)

    @property
    def token_names(self) -> list[str]:
        """The expert behind each code column: ``shared_<i>``, then ``<modality>_<i>``."""
        return ([f"shared_{i}" for i in range(self.num_shared)]
                + [f"{m}_{i}" for m in self.signal_losses for i in range(self.num_specific)])

    @property
    def cardinalities(self) -> list[int]:
        return [self.codebook_size] * len(self.token_names)

    def _build_model(self, dims: dict[str, int]) -> MMQTokenizer:
        return MMQTokenizer(dims, self.signal_losses, self.num_shared, self.num_specific, self.hidden_dim,
                            self.latent_dim, self.codebook_size, self.alpha, self.beta, self.gamma, self.commitment,
                            self.orthogonality)

    @torch.no_grad()
    def similarities(self, x: QuantizerInput) -> Tensor:
        """Per expert, the cosine similarities to its codebook: ``[N, E, K]`` (argmax over K = :meth:`encode`)."""
        signals = self._check_inputs(x)
        return self._in_chunks(self.model_.similarities, signals)

    @torch.no_grad()
    def reconstruct_signals(self, x: QuantizerInput) -> Signals:
        """Reconstructions ``{name: [N, D_k]}`` from the items' tokens with their own gates (``decode`` uses the
        mean gate)."""
        signals = self._check_inputs(x)
        return self._signals_in_chunks(self.model_.reconstruct, signals)
