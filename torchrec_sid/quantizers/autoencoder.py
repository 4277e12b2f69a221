"""Quantizers trained as autoencoders: encoder -> quantizer -> decoder, with one training loop for all of them.

* **Signals.** A neural quantizer reads one or more named content signals ``{name: [N, D_k]}`` (one row per item),
  each with a reconstruction loss (:data:`SIGNAL_LOSSES`): ``cosine`` (``1 - cos``), ``mse`` (``||x - x_hat||^2``
  summed over the D_k columns) or ``bce`` (binary cross-entropy of logits, summed over columns; for multi-hot
  categorical signals). Every loss is averaged over rows. With one signal, a bare ``[N, D]`` tensor is accepted
  (:func:`~torchrec_sid.quantizers.base.as_signals`).
* **Bottleneck** (:class:`Bottleneck`): latent ``z: [B, d]`` -> straight-through quantized latent
  ``z + sg(z_q - z)`` (forward value ``z_q``, gradient to ``z``), codes ``[B, n]`` and the codebook +
  commitment loss. :class:`VectorCodebook` is the codebook of the methods that have one (RQ-VAE, MMQ).
* **Model** (:class:`QuantizedAutoencoder`): an ``nn.Module`` whose ``forward`` returns a :class:`Step`.
* **Training** (:class:`NeuralQuantizer`): Adam on shuffled mini-batches; a seeded validation split; early
  stopping when its reconstruction loss has not improved by a relative ``tol`` for ``patience`` epochs, then the
  best epoch's weights are restored; codebooks are initialised by k-means on encoder outputs of up to
  ``init_rows`` training rows before the first step, and codes unused in an epoch are re-seeded from the
  epoch's last batch (``reseed_dead_codes``; off, utilisation shows what the method does on its own, as in the
  papers' utilisation comparisons). One ``history_`` entry per epoch (losses, utilisation before and after
  re-seeding, re-seeded codes), also sent to a TensorBoard writer and the progress bar. Everything random is drawn
  from generators seeded by ``seed``, and parameters are initialised under a forked, seeded global RNG: two fits
  with one seed give equal weights on CPU.

Neural quantizers fit on one process: under ``torch.distributed`` with ``world_size > 1``, ``fit`` raises
(fit on one rank and share the saved artifact; the item catalogues these tokenizers train on fit one machine).
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from torchrec_sid._dist import ShardLayout, is_distributed
from torchrec_sid.quantizers.base import (
    Quantizer,
    QuantizerInput,
    as_signals,
    check_codes,
    check_embeddings,
    integer,
    one_of,
    real,
    row_chunks,
    setting,
)
from torchrec_sid.quantizers.metrics import utilization
from torchrec_sid.quantizers.rq_kmeans import kmeans_plus_plus, lloyd, nearest

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

SIGNAL_LOSSES = ("cosine", "mse", "bce")
Signals = dict[str, Tensor]  # {name: [N, D_k]}, the same N for every signal
SINGLE_SIGNAL = {"x": "cosine"}  # what ``signals=None`` means: one embedding, cosine loss


# ---------------------------------------------------------------------------------------------------- signals


def check_signal_spec(name: str, signals: Any) -> None:
    """The check of a ``signals`` setting: None, or a non-empty ``{signal name: loss}`` dict whose names a
    ModuleDict can hold and whose losses are in :data:`SIGNAL_LOSSES`."""
    if signals is None:
        return
    if not isinstance(signals, Mapping) or not signals:
        raise ValueError(f"{name} must be None or a non-empty {{signal name: loss}} dict with losses in "
                         f"{list(SIGNAL_LOSSES)}, got {signals!r}")
    for signal, loss in signals.items():
        if not isinstance(signal, str) or not signal or "." in signal:
            raise ValueError(f"{name}: signal names must be non-empty strings without '.', got {signal!r}")
        if loss not in SIGNAL_LOSSES:
            raise ValueError(f"{name}: signal {signal!r} has loss {loss!r}; expected one of {list(SIGNAL_LOSSES)}")


def check_signals(x: QuantizerInput, losses: dict[str, str], dims: dict[str, int] | None = None) -> Signals:
    """Validates the input of ``fit`` / ``encode`` against the signals ``losses: {name: loss}``.

    ``x`` is ``{name: [N, D_k]}`` with exactly the configured names, or a bare ``[N, D]`` tensor when there is one
    signal. ``dims`` (after fitting) fixes each ``D_k``. Raises ValueError naming the signal: wrong names or count,
    a non-2-D or non-float signal, non-finite values (with the row), row counts that differ, a column count other
    than the fitted one, ``bce`` targets outside [0, 1].
    """
    names = list(losses)
    signals = as_signals(x, names)
    out = {}
    for name in names:
        out[name] = check_embeddings(signals[name], dim=None if dims is None else dims[name], what=f"signal {name!r}")
        if len(out[name]) != len(out[names[0]]):
            raise ValueError(f"signal {name!r} has {len(out[name])} rows but signal {names[0]!r} has "
                             f"{len(out[names[0]])}: every signal needs one row per item")
        if losses[name] == "bce":
            bad = ((out[name] < 0) | (out[name] > 1)).nonzero()
            if len(bad):
                i, j = bad[0].tolist()
                raise ValueError(f"signal {name!r} uses loss 'bce', so its values must be in [0, 1]; "
                                 f"row {i} column {j} is {float(out[name][i, j])}")
    return out


def signal_loss(kind: str, x: Tensor, out: Tensor) -> Tensor:
    """Reconstruction loss of the decoder output ``out: [B, D]`` (logits for ``bce``) for ``x: [B, D]``: a scalar,
    the mean over rows of the row's loss."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(out, x, dim=1)).mean()
    if kind == "mse":
        return ((out - x) ** 2).sum(1).mean()
    return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()


