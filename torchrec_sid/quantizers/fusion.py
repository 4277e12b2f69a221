"""VQ-fusion (SIDE): several content signals in, one semantic ID out; with one signal, a plain autoencoder.

``h = f(e_1(x_1), ..., e_K(x_K))`` with per-signal encoders ``e_k`` and a fusion network ``f``; a
:class:`~torchrec_sid.quantizers.autoencoder.Bottleneck` quantizes ``h`` to ``h_q`` (RQ-VAE, FSQ or DPCA);
``s = h + sg(h_q - h)``; ``x_hat_k = g_k(r(s))`` with a shared decoder ``r`` and per-signal decoders ``g_k``;
``loss = sum_k w_k l_k(x_k, x_hat_k) + bottleneck loss`` (``l_k``: cosine / mse / bce,
:func:`~torchrec_sid.quantizers.autoencoder.signal_loss`).

:class:`FusionQuantizer` is the base of :class:`~torchrec_sid.quantizers.rq_vae.RQVAE`,
:class:`~torchrec_sid.quantizers.fsq.FSQ` and :class:`~torchrec_sid.quantizers.dpca.DPCA`: each is 1:1 (one
signal, the default) or VQ-fusion (``signals={"text": "cosine", "genres": "bce"}``), the same class either way.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchrec_sid.quantizers.autoencoder import (
    Bottleneck,
    NeuralQuantizer,
    QuantizedAutoencoder,
    Signals,
    Step,
    mlp,
    signal_loss,
    signal_output,
)
from torchrec_sid.quantizers.base import setting


class VQFusion(QuantizedAutoencoder):
    """Encoders ``e_k``, fusion ``f``, a bottleneck, shared decoder ``r`` and per-signal decoders ``g_k``.

    Args:
        dims: ``{name: D_k}``, the signals in order.
        losses: ``{name: loss}`` (``cosine``, ``mse`` or ``bce``).
        weights: ``{name: w_k}``, the weight of each signal's loss.
        hidden_dim: width of ``e_k``'s output and of the hidden layers.
        bottleneck: quantizes the fused latent ``[B, bottleneck.latent_dim]``.

    Layers: ``e_k = ReLU(Linear(D_k, H))``, ``f = Linear(K*H, H) -> ReLU -> Linear(H, d)``,
    ``r = Linear(d, H) -> ReLU -> Linear(H, H) -> ReLU``, ``g_k = Linear(H, D_k)``.

    Example::

        model = VQFusion({"text": 384, "genres": 19}, {"text": "cosine", "genres": "bce"},
                         {"text": 1.0, "genres": 1.0}, 256, FSQBottleneck([3] * 15))
        step = model({"text": torch.randn(8, 384), "genres": torch.zeros(8, 19)})  # step.codes: [8, 15]
    """

    def __init__(self, dims: dict[str, int], losses: dict[str, str], weights: dict[str, float], hidden_dim: int,
                 bottleneck: Bottleneck) -> None:
        super().__init__()
        self.losses = dict(losses)
        self.weights = dict(weights)
        self.encoders = nn.ModuleDict({name: mlp(d, hidden_dim).append(nn.ReLU()) for name, d in dims.items()})
        self.fusion = mlp(len(dims) * hidden_dim, hidden_dim, bottleneck.latent_dim)
        self.bottleneck = bottleneck
        self.shared_decoder = mlp(bottleneck.latent_dim, hidden_dim, hidden_dim).append(nn.ReLU())
        self.decoders = nn.ModuleDict({name: nn.Linear(hidden_dim, d) for name, d in dims.items()})

    def latent(self, signals: Signals) -> Tensor:
        """``h = f(e_1(x_1), ..., e_K(x_K))``: ``[B, latent_dim]``."""
        return self.fusion(torch.cat([self.encoders[name](signals[name]) for name in self.encoders], dim=1))

    def _heads(self, z_q: Tensor) -> Signals:
        """Decoder outputs (logits for ``bce``) ``{name: [B, D_k]}`` from quantized latents ``[B, latent_dim]``."""
        shared = self.shared_decoder(z_q)
        return {name: head(shared) for name, head in self.decoders.items()}

    def forward(self, signals: Signals) -> Step:
        quantized = self.bottleneck(self.latent(signals))
        outputs = self._heads(quantized.z_q)
        losses = {name: signal_loss(self.losses[name], signals[name], out) for name, out in outputs.items()}
        recon = sum((self.weights[name] * loss for name, loss in losses.items()), start=quantized.loss.new_zeros(()))
        parts = {**{f"loss_{name}": loss.detach() for name, loss in losses.items()}, "vq": quantized.loss.detach()}
        return Step(recon + quantized.loss, recon, quantized.codes, parts)

    def encode(self, signals: Signals) -> Tensor:
        return self.bottleneck(self.latent(signals)).codes

    def decode(self, codes: Tensor) -> Signals:
        outputs = self._heads(self.bottleneck.lookup(codes))
        return {name: signal_output(self.losses[name], out) for name, out in outputs.items()}

    def initialise(self, signals: Signals, generator: torch.Generator) -> None:
        self.bottleneck.initialise(self.latent(signals), generator)


def check_signal_weights(name: str, weights: Any) -> None:
    """The check of a ``signal_weights`` setting: None, or ``{signal name: weight >= 0}``."""
    if weights is None:
        return
    if not isinstance(weights, Mapping):
        raise ValueError(f"{name} must be None or a {{signal name: weight >= 0}} dict, got {weights!r}")
    for signal, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{name}[{signal!r}] must be a number >= 0, got {weight!r}")


@dataclass(kw_only=True, eq=False)
class FusionQuantizer(NeuralQuantizer):
    """A neural quantizer whose model is :class:`VQFusion` around the subclass's bottleneck.

    Settings (shared by RQ-VAE, FSQ and DPCA, besides
    :class:`~torchrec_sid.quantizers.autoencoder.NeuralQuantizer`'s):
        signal_weights: ``{name: w_k}``, loss weights (missing names: 1.0).
    """

    signal_weights: dict[str, float] | None = setting(None, check_signal_weights)

    def _check_param_relations(self) -> None:
        super()._check_param_relations()
        unknown = sorted(set(self.signal_weights or {}) - set(self.signal_losses))
        if unknown:
            raise ValueError(f"signal_weights names {unknown}, which are not signals {sorted(self.signal_losses)}")

    @abstractmethod
    def _bottleneck(self) -> Bottleneck:
        """A fresh bottleneck from the settings."""

    def _build_model(self, dims: dict[str, int]) -> VQFusion:
        weights = {name: (self.signal_weights or {}).get(name, 1.0) for name in self.signal_losses}
        return VQFusion(dims, self.signal_losses, weights, self.hidden_dim, self._bottleneck())
