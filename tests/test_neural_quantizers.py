"""Neural quantizers (RQ-VAE, FSQ, DPCA, VQ-fusion, MMQ): digit structure, gradients, determinism, files, inputs."""

import itertools
from pathlib import Path

import pytest
import torch

from torchrec_sid.modules.soft_sid import soft_one_hot
from torchrec_sid.quantizers import DPCA, FSQ, MMQ, QUANTIZERS, RQVAE, Quantizer, build_quantizer
from torchrec_sid.quantizers.autoencoder import batches, split_rows
from torchrec_sid.quantizers.dpca import DPCABottleneck
from torchrec_sid.quantizers.fsq import FSQBottleneck
from torchrec_sid.quantizers.metrics import cosine_loss
from torchrec_sid.quantizers.mmq import mean_abs_cosine, orthogonality_loss
from torchrec_sid.sid import SemanticIds
from torchrec_sid.sid.packing import pack_codes, unpack_codes

TINY = {"hidden_dim": 16, "max_epochs": 3, "batch_size": 64, "init_rows": 256, "seed": 0}
SETTINGS = {
    "rq_vae": {"levels": 2, "codebook_size": 8, "latent_dim": 8},
    "fsq": {"levels": [3, 4, 5]},
    "dpca": {"groups": 2, "depth": 2, "latent_dim": 8},
    "mmq": {"num_shared": 2, "num_specific": 2, "codebook_size": 8, "latent_dim": 8},
}
FUSION = {"text": "cosine", "genres": "bce"}
TINY_VALID_FRAC = 0.1  # the default


pytestmark = pytest.mark.usefixtures("one_thread")


