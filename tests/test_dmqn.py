from __future__ import annotations

from dataclasses import astuple

import pytest
import torch
import torch.nn.functional as F
from torchrec.fx import symbolic_trace

from torchrec_sid.modules import (
    DMQN,
    CachedDMQN,
    DMQNState,
    LRUStateCache,
    MultiClusterQuantizer,
    TemperatureSchedule,
    UserHistory,
    dmqn,
    padding_mask,
)
from torchrec_sid.modules.dmqn import Clusters, first_argmax, gumbel_straight_through

D, N, W = 8, 2, 4
LENGTHS = [0, 1, 7]


def _model(num_time_buckets: int = 16) -> DMQN:
    torch.manual_seed(0)
    return DMQN(D, num_codebooks=N, codebook_size=W, latent_dim=4, num_layers=2, attention_dim=4,
                num_time_buckets=num_time_buckets, attention_hidden_dims=(8, 4))


def _inputs(lengths: list[int] = LENGTHS, width: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "history": torch.randn(len(lengths), width, D, generator=g),
        "mask": padding_mask(torch.tensor(lengths), width),
        "candidate": torch.randn(len(lengths), D, generator=g),
        "history_timestamps": torch.randint(0, 10**7, (len(lengths), width), generator=g).sort(dim=1).values,
    }


@pytest.mark.parametrize("training", [False, True])
def test_shapes_for_empty_single_and_mixed_histories(training: bool) -> None:
    model, inputs = _model().train(training), _inputs()
    out = model(**inputs)
    assert out.shape == (3, model.output_dim) and torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1:] != 0).any(dim=1).all()
    state = model.encode_user(inputs["history"], inputs["mask"], inputs["history_timestamps"])
    assert state.clusters.shape == (3, N * W, D) and state.mask.sum(dim=1).tolist()[:2] == [0, N]
    assert (state.clusters[~state.mask] == 0).all()


