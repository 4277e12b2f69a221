"""DMQN (Wei et al., SIGIR 2025): compress a long history into interest clusters, then attend from the candidate.

Three parts, method notes in ``shared/papers/dmqn.md``:

- MCQM (:class:`MultiClusterQuantizer`): N codebooks of W codewords in N latent spaces; each event is assigned
  one codeword per codebook (Gumbel-softmax, straight-through in training, argmax at inference); a cluster is the
  mean of its events' embeddings. N·W clusters whatever L is.
- ICIM: HSTU over the N·W cluster tokens (padding = empty clusters; time bias from the clusters' mean times).
- CTAM: target attention (DIN's activation unit) from the candidate over the non-empty clusters.

MCQM and ICIM do not see the candidate: :meth:`DMQN.encode_user` gives a cacheable :class:`DMQNState` and
:meth:`DMQN.score` costs O(N·W) per candidate, independent of L. :class:`CachedDMQN` serves from a
:class:`UserStateCache` (in-process LRU by default).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from torchrec_sid.modules.history import HistoryBlock, check_history_inputs
from torchrec_sid.modules.hstu import HSTU, HSTULayer
from torchrec_sid.modules.target_attention import TargetAttention


@dataclass(frozen=True)
class TemperatureSchedule:
    """Gumbel-softmax temperature and Gumbel-noise scale over training steps.

    The temperature decays exponentially from ``initial`` to ``final`` over ``anneal_steps`` training steps, then
    stays: ``τ(s) = initial · (final / initial) ** p``, ``p = min(s, anneal_steps) / anneal_steps``. With a
    straight-through hard assignment the forward pass is ``argmax(logits + σ g)`` whatever τ is, so τ alone never
    brings training assignments to inference's ``argmax(logits)``; the noise scale ``σ(s)`` therefore anneals too,
    linearly from ``noise_initial`` to ``noise_final`` over the same steps (the method notes' schedule,
    ``papers/dmqn.md``; ``noise_final=1.0`` keeps the noise constant, the behaviour before this setting).
    Measured (``tests/test_dmqn.py::training_agreement``, N=2, W=4, seed 0): with constant noise the training
    assignment equals the eval argmax for 0.80 of (event, codebook) pairs at every step (the audit: 0.35 at N=4,
    W=25, and 0.57 after the shipped MovieLens run); with the noise annealed to 0 over 100 steps, 0.80 / 0.89 / 1.00
    at steps 0 / 50 / 100. The fidelity audit found no AUC
    difference from the noise on MovieLens-100k (0.6890 with noise vs 0.6886 without, 2 epochs, one seed), so
    the default follows the notes: the noise anneals to 0.
    """

    initial: float = 1.0
    final: float = 0.1
    anneal_steps: int = 10_000
    noise_initial: float = 1.0
    noise_final: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.final <= self.initial:
            raise ValueError(f"TemperatureSchedule: need 0 < final <= initial, got initial={self.initial}, "
                             f"final={self.final}")
        if self.anneal_steps <= 0:
            raise ValueError(f"TemperatureSchedule: anneal_steps must be positive, got {self.anneal_steps}")
        if not 0 <= self.noise_final <= self.noise_initial:
            raise ValueError(f"TemperatureSchedule: need 0 <= noise_final <= noise_initial, got noise_initial="
                             f"{self.noise_initial}, noise_final={self.noise_final}")

    def _progress(self, step: Tensor) -> Tensor:
        return step.clamp(max=self.anneal_steps) / self.anneal_steps

    def __call__(self, step: Tensor) -> Tensor:
        """τ at training step ``step`` (a scalar tensor)."""
        return self.initial * (self.final / self.initial) ** self._progress(step)

    def noise_scale(self, step: Tensor) -> Tensor:
        """σ, the scale of the Gumbel noise, at training step ``step`` (a scalar tensor)."""
        return self.noise_initial + (self.noise_final - self.noise_initial) * self._progress(step)


def gumbel_softmax_scaled(logits: Tensor, tau: Tensor, noise_scale: Tensor) -> Tensor:
    """``softmax((logits + σ g) / τ)`` over the last dim, ``g`` standard Gumbel noise (``F.gumbel_softmax`` at
    σ = 1)."""
    gumbels = -torch.empty_like(logits).exponential_().log()
    return torch.softmax((logits + noise_scale * gumbels) / tau, dim=-1)


@torch.fx.wrap
def gumbel_straight_through(logits: Tensor, step: Tensor, schedule: tuple[float, float, int, float, float]) -> Tensor:
    """Training assignment over the last dim of ``logits``: a Gumbel-softmax draw at ``τ(step)`` and noise scale
    ``σ(step)`` (``schedule``: the fields of :class:`TemperatureSchedule`), one-hot in value with the soft gradient;
    advances the step counter ``step`` in place. An fx leaf, since fx does not proxy buffers: a traced module then
    reads and advances the step at run time, as the eager one does."""
    annealing = TemperatureSchedule(*schedule)
    soft = gumbel_softmax_scaled(logits, annealing(step), annealing.noise_scale(step))
    step.add_(1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.size(-1)).to(soft.dtype)
    return hard - soft.detach() + soft


class Clusters(NamedTuple):
    """MCQM's output; ``M = N·W`` clusters, codebook-major."""

    embeddings: Tensor  # [B, M, D] mean of the assigned events, zeros for an empty cluster
    counts: Tensor  # [B, M] events assigned
    timestamps: Tensor | None  # [B, M] float64 mean time of the assigned events (0 when empty)