def items(num_items: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """A text-like embedding ``[N, 24]`` from 6 clusters and genre flags ``[N, 5]`` tied to the clusters."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(6, (num_items,), generator=g)
    text = torch.randn(6, 24, generator=g)[cluster] + 0.3 * torch.randn(num_items, 24, generator=g)
    genres = torch.nn.functional.one_hot(cluster % 5, 5).float()
    return {"text": torch.nn.functional.normalize(text, dim=1), "genres": genres}


def build(method: str, fusion: bool = False, **overrides) -> Quantizer:
    """A tiny unfitted quantizer: 1:1 on the text, or fusion / MMQ over both signals."""
    signals = FUSION if fusion or method == "mmq" else None
    return build_quantizer(method, **{**SETTINGS[method], **TINY, "signals": signals, **overrides})


def inputs(method: str, fusion: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """What ``fit`` takes: the text alone for a 1:1 quantizer, both signals for fusion and MMQ."""
    data = items()
    return data if fusion or method == "mmq" else data["text"]


@pytest.fixture(scope="module", params=["rq_vae", "fsq", "dpca", "mmq", "rq_vae+fusion", "fsq+fusion",
                                        "dpca+fusion"])
def fitted(request) -> tuple[Quantizer, object]:
    method, _, fusion = request.param.partition("+")
    x = inputs(method, bool(fusion))
    return build(method, bool(fusion)).fit(x), x


def test_registry_holds_the_neural_quantizers():
    assert {"rq_vae": RQVAE, "fsq": FSQ, "dpca": DPCA, "mmq": MMQ}.items() <= QUANTIZERS.items()


# ------------------------------------------------------------------------------------------ digit structure


def test_fsq_every_digit_vector_packs_unpacks_and_decodes_to_its_centred_values():
    levels = [3, 4, 2, 5]
    codes = torch.tensor(list(itertools.product(*(range(k) for k in levels))))  # all 120 digit vectors
    packed = pack_codes(codes, levels)
    assert torch.equal(torch.sort(packed).values, torch.arange(120))
    assert torch.equal(unpack_codes(packed, levels), codes)
    centres = torch.tensor(FSQ(levels=levels).digit_centres)
    assert centres.tolist() == [1.0, 1.5, 0.5, 2.0]
    values = FSQBottleneck(levels).lookup(codes)  # what the decoder reads, in [-1, 1]
    assert torch.allclose(values, (codes - centres) / centres)
    assert values.min() == -1 and values.max() == 1


def test_fsq_rounding_reaches_every_level_and_matches_lookup():
    bottleneck = FSQBottleneck([3, 4, 8])
    z = torch.linspace(-6, 6, 401)[:, None].expand(-1, 3)
    out = bottleneck(z)
    for j, k in enumerate([3, 4, 8]):
        assert out.codes[:, j].unique().tolist() == list(range(k))
    assert torch.equal(out.z_q, bottleneck.lookup(out.codes))


def test_dpca_every_ternary_digit_vector_packs_unpacks_and_decodes_to_its_weighted_directions():
    groups, depth = 2, 2
    codes = torch.tensor(list(itertools.product(range(3), repeat=groups * depth)))  # all 81 digit vectors
    radices = DPCA(groups=groups, depth=depth, latent_dim=6).cardinalities
    assert radices == [3, 3, 3, 3]
    packed = pack_codes(codes, radices)
    assert torch.equal(torch.sort(packed).values, torch.arange(81))
    assert torch.equal(unpack_codes(packed, radices), codes)
    bottleneck = DPCABottleneck(groups, depth, latent_dim=6, commitment=0.0)
    s = codes.view(-1, depth, groups).float() - 1  # level-major digits -> ternary weights [81, depth, groups]
    expected = torch.stack([sum(s[:, level, g, None] * bottleneck.directions[g, level] + bottleneck.offsets[g, level]
                                for level in range(depth)) for g in range(groups)], dim=1).flatten(1)
    assert torch.allclose(bottleneck.lookup(codes), expected)


def test_dpca_encodes_ternary_digits_and_is_exact_on_its_own_codewords():
    bottleneck = DPCABottleneck(groups=2, depth=3, latent_dim=4, commitment=0.0).eval()
    with torch.no_grad():
        bottleneck.directions.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.25], [0.05, 0.0]]]).expand(2, -1, -1))
    codes = torch.tensor(list(itertools.product(range(3), repeat=6)))
    out = bottleneck(bottleneck.lookup(codes))  # eval-mode batch norm is the identity at init statistics
    assert torch.equal(out.codes, codes)


@pytest.mark.parametrize("buckets", [2, 4, 64])
def test_dpca_with_more_buckets_is_exact_on_its_own_codewords_and_centres_its_digits(buckets: int):
    """The paper's 4- and 64-bucket setups: digits in [0, buckets), centred at (buckets - 1) / 2, every codeword of
    the scalar codebook encodes back to itself."""
    bottleneck = DPCABottleneck(groups=1, depth=2, latent_dim=2, commitment=0.0, buckets=buckets).eval()
    with torch.no_grad():
        bottleneck.directions.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    codes = torch.tensor(list(itertools.product(range(buckets), repeat=2)))
    assert torch.equal(bottleneck(bottleneck.lookup(codes)).codes, codes)
    centre = (buckets - 1) / 2
    assert torch.allclose(bottleneck.lookup(codes), codes.float() - centre)
    q = DPCA(groups=1, depth=3, latent_dim=4, buckets=buckets, **TINY).fit(items()["text"])
    assert q.cardinalities == [buckets] * 3 and q.digit_centres == [centre] * 3
    assert int(q.encode(items()["text"]).min()) >= 0 and int(q.encode(items()["text"]).max()) < buckets


def test_dpca_commitment_targets_differ_and_only_the_per_level_form_weighs_each_level():
    """``total`` adds ``c ||z - sg(sum_l q_l)||^2`` once; ``level`` adds ``c ||r_l - sg(q_l)||^2`` per level."""
    torch.manual_seed(0)
    z = torch.randn(16, 4)
    losses = {}
    for target in ("total", "level"):
        torch.manual_seed(1)
        bottleneck = DPCABottleneck(groups=1, depth=3, latent_dim=4, commitment=0.5, commitment_target=target)
        torch.manual_seed(1)
        free = DPCABottleneck(groups=1, depth=3, latent_dim=4, commitment=0.0, commitment_target=target)
        out, base = bottleneck(z), free(z)
        normed = torch.nn.functional.batch_norm(z, None, None, training=True)
        if target == "total":
            expected = 0.5 * ((normed - out.z_q.detach()) ** 2).sum(-1).mean()
            torch.testing.assert_close(out.loss - base.loss, expected)
        losses[target] = out.loss.item() - base.loss.item()
    assert losses["level"] > losses["total"] > 0
    with pytest.raises(ValueError, match="commitment_target must be one of"):
        DPCA(commitment_target="per_level").check_params()


@pytest.mark.parametrize("method", ["fsq", "dpca"])
def test_semantic_ids_carry_the_digit_structure_through_packing(method, tmp_path: Path):
    q = build(method).fit(inputs(method))
    sids = q.semantic_ids(inputs(method))
    assert sids.digit_centres == q.digit_centres
    loaded = SemanticIds.load(sids.save(tmp_path / "sids.safetensors"))
    assert loaded.digit_centres == q.digit_centres
    packed = pack_codes(loaded.codes, loaded.cardinalities)
    assert torch.equal(unpack_codes(packed, loaded.cardinalities), sids.codes)
    assert torch.equal(q.decode(unpack_codes(packed, loaded.cardinalities)), q.decode(sids.codes))
    suffixed = sids.with_collision_suffix()
    assert suffixed.digit_centres[:-1] == q.digit_centres
    assert suffixed.digit_centres[-1] == (suffixed.cardinalities[-1] - 1) / 2


@pytest.mark.parametrize("method", ["fsq", "dpca"])
def test_side_embedding_reads_the_artifact_digits_without_a_table(method):
    from torchrec_sid.modules.side import SIDEmbedding

    q = build(method).fit(inputs(method))
    sids = q.semantic_ids(inputs(method))
    side = SIDEmbedding.from_semantic_ids(sids, embedding_dim=4)
    digits = side.digits(pack_codes(sids.codes, sids.cardinalities))  # [N, levels], what SIDE projects
    assert torch.equal(digits, sids.codes.float() - torch.tensor(q.digit_centres))
    if method == "dpca":
        assert set(digits.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_only_ordinal_quantizers_declare_digit_centres(fitted):
    q, x = fitted
    expected = {"rq_vae": None, "mmq": None, "fsq": [1.0, 1.5, 2.0], "dpca": [1.0] * 4}[q.name]
    assert q.digit_centres == expected
    assert q.semantic_ids(x).digit_centres == expected


def test_semantic_ids_reject_bad_digit_centres():
    codes = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="digit_centres has 1 entries, expected one per level"):
        SemanticIds(codes, [3, 3], "dpca", {}, digit_centres=[1.0])
    with pytest.raises(ValueError, match=r"digit_centres\[1\] = 2.5 is outside \[0, 2\]"):
        SemanticIds(codes, [3, 3], "dpca", {}, digit_centres=[1.0, 2.5])


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method,fusion", [("rq_vae", False), ("fsq", False), ("dpca", False), ("rq_vae", True),
                                           ("fsq", True), ("dpca", True), ("mmq", True)])
def test_straight_through_gradient_of_reconstruction_reaches_the_encoder(method, fusion):
    data = items(num_items=64)
    signals = data if fusion or method == "mmq" else {"x": data["text"]}
    model = build(method, fusion)._build_model({name: x.shape[1] for name, x in signals.items()})
    with torch.no_grad():
        model.initialise(signals, torch.Generator().manual_seed(0))
    model.train()
    model(signals).recon.backward()  # the reconstruction term alone: no commitment gradient to the encoder
    first_layers = ([model.encoders[name][0] for name in model.encoders] if method != "mmq"
                    else [expert[0] for group in model.expert_groups.values() for expert in group])
    for layer in first_layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["rq_vae", "fsq", "dpca", "mmq"])
def test_fit_is_deterministic_under_seed(method):
    x = inputs(method)
    a, b = build(method).fit(x), build(method).fit(x)
    state_a, state_b = a.model_.state_dict(), b.model_.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a.encode(x), b.encode(x))
    assert a.history_ == b.history_
    c = build(method, seed=1).fit(x)
    assert not torch.equal(a.model_.state_dict()[next(iter(state_a))], c.model_.state_dict()[next(iter(state_a))])


def test_fit_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("fsq").fit(inputs("fsq"))
    assert torch.equal(torch.rand(3), expected)


def test_history_reports_losses_and_utilisation_per_epoch(fitted):
    q, _ = fitted
    assert 1 <= len(q.history_) <= TINY["max_epochs"]
    for epoch, entry in enumerate(q.history_):
        assert entry["epoch"] == epoch
        assert len(entry["utilization_per_level"]) == len(q.cardinalities)
        assert 0.0 < entry["utilization"] <= 1.0
        assert entry["utilization"] == pytest.approx(sum(entry["utilization_per_level"]) / len(q.cardinalities))
        assert entry["valid_loss"] >= 0 and entry["train_loss"] == entry["train_loss"]  # finite, not NaN
        assert isinstance(entry["reseeded"], int)


def test_early_stopping_triggers_and_restores_the_best_epoch():
    x = inputs("fsq")
    q = build("fsq", max_epochs=50, patience=2, tol=0.5).fit(x)  # a 50% improvement never comes
    assert len(q.history_) == 3  # epoch 0 sets the best, two epochs without improvement stop the fit
    assert [h["best_valid_loss"] for h in q.history_] == [q.history_[0]["valid_loss"]] * 3
    _, valid = split_rows(len(x), TINY_VALID_FRAC, torch.Generator().manual_seed(TINY["seed"]))
    assert q._evaluate(q.model_, {"x": x[valid]}) == pytest.approx(q.history_[0]["valid_loss"], rel=1e-6)


def test_dead_codes_are_reseeded_and_counted():
    text = items(num_items=200)["text"]
    x = text[:6].repeat(40, 1)  # 6 distinct items: k-means can seed only 6 distinct codewords of 16
    q = RQVAE(levels=1, codebook_size=16, latent_dim=4, hidden_dim=16, max_epochs=2, batch_size=256,
              init_rows=256).fit(x)
    assert q.history_[0]["reseeded"] >= 10
    assert q.history_[0]["utilization"] <= 6 / 16


def test_a_last_batch_of_one_row_trains_with_batch_normalisation():
    x = items(num_items=70)["text"]  # 63 training rows: batches of 31, 31 and 1 -> 31 and 32
    q = DPCA(groups=2, depth=2, latent_dim=8, hidden_dim=16, max_epochs=1, batch_size=31, init_rows=63).fit(x)
    assert len(q.history_) == 1
    assert batches(63, 31) == [slice(0, 31), slice(31, 63)]


def test_writer_gets_a_scalar_per_numeric_history_entry():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer = Writer()
    q = build("dpca").fit(inputs("dpca"), writer=writer)
    tags = {tag for tag, _, _ in writer.calls}
    assert {"dpca/train_loss", "dpca/valid_loss", "dpca/utilization", "dpca/reseeded"} <= tags
    assert {step for _, _, step in writer.calls} == set(range(len(q.history_)))


def test_fsq_learns_to_reconstruct_clustered_embeddings():
    x = inputs("fsq")
    q = build("fsq", max_epochs=40, hidden_dim=32, patience=40).fit(x)
    assert cosine_loss(x, q.decode(q.encode(x))) < 0.5 * cosine_loss(x, x.mean(0, keepdim=True).expand_as(x))


# ------------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(fitted, tmp_path: Path):
    q, x = fitted
    loaded = Quantizer.load(q.save(tmp_path / "q.safetensors"))
    assert type(loaded) is type(q)
    assert loaded.get_params() == q.get_params()
    assert loaded.history_ == q.history_
    codes = q.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), q.decode(codes))
    decoded, expected = loaded.decode_signals(codes), q.decode_signals(codes)
    assert decoded.keys() == expected.keys() and all(torch.equal(decoded[k], expected[k]) for k in expected)


def test_unfitted_quantizer_refuses_to_encode_and_save(tmp_path: Path):
    with pytest.raises(RuntimeError, match="fsq quantizer is not fitted"):
        FSQ().encode(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        FSQ().save(tmp_path / "q.safetensors")


# -------------------------------------------------------------------------------------------- bad inputs


def test_fusion_decode_returns_every_signal(fitted):
    q, x = fitted
    codes = q.encode(x)
    out = q.decode_signals(codes)
    if isinstance(x, dict):
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in x.items()}
        if "genres" in out and q.signal_losses["genres"] == "bce":
            assert out["genres"].min() >= 0 and out["genres"].max() <= 1
        assert torch.equal(q.decode(codes), torch.cat([out["genres"], out["text"]], dim=1))  # signal name order
    else:
        assert q.decode(codes).shape == x.shape and torch.equal(out["x"], q.decode(codes))


@pytest.fixture(scope="module")
def fusion() -> DPCA:
    return build("dpca", fusion=True).fit(items())


def test_wrong_number_of_signals_raises_naming_them(fusion):
    data = items()
    with pytest.raises(ValueError, match=r"expected 2 signal\(s\) \['genres', 'text'\], got 1 \['text'\]: "
                                         r"missing \['genres'\]"):
        fusion.encode({"text": data["text"]})
    with pytest.raises(ValueError, match=r"unexpected \['year'\]"):
        fusion.encode({**data, "year": data["genres"]})
    with pytest.raises(ValueError, match=r"expected 2 signals \['genres', 'text'\] as a \{name: \[N, D_k\]\} dict, "
                                         r"got a single Tensor"):
        fusion.encode(data["text"])
    with pytest.raises(ValueError, match="expected 2 signal"):
        build("fsq", fusion=True).fit({"genres": data["genres"]})


def test_mismatched_dims_and_rows_raise_naming_the_signal(fusion):
    data = items()
    with pytest.raises(ValueError, match=r"signal 'text' has D=23 columns, expected D=24"):
        fusion.encode({**data, "text": data["text"][:, :23]})
    with pytest.raises(ValueError, match=r"signal 'text' has 300 rows but signal 'genres' has 299: every signal "
                                         r"needs one row per item"):
        fusion.encode({**data, "genres": data["genres"][:299]})
    with pytest.raises(ValueError, match=r"signal 'text' has 300 rows but signal 'genres' has 299"):
        build("fsq", fusion=True).fit({**data, "genres": data["genres"][:299]})
    with pytest.raises(ValueError, match=r"decodes full codes of 4 levels, got 3"):
        fusion.decode(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes\[0, 1\] = 3 is outside \[0, 3\)"):
        fusion.decode(torch.tensor([[0, 3, 0, 0]]))


def test_nan_raises_naming_the_signal_and_row(fusion):
    data = items()
    text = data["text"].clone()
    text[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"signal 'text' has non-finite values \(NaN or inf\) in row 7"):
        fusion.encode({**data, "text": text})
    with pytest.raises(ValueError, match=r"signal 'text' has non-finite values \(NaN or inf\) in row 7"):
        build("mmq").fit({**data, "text": text})
    with pytest.raises(ValueError, match=r"signal 'x' has non-finite values \(NaN or inf\) in row 7"):
        build("fsq").fit(text)


def test_bce_signal_outside_unit_interval_raises(fusion):
    data = items()
    genres = data["genres"].clone()
    genres[4, 2] = 2.0
    with pytest.raises(ValueError, match=r"signal 'genres' uses loss 'bce'.* row 4 column 2 is 2.0"):
        fusion.encode({**data, "genres": genres})


def test_bad_settings_raise_at_fit():
    data = items(num_items=40)
    for q, message in [
        (FSQ(signals={"text": "cosine", "genres": "hinge"}), r"signal 'genres' has loss 'hinge'; expected one of"),
        (FSQ(signals=FUSION, signal_weights={"year": 1.0}), r"signal_weights names \['year'\], which are not signals"),
        (FSQ(levels=[3, 1]), r"levels\[1\] = 1: every dimension needs an integer number of levels >= 2"),
        (FSQ(levels=3), r"levels must list each latent dimension's number of levels.*got 3"),
        (DPCA(groups=3, latent_dim=10), "latent_dim=10 must be a multiple of groups=3"),
        (RQVAE(valid_frac=0.0), r"valid_frac must be a number in \(0.0, 1.0\), got 0.0"),
        (MMQ(FUSION, alpha=float("nan")), r"alpha must be a number >= 0.0, got nan"),
    ]:
        with pytest.raises(ValueError, match=message):  # the constructor above stored the bad value
            q.fit(data if q.signals else data["text"])
    with pytest.raises(ValueError, match="needs at least 64 rows, got 50"):
        RQVAE(codebook_size=64, init_rows=50, **{k: v for k, v in TINY.items() if k != "init_rows"}).fit(
            items()["text"])


def test_fit_refuses_more_than_one_process(monkeypatch):
    from torchrec_sid.quantizers import autoencoder

    monkeypatch.setattr(autoencoder, "is_distributed", lambda: True)
    monkeypatch.setattr(autoencoder.dist, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match=r"fsq fits on one process, but torch\.distributed has world_size=2"):
        build("fsq").fit(inputs("fsq"))


# --------------------------------------------------------------------------------------------------- MMQ


def test_mmq_similarities_argmax_is_the_code_and_tokens_are_named():
    x = items()
    q = build("mmq").fit(x)
    p = q.similarities(x)
    assert p.shape == (300, 6, 8) and p.abs().max() <= 1 + 1e-5
    assert torch.equal(p.argmax(-1), q.encode(x))
    assert q.token_names == ["shared_0", "shared_1", "genres_0", "genres_1", "text_0", "text_1"]  # name order
    gates = q.model_.mean_gates
    assert gates.shape == (2, 2) and torch.allclose(gates.sum(1), torch.ones(2))
    assert set(q.reconstruct_signals(x)) == {"text", "genres"}


def test_soft_one_hot_is_hard_forward_and_soft_backward():
    p = torch.tensor([[0.1, 0.9, -0.3], [0.5, 0.2, 0.4]], requires_grad=True)
    ind = soft_one_hot(p, tau=0.1)
    assert torch.equal(ind.detach(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    (ind * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # a lookup into a 3-row "table"
    assert p.grad.abs().sum() > 0


def test_orthogonality_loss_is_zero_for_orthogonal_experts_and_counts_shared_directions():
    assert orthogonality_loss(torch.eye(3)) == 0
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert orthogonality_loss(same) == pytest.approx(2.0)  # cos = 1, counted for (0, 1) and (1, 0)
    assert mean_abs_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(2 ** -0.5 * 2 / 3)


@pytest.mark.parametrize("form", ["outputs", "layers", "weights"])
def test_mmq_orthogonality_forms_give_a_finite_penalty_with_gradients(form: str):
    q = build("mmq", orthogonality=form)
    model = q._seeded_model({"text": 24, "genres": 5})
    losses, _ = model.loss_terms(items(num_items=32))
    losses["ortho"].backward()
    first_layer = model.shared[0][0].weight
    assert torch.isfinite(losses["ortho"]) and losses["ortho"] > 0 and first_layer.grad.abs().sum() > 0


def test_mmq_output_orthogonality_penalty_lowers_inter_expert_similarity():
    """The issue's fix: with the penalty on the experts' centred outputs, raising gamma makes the experts of a group
    compute less similar things (the flattened-weight form left this similarity unchanged)."""
    x = items()

    def similarity(gamma: float) -> float:
        q = build("mmq", gamma=gamma, orthogonality="outputs", max_epochs=8, patience=8).fit(x)
        sims = q.model_.output_similarity(x)
        assert set(sims) == {"shared", "text", "genres"}
        return sum(sims.values()) / len(sims)

    without, with_penalty = similarity(0.0), similarity(1.0)
    assert with_penalty < 0.6 * without, (without, with_penalty)


def test_utilisation_is_reported_before_and_after_reseeding_and_reseeding_can_be_switched_off():
    """The papers' utilisation differences need the method's own utilisation: without re-seeding no code moves and
    the history's before / after values agree; with it, the after value counts the revived codes."""
    x = items()
    kept = build("rq_vae", codebook_size=64, max_epochs=3, patience=3, reseed_dead_codes=False).fit(x["text"])
    assert all(e["reseeded"] == 0 and e["utilization_after_reseed"] == e["utilization"] for e in kept.history_)
    fitted = kept.history_[-1]["fitted_utilization"]
    codes = kept.encode(x["text"])
    assert len(fitted) == 2 and fitted[0] == len(torch.unique(codes[kept_train_rows(kept), 0])) / 64
    reseeded = build("rq_vae", codebook_size=64, max_epochs=3, patience=3).fit(x["text"])
    moved = [e for e in reseeded.history_ if e["reseeded"]]
    assert moved and all(0 < e["utilization_after_reseed"] <= 1 for e in moved)
    assert sum(reseeded.history_[-1]["fitted_utilization"]) > sum(fitted)  # maintenance raises what encode shows


def kept_train_rows(q: Quantizer) -> torch.Tensor:
    """The training rows of a fit (the seeded split of ``fit``)."""
    from torchrec_sid.quantizers.autoencoder import split_rows

    return split_rows(300, q.valid_frac, torch.Generator().manual_seed(q.seed))[0]