def test_garbage_padding_never_changes_the_output() -> None:
    model, inputs = _model().eval(), _inputs()
    padded = dict(inputs)
    padded["history"] = torch.cat([inputs["history"], torch.full((3, 5, D), float("nan"))], dim=1)
    padded["history"][1, 1:] = 1e6
    padded["mask"] = torch.cat([inputs["mask"], torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    padded["history_timestamps"] = torch.cat([inputs["history_timestamps"], torch.full((3, 5), -(10**12))], dim=1)
    torch.testing.assert_close(model(**padded), model(**inputs))


def test_gumbel_assignment_becomes_one_hot_as_the_temperature_falls() -> None:
    torch.manual_seed(0)
    mcqm = MultiClusterQuantizer(D, N, W, latent_dim=4, temperature=TemperatureSchedule(1.0, 0.01, 10))
    history = torch.randn(4, 50, D)
    sharpness = []
    for step in (0, 5, 10):
        mcqm.step.fill_(step)
        sharpness.append(mcqm.gumbel_probabilities(history).amax(dim=-1).mean().item())
    assert sharpness[0] < 0.9 < sharpness[1] < sharpness[2] and sharpness[2] > 0.99


def test_temperature_schedule_decays_exponentially_then_stays() -> None:
    schedule = TemperatureSchedule(initial=1.0, final=0.1, anneal_steps=100)
    taus = [schedule(torch.tensor(s)).item() for s in (0, 50, 100, 1000)]
    assert taus == pytest.approx([1.0, 0.1**0.5, 0.1, 0.1])


def training_agreement(noise_final: float, step: int) -> float:
    """Fraction of (event, codebook) pairs whose training (Gumbel) assignment at ``step`` is the eval argmax."""
    torch.manual_seed(0)
    schedule = TemperatureSchedule(1.0, 0.1, anneal_steps=100, noise_initial=1.0, noise_final=noise_final)
    mcqm = MultiClusterQuantizer(D, N, W, latent_dim=4, temperature=schedule)
    history, mask = torch.randn(4, 50, D), torch.ones(4, 50, dtype=torch.bool)
    inference = mcqm.logits(history).argmax(-1)
    mcqm.step.fill_(step)
    training = gumbel_straight_through(mcqm.logits(history), mcqm.step, astuple(schedule)).argmax(-1)
    assert mask.all()
    return (training == inference).double().mean().item()


def test_annealed_noise_brings_training_assignments_to_inference() -> None:
    """τ does not enter a hard straight-through forward pass, so only annealing the Gumbel noise makes training
    assign events as inference does; with constant noise the agreement stays where it starts."""
    constant = [training_agreement(1.0, step) for step in (0, 100, 10_000)]
    annealed = [training_agreement(0.0, step) for step in (0, 50, 100)]
    assert constant[0] == constant[1] == constant[2] < 0.9 and annealed[0] == constant[0]  # same draws per step
    assert annealed[0] < annealed[1] < annealed[2] == 1.0
    schedule = TemperatureSchedule(anneal_steps=10, noise_initial=2.0, noise_final=0.5)
    assert [schedule.noise_scale(torch.tensor(s)).item() for s in (0, 5, 10, 99)] == [2.0, 1.25, 0.5, 0.5]
    with pytest.raises(ValueError, match="need 0 <= noise_final <= noise_initial"):
        TemperatureSchedule(noise_final=2.0)


def one_hot_clusters(mcqm: MultiClusterQuantizer, history: torch.Tensor, mask: torch.Tensor,
                     timestamps: torch.Tensor) -> Clusters:
    """The eval clusters as the training path pools them, with the argmax of :meth:`logits` as the assignment."""
    history = torch.where(mask[..., None], history, 0.0)
    assignment = F.one_hot(mcqm.logits(history).argmax(-1), W).to(history.dtype)
    assignment = (assignment * mask[..., None, None]).flatten(2)  # [B, L, M]
    counts = assignment.sum(dim=1)
    times = torch.where(mask, timestamps, 0).double()
    mean_times = (assignment.double().transpose(1, 2) @ times[..., None]).squeeze(-1) / counts.double().clamp(min=1)
    return Clusters(assignment.transpose(1, 2) @ history / counts.clamp(min=1)[..., None], counts, mean_times)


@pytest.mark.parametrize(("chunk_events", "compiling"), [(5, False), (4096, False), (5, True)])
def test_eval_pooling_equals_the_one_hot_assignment(chunk_events: int, compiling: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 5 events cross users (L = 7) and masked events; an exported trace pools in one step."""
    monkeypatch.setattr(dmqn, "EVAL_CHUNK_EVENTS", chunk_events)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    mcqm, inputs = _model().quantizer.eval(), _inputs([0, 3, 7, 6])
    got = mcqm(inputs["history"], inputs["mask"], inputs["history_timestamps"])
    expected = one_hot_clusters(mcqm, inputs["history"], inputs["mask"], inputs["history_timestamps"])
    assert torch.equal(got.counts, expected.counts) and got.counts.sum(dim=1).tolist() == [0, 3 * N, 7 * N, 6 * N]
    torch.testing.assert_close(got.embeddings, expected.embeddings)
    torch.testing.assert_close(got.timestamps, expected.timestamps)


def test_first_argmax_is_argmax_with_ties_and_stays_in_range_on_non_finite_rows() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 6, 50), generator=g).float()  # many ties: the first maximum wins
    assert torch.equal(first_argmax(scores, dim=1), scores.argmax(dim=1))
    assert torch.equal(first_argmax(scores, dim=-1), scores.argmax(dim=-1))
    scores[0, 2, 0], scores[0, :, 1], scores[0, 3, 2] = float("nan"), float("-inf"), float("inf")
    codes = first_argmax(scores, dim=1)[0, :3]  # a NaN, all -inf, an inf maximum
    assert ((codes >= 0) & (codes < 6)).all() and codes[2] == 3


def test_training_advances_the_schedule_and_assigns_one_hot() -> None:
    model, inputs = _model(), _inputs()
    model.eval()(**inputs)
    assert model.quantizer.step.item() == 0
    clusters = model.train().quantizer(inputs["history"], inputs["mask"])
    assert model.quantizer.step.item() == 1
    counts = clusters.counts.detach()
    assert torch.equal(counts, counts.round()) and counts.sum(dim=1).tolist() == [0, N * 1, N * 7]


def test_gradients_reach_the_codebooks() -> None:
    model, inputs = _model().train(), _inputs()
    model(**inputs).sum().backward()
    codebooks, projections = model.quantizer.codebooks.grad, model.quantizer.projections.grad
    assert codebooks is not None and projections is not None
    assert codebooks.abs().sum() > 0 and projections.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_score_many_candidates_matches_forward_one_at_a_time() -> None:
    model, inputs = _model().eval(), _inputs()
    candidates = torch.randn(3, 5, D)
    state = model.encode_user(inputs["history"], inputs["mask"], inputs["history_timestamps"])
    many = model.score(state, candidates)
    for c in range(5):
        torch.testing.assert_close(many[:, c], model(**(inputs | {"candidate": candidates[:, c]})))


def test_cached_scores_equal_uncached_and_load_only_misses() -> None:
    model, inputs = _model().eval(), _inputs()
    candidates = torch.randn(3, 4, D)
    loaded: list[list[int]] = []

    def load(rows: list[int]) -> UserHistory:
        loaded.append(rows)
        return UserHistory(inputs["history"][rows], inputs["mask"][rows], inputs["history_timestamps"][rows])

    serving = CachedDMQN(model, LRUStateCache(capacity=10))
    keys = [("u0", 0), ("u1", 1), ("u2", 7)]
    with torch.no_grad():
        uncached = model.score(model.encode_user(inputs["history"], inputs["mask"], inputs["history_timestamps"]),
                               candidates)
    first = serving.score(keys, candidates, load)
    second = serving.score(keys, candidates, load)
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    assert loaded == [[0, 1, 2]]
    swapped = serving.score([keys[2], ("u9", 3), keys[0]], candidates[[2, 0, 0]], load)
    assert loaded[-1] == [1] and torch.equal(swapped[0], uncached[2]) and torch.equal(swapped[2], uncached[0])


def test_lru_cache_evicts_the_least_recently_used() -> None:
    state = DMQNState(torch.zeros(N * W, D), torch.zeros(N * W, dtype=torch.bool))
    cache = LRUStateCache(capacity=2)
    cache.put("a", state)
    cache.put("b", state)
    assert cache.get("a") is state  # "a" is now the most recent
    cache.put("c", state)
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is state and cache.get("c") is state


def test_seeded_runs_are_identical() -> None:
    inputs = _inputs()
    outputs = []
    for _ in range(2):
        model = _model().train()
        torch.manual_seed(123)
        outputs.append(model(**inputs))
    assert torch.equal(*outputs)


def test_traced_training_advances_the_schedule_like_eager() -> None:
    model, inputs = _model().train(), _inputs()
    traced = symbolic_trace(model, concrete_args={"history_keys": None, "candidate_key": None})
    assert model.quantizer.step.item() == 0  # tracing runs nothing
    outputs = []
    for module in (traced, model):
        torch.manual_seed(5)
        outputs.append([module(**inputs) for _ in range(2)])
    assert model.quantizer.step.item() == 4  # the traced module shares the buffer
    for traced_out, eager_out in zip(*outputs):
        torch.testing.assert_close(traced_out, eager_out)


@pytest.mark.parametrize("with_time", [True, False])
def test_traced_model_matches_eager(with_time: bool) -> None:
    model, inputs = _model().eval(), _inputs()
    concrete = {"history_keys": None, "candidate_key": None} | ({} if with_time else {"history_timestamps": None})
    if not with_time:
        del inputs["history_timestamps"]
    traced = symbolic_trace(model, concrete_args=concrete)
    torch.testing.assert_close(traced(**inputs), model(**inputs))


def test_timestamps_drive_the_time_bias_unless_disabled() -> None:
    inputs = _inputs()
    rescaled = inputs | {"history_timestamps": inputs["history_timestamps"] // 1000}  # other time buckets
    timed = _model().eval()
    assert not torch.allclose(timed(**inputs), timed(**rescaled))
    untimed = _model(num_time_buckets=0).eval()
    torch.testing.assert_close(untimed(**inputs), untimed(**rescaled))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"history": torch.randn(3, 7)}, r"DMQN: history must be \[B, L, D=8\], got shape \(3, 7\)"),
        ({"mask": torch.ones(3, 6, dtype=torch.bool)}, r"DMQN: mask must be bool \[B, L\]=\(3, 7\)"),
        ({"candidate": torch.randn(4, D)}, r"DMQN: candidate must be \[B, D\]=\(3, 8\), got shape \(4, 8\)"),
        ({"history_timestamps": torch.zeros(3, 2)}, r"DMQN: history_timestamps must be \[B, L\]=\(3, 7\)"),
    ],
)
def test_bad_inputs_raise_with_the_shape(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _model()(**(_inputs() | change))


def test_bad_candidates_settings_and_serving_mode_raise() -> None:
    model, inputs = _model().eval(), _inputs()
    state = model.encode_user(inputs["history"], inputs["mask"])
    with pytest.raises(ValueError, match=r"candidates must be \[B=3, C, D=8\], got shape \(3, 8\)"):
        model.score(state, inputs["candidate"])
    with pytest.raises(ValueError, match="need 0 < final <= initial, got initial=1.0, final=-0.1"):
        TemperatureSchedule(final=-0.1)
    with pytest.raises(ValueError, match="anneal_steps must be positive, got 0"):
        TemperatureSchedule(anneal_steps=0)
    with pytest.raises(ValueError, match="codebook_size must be positive, got 0"):
        DMQN(D, codebook_size=0)
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        LRUStateCache(capacity=0)
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        CachedDMQN(model.train()).user_states(["u"], lambda rows: UserHistory(inputs["history"], inputs["mask"]))