EVAL_CHUNK_EVENTS = 8192
"""Events per step of the eval pooling (:func:`pool_argmax`): a step's events (``[8192, D]``, 2 MiB at D = 64) and
scores stay in cache from the GEMM through the argmax to the pooling, so each event is read from memory once instead
of N + 1 times. Measured (DMQN forward, B = 32, L = 10,000, one thread, CPU time, load ~9): 1,024 to 16,384 events
per step take 225-265 ms, 32,768 310 ms, 65,536 500 ms, the one-hot path 1,530-1,810 ms; fewer steps mean fewer
parallel regions, which cost the most when other processes hold the cores."""


def first_argmax(scores: Tensor, dim: int) -> Tensor:
    """``scores.argmax(dim)`` (the first maximum) for slices of finite floats; a slice holding a NaN or an infinity
    still gets an index in range (not always argmax's).

    ``argmax`` over a short dim is a scalar loop on CPU, while ``amax``, a subtraction and ``sign`` vectorise
    (measured on one thread, ``[4, 32, 4096]`` over dim 1: 0.40 ms against ``max``'s 0.97 and ``argmax``'s 1.2). At
    a maximum ``sign(s - max)`` is 0, elsewhere -1, so ``amax(size · sign(s - max) + size - index)`` is ``size``
    minus the first maximum's index. Exact for sizes up to 2**24 in float32.
    """
    size = scores.size(dim)
    shape = [1] * scores.dim()
    shape[dim] = size
    reversed_index = torch.arange(size, 0, -1, dtype=scores.dtype, device=scores.device).view(shape)
    key = (scores - scores.amax(dim, keepdim=True)).sign_().mul_(size).add_(reversed_index)
    return (size - key.amax(dim).nan_to_num_(nan=float(size))).long()


def _cluster_rows(scorer: Tensor, events: Tensor, valid: Tensor, first_event: int, length: int,
                  codebook_size: int, spare: int) -> Tensor:
    """Rows of the ``[B·M + 1]`` cluster table that events ``first_event ..`` of the flattened ``[B·L]`` history
    join, ``[N, c]`` for ``events: [c, D]``, ``valid: [c]``; masked events join row ``spare``."""
    clusters = scorer.size(0)
    num_codebooks = clusters // codebook_size
    with torch.no_grad():  # a discrete assignment: no gradient, no autograd graph over the [M, c] scores
        scores = (scorer @ events.t()).view(num_codebooks, codebook_size, -1)  # [N, W, c]
        codes = first_argmax(scores, dim=1)  # [N, c]
    offsets = torch.arange(num_codebooks, device=events.device)[:, None] * codebook_size  # [N, 1]
    positions = torch.arange(first_event, first_event + events.size(0), device=events.device)
    users = positions // length * clusters  # [c]
    return torch.where(valid, codes + offsets + users, spare)