def signal_output(kind: str, out: Tensor) -> Tensor:
    """The reconstruction in input space from the decoder output ``out: [B, D]``: unit rows for ``cosine`` (the
    loss ignores the scale), as is for ``mse``, probabilities for ``bce``."""
    if kind == "cosine":
        return F.normalize(out, dim=1)
    if kind == "bce":
        return torch.sigmoid(out)
    return out


def take_rows(signals: Signals, index: Tensor | slice) -> Signals:
    """The rows ``index`` of every signal."""
    return {name: x[index] for name, x in signals.items()}


def mlp(*sizes: int) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ bottlenecks


class Quantized(NamedTuple):
    """A bottleneck's output: ``z_q: [B, d]`` (straight-through), ``codes: LongTensor[B, n]``, ``loss``: scalar."""

    z_q: Tensor
    codes: Tensor
    loss: Tensor


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """``z + sg(z_q - z)``: the value of ``z_q``, the gradient of ``z``."""
    return z + (z_q - z).detach()


def vq_loss(z: Tensor, z_q: Tensor, commitment: float) -> Tensor:
    """VQ-VAE codebook + commitment loss ``||sg(z) - z_q||^2 + commitment ||z - sg(z_q)||^2`` (rows ``[B, d]``,
    squared norms averaged over rows)."""
    return ((z.detach() - z_q) ** 2).sum(-1).mean() + commitment * ((z - z_q.detach()) ** 2).sum(-1).mean()


class Bottleneck(nn.Module, ABC):
    """Quantizes latents ``z: [B, latent_dim]``; ``lookup`` maps full codes back to quantized latents."""

    latent_dim: int

    @abstractmethod
    def forward(self, z: Tensor) -> Quantized:
        """``z: [B, latent_dim]`` -> :class:`Quantized`."""

    @abstractmethod
    def lookup(self, codes: Tensor) -> Tensor:
        """``codes: [B, n]`` -> quantized latents ``[B, latent_dim]``."""

    def initialise(self, z: Tensor, generator: torch.Generator) -> None:
        """Data-dependent initialisation from encoder outputs ``z: [S, latent_dim]``, before the first step."""