@torch.fx.wrap
def pool_argmax(history: Tensor, mask: Tensor, scorer: Tensor, codebook_size: int,
                chunk_events: int) -> tuple[Tensor, Tensor, Tensor]:
    """MCQM's eval pooling: each event joins its argmax cluster in every codebook, and a cluster is the mean of its
    events. ``history: [B, L, D]``, ``mask: [B, L]``, ``scorer: [M, D]`` (:meth:`MultiClusterQuantizer.folded_scorer`,
    M = N·W) → ``(embeddings [B, M, D], counts [B, M], rows [N, B·L])``, ``rows`` each event's row in the
    ``[B·M + 1]`` cluster table (masked events: the last, spare row).

    Eager CPU runs take ``chunk_events`` events at a time: their scores (``[M, c]``), argmax and ``index_add`` into
    the ``[B·M, D]`` sums while they are in cache (no ``[B, L, M]`` one-hot, no ``[B·L, M]`` scores in memory). An
    exported or compiled trace takes all events in one step (no loop over a symbolic length), and so does a GPU,
    where kernel launches, not cache misses, are what steps would add (not measured: no GPU here). An fx leaf: a
    traced model runs it as the eager one does.
    """
    batch, length, dim = history.shape
    clusters = scorer.size(0)
    num_codebooks = clusters // codebook_size
    spare = batch * clusters
    events, valid = history.reshape(-1, dim), mask.reshape(-1)
    total = events.size(0)
    one_step = torch.compiler.is_compiling() or history.device.type != "cpu"
    steps = [(0, total)] if one_step else [
        (start, min(start + chunk_events, total)) for start in range(0, total, chunk_events)]
    rows = torch.empty((num_codebooks, total), dtype=torch.long, device=history.device)
    sums = history.new_zeros((spare + 1, dim))
    for start, stop in steps:
        step_rows = _cluster_rows(scorer, events[start:stop], valid[start:stop], start, length, codebook_size, spare)
        rows[:, start:stop] = step_rows
        for codebook in range(num_codebooks):
            sums.index_add_(0, step_rows[codebook], events[start:stop])
    counts = history.new_zeros(spare + 1)
    ones = history.new_ones(total)
    for codebook in range(num_codebooks):
        counts.index_add_(0, rows[codebook], ones)
    counts = counts[:-1].view(batch, clusters)
    return sums[:-1].view(batch, clusters, dim) / counts.clamp(min=1)[..., None], counts, rows


@torch.fx.wrap
def pool_mean_times(rows: Tensor, timestamps: Tensor, counts: Tensor) -> Tensor:
    """Mean time of each cluster's events, ``[B, M]`` float64 (0 when empty), from :func:`pool_argmax`'s ``rows:
    [N, B·L]`` and ``counts: [B, M]``, ``timestamps: [B, L]``."""
    times = timestamps.reshape(-1).double()
    sums = times.new_zeros(counts.numel() + 1)
    for codebook_rows in rows:
        sums.index_add_(0, codebook_rows, times)
    return sums[:-1].view_as(counts) / counts.double().clamp(min=1)