class VectorCodebook(nn.Module):
    """K learned codewords ``[K, d]``, looked up by L2 distance (``metric="l2"``) or cosine similarity
    (``"cosine"``: inputs and codewords are L2-normalised, and the quantized vector is the unit codeword).

    Trained by the VQ-VAE loss (:func:`vq_loss`); initialised by k-means (:mod:`~torchrec_sid.quantizers.rq_kmeans`,
    on unit vectors for cosine); codes unused since the last :meth:`reseed_dead` are moved onto random inputs
    of the last training batch.

    Args:
        size: K, number of codewords.
        dim: d, width of a codeword.
        metric: ``"l2"`` or ``"cosine"``.
        commitment: weight of the commitment term.
        kmeans_iter: Lloyd iterations of the initialisation.
    """

    usage: Tensor

    def __init__(self, size: int, dim: int, metric: str, commitment: float, kmeans_iter: int = 20) -> None:
        super().__init__()
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        self.metric = metric
        self.commitment = commitment
        self.kmeans_iter = kmeans_iter
        self.weight = nn.Parameter(torch.randn(size, dim) / math.sqrt(dim))
        self.register_buffer("usage", torch.zeros(size), persistent=False)  # rows per code since the last reseed
        self.recent: Tensor | None = None  # the last training batch's inputs [B, d] (unit rows for cosine)

    def codewords(self) -> Tensor:
        """``[K, d]``, unit rows for the cosine metric."""
        return F.normalize(self.weight, dim=1) if self.metric == "cosine" else self.weight

    def _prepare(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=1) if self.metric == "cosine" else z

    def similarities(self, z: Tensor) -> Tensor:
        """Cosine similarity of each row of ``z: [B, d]`` to each codeword -> ``[B, K]`` (differentiable)."""
        return F.normalize(z, dim=1) @ F.normalize(self.weight, dim=1).T

    def assign(self, z: Tensor) -> Tensor:
        """Code of each row of ``z: [B, d]`` -> ``LongTensor[B]``."""
        if self.metric == "cosine":
            return self.similarities(z.detach()).argmax(dim=1)
        return nearest(z.detach(), self.weight.detach())[1]

    def forward(self, z: Tensor) -> Quantized:
        """``z: [B, d]`` -> straight-through quantized ``[B, d]`` (unit rows for cosine), codes ``[B, 1]``, VQ loss."""
        z = self._prepare(z)
        codes = self.assign(z)
        z_q = self.codewords()[codes]
        if self.training:
            self.usage += torch.bincount(codes, minlength=len(self.usage))
            self.recent = z.detach()
        return Quantized(straight_through(z, z_q), codes[:, None], vq_loss(z, z_q, self.commitment))

    @torch.no_grad()
    def initialise(self, z: Tensor, generator: torch.Generator) -> None:
        """k-means++ and Lloyd on ``z: [S, d]`` (S >= K rows) -> the codewords."""
        k = len(self.weight)
        if len(z) < k:
            raise ValueError(f"k-means initialisation of a {k}-code codebook needs at least {k} rows, got {len(z)}: "
                             f"lower codebook_size or raise init_rows (and the number of training items)")
        z = self._prepare(z.detach())
        centroids = lloyd(z, kmeans_plus_plus(z, k, generator), ShardLayout(0, len(z), len(z)),
                          max_iter=self.kmeans_iter, tol=1e-4, chunk_size=4096, record=lambda entry: None)
        self.weight.copy_(self._prepare(centroids))

    @torch.no_grad()
    def reseed_dead(self, generator: torch.Generator) -> int:
        """Moves every code unused since the last call onto a random row of the last batch; returns how many."""
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead) and self.recent is not None:
            rows = torch.randint(len(self.recent), (len(dead),), generator=generator)
            self.weight[dead] = self.recent[rows]
        self.usage.zero_()
        return len(dead) if self.recent is not None else 0


# ------------------------------------------------------------------------------------------------------ model


@dataclass
class Step:
    """One forward pass: ``loss`` (what is minimised), ``recon`` (its reconstruction part, with its graph; the
    validation criterion), ``codes: LongTensor[B, n]`` and named detached scalar ``parts`` for the history."""

    loss: Tensor
    recon: Tensor
    codes: Tensor
    parts: dict[str, Tensor]


class QuantizedAutoencoder(nn.Module, ABC):
    """What :class:`NeuralQuantizer` trains: signals ``{name: [B, D_k]}`` -> codes ``[B, n]`` -> reconstructions."""

    @abstractmethod
    def forward(self, signals: Signals) -> Step:
        """The training / validation pass."""

    @abstractmethod
    def encode(self, signals: Signals) -> Tensor:
        """``{name: [B, D_k]}`` -> ``codes: LongTensor[B, n]``."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Signals:
        """``codes: [B, n]`` -> reconstructions ``{name: [B, D_k]}`` in input space (:func:`signal_output`)."""

    @abstractmethod
    def initialise(self, signals: Signals, generator: torch.Generator) -> None:
        """Data-dependent initialisation (codebooks) from up to ``init_rows`` training rows."""

    def calibrate(self, signals: Signals) -> None:
        """Statistics of the training rows that ``decode`` needs, computed after training (default: none)."""

    def reseed_dead(self, generator: torch.Generator) -> int:
        """Re-seeds the dead codes of every :class:`VectorCodebook` inside; returns how many."""
        return sum(m.reseed_dead(generator) for m in self.modules() if isinstance(m, VectorCodebook))


# -------------------------------------------------------------------------------------------------- quantizer


def refuse_distributed(name: str) -> None:
    """RuntimeError when torch.distributed runs more than one process (neural quantizers fit on one)."""
    if is_distributed() and dist.get_world_size() > 1:
        raise RuntimeError(f"{name} fits on one process, but torch.distributed has world_size="
                           f"{dist.get_world_size()}: fit on one rank and share the saved artifact")


def split_rows(num_rows: int, valid_frac: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(num_rows)`` into ``(train, valid)`` index tensors (at least 2 and 1 rows)."""
    num_valid = max(1, round(valid_frac * num_rows))
    if num_rows - num_valid < 2:
        raise ValueError(f"need at least 2 training items after holding out valid_frac={valid_frac} of the "
                         f"{num_rows} items for validation")
    order = torch.randperm(num_rows, generator=generator)
    return order[num_valid:], order[:num_valid]