class MultiClusterQuantizer(nn.Module):
    """MCQM: each event gets one codeword in each of N codebooks; clusters pool the events assigned to them.

    Logits of event e in codebook j are ``scale · cos(e·P_j, C_j)`` (``P_j: [D, D']``, ``C_j: [W, D']``).
    Training draws a Gumbel-softmax assignment at the scheduled temperature, one-hot in value with the soft
    gradient (straight-through), and advances the schedule by one step per call; evaluation takes the argmax.

    Args:
        embedding_dim: D.
        num_codebooks: N.
        codebook_size: W.
        latent_dim: D'.
        temperature: the Gumbel-softmax temperature schedule.
        logit_scale: scale of the cosine logits.

    Example::

        mcqm = MultiClusterQuantizer(embedding_dim=8, num_codebooks=2, codebook_size=4, latent_dim=4).eval()
        history, mask = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool)
        clusters = mcqm(history, mask)
        clusters.embeddings.shape, clusters.counts.sum()  # [1, 8, 8], 10 (5 events x 2 codebooks)
    """

    if TYPE_CHECKING:  # buffer types for mypy; TorchScript cannot read class-level annotations here
        step: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_codebooks: int,
        codebook_size: int,
        latent_dim: int,
        temperature: TemperatureSchedule = TemperatureSchedule(),
        logit_scale: float = 10.0,
    ) -> None:
        super().__init__()
        sizes = {"embedding_dim": embedding_dim, "num_codebooks": num_codebooks, "codebook_size": codebook_size,
                 "latent_dim": latent_dim, "logit_scale": logit_scale}
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"MultiClusterQuantizer: {name} must be positive, got {value}")
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.schedule = temperature
        self.logit_scale = logit_scale
        self.projections = nn.Parameter(torch.randn(num_codebooks, embedding_dim, latent_dim) / embedding_dim**0.5)
        self.codebooks = nn.Parameter(torch.randn(num_codebooks, codebook_size, latent_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def temperature(self) -> Tensor:
        """The current Gumbel-softmax temperature τ (a scalar tensor)."""
        return self.schedule(self.step)

    def logits(self, history: Tensor) -> Tensor:
        """``history: [B, L, D]`` → assignment logits ``[B, L, N, W]``."""
        latent = F.normalize(torch.einsum("bld,nde->blne", history, self.projections), dim=-1)
        return self.logit_scale * torch.einsum("blne,nwe->blnw", latent, F.normalize(self.codebooks, dim=-1))

    def noise_scale(self) -> Tensor:
        """The current scale σ of the Gumbel noise (a scalar tensor)."""
        return self.schedule.noise_scale(self.step)

    def gumbel_probabilities(self, history: Tensor) -> Tensor:
        """Soft Gumbel-softmax assignment at the current temperature and noise scale, ``[B, L, N, W]``; one-hot as
        τ → 0.

        Training draws these (and advances the schedule); their sharpness shows the schedule's progress.
        """
        return gumbel_softmax_scaled(self.logits(history), self.temperature(), self.noise_scale())

    def forward(self, history: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Clusters:
        """``history: [B, L, D]``, ``mask: [B, L]`` bool, ``timestamps: [B, L]`` → :class:`Clusters` (M = N·W)."""
        if not self.training:
            return self._pool_argmax(history, mask, timestamps)
        history = torch.where(mask[..., None], history, 0.0)
        assignment = gumbel_straight_through(self.logits(history), self.step, astuple(self.schedule))
        assignment = (assignment * mask[..., None, None]).flatten(2)  # [B, L, M]
        counts = assignment.sum(dim=1)
        denominator = counts.detach().clamp(min=1)[..., None]
        embeddings = (assignment.transpose(1, 2) @ history) / denominator
        mean_times = None
        if timestamps is not None:
            times = torch.where(mask, timestamps, 0).double()
            mean_times = (assignment.detach().double().transpose(1, 2) @ times[..., None]).squeeze(-1)
            mean_times = mean_times / counts.detach().double().clamp(min=1)
        return Clusters(embeddings, counts, mean_times)

    def folded_scorer(self) -> Tensor:
        """``[N·W, D]``: row ``n·W + w`` scores an event against codeword w of codebook n, up to a positive factor
        shared by the codebook's W scores (the event's latent norm), so the argmax over W is that of :meth:`logits`
        but for ties within float rounding.

        The projections and the normalised codebooks fold into one matrix: one GEMM instead of two and a
        normalisation over ``[B, L, N, D']``.
        """
        return torch.einsum("nde,nwe->nwd", self.projections, F.normalize(self.codebooks, dim=-1)).flatten(0, 1)

    def argmax_codes(self, history: Tensor) -> Tensor:
        """``history: [B, L, D]`` → every event's codeword per codebook in the eval forward, ``[B, L, N]``: the
        argmax of :meth:`logits` but for ties within float rounding."""
        scores = history @ self.folded_scorer().t()  # [B, L, N·W]
        return first_argmax(scores.unflatten(-1, (self.num_codebooks, self.codebook_size)), dim=-1)

    def _pool_argmax(self, history: Tensor, mask: Tensor, timestamps: Tensor | None) -> Clusters:
        """The eval forward: each event joins its argmax cluster in every codebook (:func:`pool_argmax`)."""
        pooled = pool_argmax(history, mask, self.folded_scorer(), self.codebook_size, EVAL_CHUNK_EVENTS)
        embeddings, counts, rows = pooled[0], pooled[1], pooled[2]
        mean_times = None if timestamps is None else pool_mean_times(rows, timestamps, counts)
        return Clusters(embeddings, counts, mean_times)


class DMQNState(NamedTuple):
    """A user's candidate-independent DMQN state, what :class:`CachedDMQN` caches."""

    clusters: Tensor  # [B, M, D] cluster tokens after ICIM, zeros at empty clusters
    mask: Tensor  # [B, M] bool, True at non-empty clusters


class DMQN(HistoryBlock):
    """DMQN: MCQM clusters of the whole history → HSTU over clusters (ICIM) → candidate attention (CTAM).

    A cluster token is the mean of its events + a learned embedding of its (codebook, codeword) + ``log(1 +
    count)`` times a learned vector. Empty clusters are padding for ICIM and CTAM, so a history without events
    gives zeros. Uses ``history_timestamps`` (when given and ``num_time_buckets > 0``) for ICIM's time bias
    between cluster mean times; ignores ``history_keys`` and ``candidate_key``. Each training forward advances
    the Gumbel temperature schedule by one step.

    Args:
        embedding_dim: D of history and candidate embeddings; also ``output_dim``.
        num_codebooks: N.
        codebook_size: W (N·W clusters in all).
        latent_dim: D' of each codebook's latent space.
        num_layers: HSTU layers in ICIM.
        num_heads: HSTU heads.
        attention_dim: HSTU per-head dimension (queries, keys and values).
        num_time_buckets: ICIM's time-bias buckets; 0 ignores timestamps.
        attention_hidden_dims: hidden widths of CTAM's activation unit.
        temperature: MCQM's Gumbel-softmax temperature schedule.
        logit_scale: scale of MCQM's cosine logits.
        dropout: HSTU dropout.

    Example::

        # 2 users, histories of 6 and 2 events padded to L=6; one candidate each
        dmqn = DMQN(embedding_dim=8, num_codebooks=2, codebook_size=4).eval()
        history, mask = torch.randn(2, 6, 8), torch.arange(6) < torch.tensor([[6], [2]])
        timestamps = torch.arange(12).view(2, 6) * 3600
        dmqn(history, mask, torch.randn(2, 8), history_timestamps=timestamps)  # [2, 8]
        state = dmqn.encode_user(history, mask, timestamps)  # cacheable, candidate-independent
        dmqn.score(state, torch.randn(2, 256, 8))  # [2, 256, 8]: 256 candidates per user
    """

    def __init__(
        self,
        embedding_dim: int,
        num_codebooks: int = 4,
        codebook_size: int = 32,
        latent_dim: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        attention_dim: int = 32,
        num_time_buckets: int = 32,
        attention_hidden_dims: Sequence[int] = (80, 40),
        temperature: TemperatureSchedule = TemperatureSchedule(),
        logit_scale: float = 10.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"DMQN: num_layers must be positive, got {num_layers}")
        self.embedding_dim = embedding_dim
        self.output_dim = embedding_dim
        self.uses_time = num_time_buckets > 0
        self.quantizer = MultiClusterQuantizer(embedding_dim, num_codebooks, codebook_size, latent_dim,
                                               temperature, logit_scale)
        num_clusters = num_codebooks * codebook_size
        self.cluster_embedding = nn.Parameter(0.02 * torch.randn(num_clusters, embedding_dim))
        self.size_embedding = nn.Parameter(0.02 * torch.randn(embedding_dim))
        self.interaction = HSTU([
            HSTULayer(embedding_dim, num_heads, attention_dim, attention_dim, max_relative_position=None,
                      num_time_buckets=num_time_buckets, dropout=dropout)
            for _ in range(num_layers)
        ])
        self.target_attention = TargetAttention(embedding_dim, attention_hidden_dims)

    def encode_user(self, history: Tensor, mask: Tensor, history_timestamps: Tensor | None = None) -> DMQNState:
        """MCQM + ICIM: ``history: [B, L, D]``, ``mask: [B, L]``, ``history_timestamps: [B, L]`` → state."""
        check_history_inputs("DMQN", self.embedding_dim, history, mask, history_timestamps=history_timestamps)
        clusters = self.quantizer(history, mask, history_timestamps if self.uses_time else None)
        tokens = (clusters.embeddings + self.cluster_embedding
                  + torch.log1p(clusters.counts)[..., None] * self.size_embedding)
        cluster_mask = clusters.counts.detach() > 0
        return DMQNState(self.interaction(tokens, cluster_mask, clusters.timestamps), cluster_mask)

    def score(self, state: DMQNState, candidates: Tensor) -> Tensor:
        """CTAM: ``candidates: [B, C, D]`` against ``state`` (batch B) → interest vectors ``[B, C, D]``."""
        if not is_fx_symbolic_tracing() and (
            candidates.dim() != 3 or candidates.size(0) != state.clusters.size(0)
            or candidates.size(-1) != self.embedding_dim
        ):
            raise ValueError(f"DMQN: candidates must be [B={state.clusters.size(0)}, C, D={self.embedding_dim}], "
                             f"got shape {tuple(candidates.shape)}")
        return self.target_attention(state.clusters, state.mask, candidates)

    def forward(
        self,
        history: Tensor,
        mask: Tensor,
        candidate: Tensor,
        history_timestamps: Tensor | None = None,
        history_keys: Tensor | None = None,
        candidate_key: Tensor | None = None,
    ) -> Tensor:
        """``history: [B, L, D]``, ``mask: [B, L]``, ``candidate: [B, D]``, ``history_timestamps: [B, L]`` →
        ``[B, D]``."""
        check_history_inputs("DMQN", self.embedding_dim, history, mask, candidate)
        state = self.encode_user(history, mask, history_timestamps)
        return self.score(state, candidate[:, None]).squeeze(1)


class UserStateCache(Protocol):
    """Where :class:`CachedDMQN` keeps user states (in-process LRU, Redis, ...), by user key."""

    def get(self, key: Hashable) -> DMQNState | None: ...

    def put(self, key: Hashable, state: DMQNState) -> None: ...


class LRUStateCache:
    """In-process :class:`UserStateCache` holding the ``capacity`` most recently used states.

    Example::

        cache = LRUStateCache(capacity=2)
        state = DMQNState(clusters=torch.randn(128, 8), mask=torch.ones(128, dtype=torch.bool))  # one user
        cache.put(("user 7", 120), state)  # key: (user id, history version)
        cache.get(("user 7", 120))          # state; None once evicted or never put
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity <= 0:
            raise ValueError(f"LRUStateCache: capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._states: OrderedDict[Hashable, DMQNState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: Hashable) -> DMQNState | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: Hashable, state: DMQNState) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        if len(self._states) > self.capacity:
            self._states.popitem(last=False)


class UserHistory(NamedTuple):
    """Padded histories of some users, as :meth:`DMQN.encode_user` takes them."""

    history: Tensor  # [m, L, D]
    mask: Tensor  # [m, L] bool
    timestamps: Tensor | None = None  # [m, L]


class CachedDMQN:
    """Online DMQN: user states come from a cache; only the users missing from it are loaded and encoded.

    A key names one user's history, e.g. ``(user_id, history_version)`` such as the number of events or the
    time of the latest one, so a history update misses the cache; add a model version to the key when weights
    change. States are encoded without gradients, with the model in eval mode.

    Args:
        model: the DMQN, in eval mode.
        cache: the state store; default a new :class:`LRUStateCache`.

    Example::

        dmqn = DMQN(embedding_dim=8, num_codebooks=2, codebook_size=4).eval()
        history, mask = torch.randn(2, 6, 8), torch.arange(6) < torch.tensor([[6], [2]])
        serving = CachedDMQN(dmqn)
        load = lambda rows: UserHistory(history[rows], mask[rows])  # called for cache misses only
        keys = [("u1", 6), ("u2", 2)]  # (user id, history version)
        serving.score(keys, candidates=torch.randn(2, 256, 8), load_history=load)  # [2, 256, 8]; encodes both
        serving.score(keys, candidates=torch.randn(2, 256, 8), load_history=load)  # cache hits: CTAM only
    """

    def __init__(self, model: DMQN, cache: UserStateCache | None = None) -> None:
        self.model = model
        self.cache: UserStateCache = cache if cache is not None else LRUStateCache()

    def user_states(self, keys: Sequence[Hashable], load_history: Callable[[list[int]], UserHistory]) -> DMQNState:
        """States of ``keys`` (batch B = len(keys)); ``load_history(rows)`` gives the histories of ``keys[rows]``
        and is called once, only when some keys miss the cache."""
        if self.model.training:
            raise ValueError("CachedDMQN: the model is in training mode (random assignments); call model.eval()")
        cached = [self.cache.get(key) for key in keys]
        missing = [row for row, state in enumerate(cached) if state is None]
        if missing:
            with torch.no_grad():
                encoded = self.model.encode_user(*load_history(missing))
            for i, row in enumerate(missing):
                cached[row] = state = DMQNState(encoded.clusters[i].clone(), encoded.mask[i].clone())
                self.cache.put(keys[row], state)
        states = [s for s in cached if s is not None]
        return DMQNState(torch.stack([s.clusters for s in states]), torch.stack([s.mask for s in states]))

    def score(self, keys: Sequence[Hashable], candidates: Tensor,
              load_history: Callable[[list[int]], UserHistory]) -> Tensor:
        """``candidates: [B, C, D]`` for users ``keys`` (len B) → interest vectors ``[B, C, D]``."""
        with torch.no_grad():
            return self.model.score(self.user_states(keys, load_history), candidates)