def batches(num_rows: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``batch_size`` rows; a last batch of one row joins the previous one (batch
    normalisation needs two)."""
    chunks = list(row_chunks(num_rows, batch_size))
    if len(chunks) > 1 and chunks[-1].stop - chunks[-1].start == 1:
        chunks[-2:] = [slice(chunks[-2].start, num_rows)]
    return chunks


@dataclass(kw_only=True, eq=False)
class NeuralQuantizer(Quantizer):
    """A :class:`Quantizer` trained as an autoencoder (see the module docstring for the loop).

    ``fit(x)`` / ``encode(x)`` take ``{name: [N, D_k]}`` (or ``[N, D]`` with one signal); ``decode(codes)`` returns
    ``[N, sum_k D_k]``, the signals' reconstructions concatenated in :attr:`signal_names` order (one signal: its
    ``[N, D]``), and ``decode_signals(codes)`` the same per signal, ``{name: [N, D_k]}``. Subclasses declare their
    own settings, build the model (:meth:`_build_model`) and give ``cardinalities``.

    Settings (shared by every neural quantizer; the subclasses' ``Args`` list their own):
        signals: ``{name: loss}`` (``cosine``, ``mse`` or ``bce``) for several named signals; None: one embedding
            with cosine loss.
        hidden_dim: width of the hidden layers.
        max_epochs: training epochs, at most.
        batch_size: rows per Adam step.
        lr: Adam learning rate (> 0).
        patience: stop after this many epochs without a relative improvement of ``tol`` in validation loss.
        tol: the relative improvement that counts.
        valid_frac: fraction of the items held out (seeded) for validation and early stopping, in (0, 1).
        init_rows: training rows of the codebooks' k-means initialisation, at most.
        chunk_size: rows per forward pass in ``encode`` / ``decode`` / validation.
        reseed_dead_codes: move codes unused in an epoch onto random inputs of its last batch (default True); with
            False the codebooks are never maintained and the utilisation is the method's own.
        seed: seed of the split, the shuffling, the initialisation and the parameters.

    Fitted state: ``model_`` (its state dict is what :meth:`save` writes, with the signal widths), ``signal_dims_``
    and ``history_``: one entry per epoch with ``epoch``, ``train_loss``, ``train_recon``, ``train_<part>``,
    ``valid_loss`` (reconstruction), ``best_valid_loss``, ``utilization`` (mean over levels of the fraction of
    codes used in the epoch's training batches, measured before that epoch's re-seeding), ``utilization_per_level``,
    ``reseeded`` (dead codes moved) and ``utilization_after_reseed`` (the fraction of codes used by the training
    items once re-seeded, the model's state entering the next epoch; ``utilization`` repeated when nothing was
    re-seeded). The last entry also holds ``fitted_utilization``: per level, the fraction of codes the training
    items use with the restored best weights, what the codes of ``encode`` show.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("model_",)
    signals: dict[str, str] | None = setting(None, check_signal_spec)
    hidden_dim: int = setting(256, integer(1))
    max_epochs: int = setting(100, integer(1))
    batch_size: int = setting(256, integer(1))
    lr: float = setting(1e-3, real(0.0, open_low=True))
    patience: int = setting(10, integer(1))
    tol: float = setting(1e-3, real(0.0))
    valid_frac: float = setting(0.1, real(0.0, 1.0, open_low=True, open_high=True))
    init_rows: int = setting(4096, integer(1))
    chunk_size: int = setting(4096, integer(1))
    reseed_dead_codes: bool = setting(True, one_of(True, False))
    seed: int = setting(0, integer())
    model_: QuantizedAutoencoder = field(init=False, repr=False)
    signal_dims_: dict[str, int] = field(init=False, repr=False)

    @property
    def signal_losses(self) -> dict[str, str]:
        """``{name: loss}`` of the signals in name order, the order of every per-signal layer and token
        (``{"x": "cosine"}`` when ``signals`` is None)."""
        return dict(sorted((SINGLE_SIGNAL if self.signals is None else self.signals).items()))

    @property
    def signal_names(self) -> list[str]:
        return list(self.signal_losses)

    @abstractmethod
    def _build_model(self, dims: dict[str, int]) -> QuantizedAutoencoder:
        """A fresh model for signals of widths ``{name: D_k}`` (parameters drawn from the global RNG)."""

    def _seeded_model(self, dims: dict[str, int]) -> QuantizedAutoencoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._build_model(dims)

    # ---------------------------------------------------------------------------------------------------- fit

    def fit(self, x: QuantizerInput, *, progress: bool = False, writer: SummaryWriter | None = None) -> Self:
        """Trains on ``x`` (``{name: [N, D_k]}``, or ``[N, D]`` with one signal) on one process.

        ``writer`` gets every numeric history entry as ``<name>/<key>`` per epoch; ``progress`` shows a bar.
        """
        self.check_params()
        refuse_distributed(self.name)
        signals = check_signals(x, self.signal_losses)
        dims = {name: s.shape[1] for name, s in signals.items()}
        generator = torch.Generator().manual_seed(self.seed)
        train, valid = split_rows(len(next(iter(signals.values()))), self.valid_frac, generator)
        model = self._seeded_model(dims)
        with torch.no_grad():
            model.initialise(take_rows(signals, train[: self.init_rows]), generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        self.history_ = []
        best_loss, best_state, waited = math.inf, copy.deepcopy(model.state_dict()), 0
        with tqdm(total=self.max_epochs, desc=self.name, disable=not progress) as bar:
            for epoch in range(self.max_epochs):
                entry = {"epoch": epoch, **self._train_epoch(model, optimizer, signals, train, generator)}
                entry["reseeded"] = model.reseed_dead(generator) if self.reseed_dead_codes else 0
                if entry["reseeded"]:
                    after = self._utilization(model, take_rows(signals, train))
                    entry["utilization_after_reseed"] = sum(after) / len(after)
                else:
                    entry["utilization_after_reseed"] = entry["utilization"]
                entry["valid_loss"] = self._evaluate(model, take_rows(signals, valid))
                if epoch == 0 or entry["valid_loss"] < best_loss - self.tol * abs(best_loss):
                    best_loss, best_state, waited = entry["valid_loss"], copy.deepcopy(model.state_dict()), 0
                else:
                    waited += 1
                entry["best_valid_loss"] = best_loss
                self._record(entry, writer, bar)
                if waited >= self.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            model.calibrate(take_rows(signals, train))
        self.history_[-1]["fitted_utilization"] = self._utilization(model, take_rows(signals, train))
        self.model_, self.signal_dims_ = model, dims
        return self

    @torch.no_grad()
    def _utilization(self, model: QuantizedAutoencoder, signals: Signals) -> list[float]:
        """Per level, the fraction of codes that ``signals`` use under ``model`` in eval mode (training mode kept)."""
        training = model.training
        model.eval()
        codes = self._in_chunks(model.encode, signals)
        model.train(training)
        return utilization(codes, self.cardinalities)

    def _train_epoch(self, model: QuantizedAutoencoder, optimizer: torch.optim.Optimizer, signals: Signals,
                     train: Tensor, generator: torch.Generator) -> dict[str, Any]:
        """One pass over the shuffled training rows; returns the epoch's mean losses and code utilisation."""
        model.train()
        order = train[torch.randperm(len(train), generator=generator)]
        totals: dict[str, float] = {}
        codes = []
        for rows in batches(len(order), self.batch_size):
            step = model(take_rows(signals, order[rows]))
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
            size = rows.stop - rows.start
            for key, value in {"loss": step.loss, "recon": step.recon, **step.parts}.items():
                totals[key] = totals.get(key, 0.0) + value.item() * size
            codes.append(step.codes)
        per_level = utilization(torch.cat(codes), self.cardinalities)
        return {**{f"train_{key}": value / len(order) for key, value in totals.items()},
                "utilization": sum(per_level) / len(per_level), "utilization_per_level": per_level}

    @torch.no_grad()
    def _evaluate(self, model: QuantizedAutoencoder, signals: Signals) -> float:
        """Mean reconstruction loss (``Step.recon``) over ``signals`` in eval mode."""
        model.eval()
        num_rows = len(next(iter(signals.values())))
        total = sum(model(take_rows(signals, rows)).recon.item() * (rows.stop - rows.start)
                    for rows in row_chunks(num_rows, self.chunk_size))
        return total / num_rows

    def _record(self, entry: dict[str, Any], writer: SummaryWriter | None, bar: tqdm) -> None:
        self.history_.append(entry)
        if writer is not None:
            for key, value in entry.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(f"{self.name}/{key}", value, entry["epoch"])
        bar.set_postfix(train=f"{entry['train_loss']:.4f}", valid=f"{entry['valid_loss']:.4f}",
                        util=f"{entry['utilization']:.2f}")
        bar.update()

    # ------------------------------------------------------------------------------------------ encode / decode

    def _check_inputs(self, x: QuantizerInput) -> Signals:
        self._check_fitted()
        return check_signals(x, self.signal_losses, self.signal_dims_)

    def _check_full_codes(self, codes: Tensor) -> Tensor:
        self._check_fitted()
        codes = check_codes(codes, self.cardinalities)
        if codes.shape[1] != len(self.cardinalities):
            raise ValueError(f"{self.name} decodes full codes of {len(self.cardinalities)} levels, "
                             f"got {codes.shape[1]}")
        return codes

    def _in_chunks(self, fn: Callable[[Signals], Tensor], signals: Signals) -> Tensor:
        """``fn`` over chunks of ``chunk_size`` rows, concatenated."""
        num_rows = len(next(iter(signals.values())))
        return torch.cat([fn(take_rows(signals, rows)) for rows in row_chunks(num_rows, self.chunk_size)])

    def _signals_in_chunks(self, fn: Callable[[Signals], Signals], signals: Signals) -> Signals:
        """``fn`` (returning ``{name: [B, D_k]}``) over chunks of ``chunk_size`` rows, concatenated per signal."""
        num_rows = len(next(iter(signals.values())))
        parts = [fn(take_rows(signals, rows)) for rows in row_chunks(num_rows, self.chunk_size)]
        return {name: torch.cat([p[name] for p in parts]) for name in self.signal_names}

    @torch.no_grad()
    def encode(self, x: QuantizerInput) -> Tensor:
        """``{name: [N, D_k]}`` (or ``[N, D]``) -> ``codes: LongTensor[N, levels]``, in chunks of ``chunk_size``."""
        signals = self._check_inputs(x)  # first: NotFittedError before model_ is read
        return self._in_chunks(self.model_.encode, signals)

    @torch.no_grad()
    def decode_signals(self, codes: Tensor) -> Signals:
        """Full ``codes: [N, levels]`` -> reconstructions ``{name: [N, D_k]}`` in input space."""
        codes = self._check_full_codes(codes)
        return self._signals_in_chunks(lambda c: self.model_.decode(c["codes"]), {"codes": codes})

    def decode(self, codes: Tensor) -> Tensor:
        """Full ``codes: [N, levels]`` -> ``[N, sum_k D_k]``: :meth:`decode_signals` concatenated in
        :attr:`signal_names` order (one signal: its ``[N, D]``)."""
        return torch.cat(list(self.decode_signals(codes).values()), dim=1)

    # ---------------------------------------------------------------------------------------------------- files

    def _state_tensors(self) -> dict[str, Tensor]:
        dims = torch.tensor([self.signal_dims_[name] for name in self.signal_losses])
        return {"signal_dims": dims, **{f"model.{k}": v for k, v in self.model_.state_dict().items()}}

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        self.signal_dims_ = dict(zip(self.signal_losses, tensors["signal_dims"].tolist(), strict=True))
        model = self._seeded_model(self.signal_dims_)
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        self.model_ = model.eval()
