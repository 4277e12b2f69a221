"""The one Quantizer contract, checked on every registered quantizer (in the spirit of sklearn's check_estimator).

Settings: stored as given, ``get_params`` / ``set_params`` / ``clone``, checked by ``fit`` (not the constructor).
Behaviour: ``fit`` returns self; unfitted ``encode`` / ``decode`` / ``save`` raise; ``encode -> LongTensor[N, levels]``
within ``cardinalities``; ``decode -> Tensor[N, D]`` (several signals: concatenated in ``signal_names`` order) and
``decode_signals -> {name: [N, D_k]}``; a seeded refit and a save/load round trip give identical codes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from torchrec_sid.quantizers import QUANTIZERS, NotFittedError, Quantizer, build_quantizer

NEURAL = {"hidden_dim": 8, "max_epochs": 2, "batch_size": 32, "init_rows": 64}
TWO_SIGNALS = {"text": "cosine", "meta": "bce"}

# case: (registry name, small settings, bad setting (name, value), what fit's ValueError says about it)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, Any], str]] = {
    "rq_kmeans": ("rq_kmeans", {"levels": 2, "codebook_size": 4, "max_iter": 5},
                  ("codebook_size", 0), r"codebook_size must be an integer >= 1, got 0"),
    "rq_gmm": ("rq_gmm", {"levels": 2, "codebook_size": 4, "max_iter": 5, "init_iter": 2},
               ("residual", "soft"), r"residual must be one of \['hard', 'posterior_mean'\], got 'soft'"),
    "rq_vae": ("rq_vae", {"levels": 2, "codebook_size": 4, "latent_dim": 4, **NEURAL},
               ("valid_frac", 0.0), r"valid_frac must be a number in \(0.0, 1.0\), got 0.0"),
    "fsq": ("fsq", {"levels": (3, 4), **NEURAL},
            ("levels", [3, 1]), r"levels\[1\] = 1: every dimension needs an integer number of levels >= 2"),
    "dpca": ("dpca", {"groups": 2, "depth": 2, "latent_dim": 4, **NEURAL},
             ("latent_dim", 5), r"latent_dim=5 must be a multiple of groups=2"),
    "mmq": ("mmq", {"num_shared": 1, "num_specific": 1, "codebook_size": 4, "latent_dim": 4, **NEURAL},
            ("num_specific", 0), r"num_specific must be an integer >= 1, got 0"),
    "rq_vae+fusion": ("rq_vae", {"levels": 2, "codebook_size": 4, "latent_dim": 4, "signals": TWO_SIGNALS,
                                 "signal_weights": {"meta": 0.5}, **NEURAL},
                      ("signal_weights", {"year": 1.0}), r"signal_weights names \['year'\], which are not signals"),
    "fsq+fusion": ("fsq", {"levels": [3, 3, 2], "signals": TWO_SIGNALS, **NEURAL},
                   ("signals", {"text": "cosine", "meta": "hinge"}),
                   r"signals: signal 'meta' has loss 'hinge'; expected one of \['cosine', 'mse', 'bce'\]"),
    "dpca+fusion": ("dpca", {"groups": 1, "depth": 3, "latent_dim": 4, "signals": TWO_SIGNALS, **NEURAL},
                    ("lr", 0), r"lr must be a number > 0.0, got 0"),
    "mmq+signals": ("mmq", {"num_shared": 1, "num_specific": 2, "codebook_size": 4, "latent_dim": 4,
                            "signals": {"text": "mse", "meta": "mse"}, **NEURAL},
                    ("gamma", -1.0), r"gamma must be a number >= 0.0, got -1.0"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(settings: dict[str, Any]) -> torch.Tensor | dict[str, torch.Tensor]:
    """96 items: unit text embeddings ``[96, 8]`` alone, or with flags in [0, 1] ``meta: [96, 3]`` when the
    quantizer reads both signals."""
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g)[torch.arange(96) % 4]
                                         + 0.3 * torch.randn(96, 8, generator=g), dim=1)
    if settings.get("signals") is None:
        return text
    return {"text": text, "meta": (torch.rand(96, 3, generator=g) > 0.5).float()}


def unfitted(case: str) -> Quantizer:
    name, settings, _, _ = CASES[case]
    return build_quantizer(name, **copy.deepcopy(settings))


def declared_defaults(cls: type[Quantizer]) -> dict[str, Any]:
    """Each constructor parameter's default, from the signature (a list default from its dataclass factory)."""
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                 if f.default_factory is not dataclasses.MISSING}
    return {p.name: factories[p.name]() if p.name in factories else p.default
            for p in inspect.signature(cls).parameters.values()}


@pytest.fixture(scope="module", params=list(CASES))
def fitted(request) -> tuple[Quantizer, torch.Tensor | dict[str, torch.Tensor]]:
    q = unfitted(request.param)
    x = inputs(CASES[request.param][1])
    return q.fit(x), x


def test_every_registered_quantizer_has_a_contract_case():
    assert set(QUANTIZERS) <= {name for name, _, _, _ in CASES.values()}


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("case", CASES)
def test_constructor_stores_the_settings_as_given(case):
    name, settings, _, _ = CASES[case]
    cls = QUANTIZERS[name]
    given = copy.deepcopy(settings)
    q = cls(**given)
    params = q.get_params()
    assert list(params) == list(inspect.signature(cls).parameters)
    assert params == {**declared_defaults(cls), **settings}
    assert all(params[k] is v for k, v in given.items())  # the objects themselves: no copy, no conversion
    assert cls().get_params() == declared_defaults(cls)


def test_params_rebuild_and_clone_an_unfitted_copy(fitted):
    q, x = fitted
    rebuilt = type(q)(**q.get_params())
    assert rebuilt.get_params() == q.get_params()
    clone = q.clone()
    assert type(clone) is type(q) and clone is not q
    assert clone.get_params() == q.get_params()
    for copied in (rebuilt, clone):
        with pytest.raises(NotFittedError):
            copied.encode(x)
    for key, value in clone.get_params().items():  # deep copies: changing the clone's dicts leaves q alone
        if isinstance(value, (dict, list)):
            assert value is not q.get_params()[key]


@pytest.mark.parametrize("case", CASES)
def test_set_params_changes_settings_and_refuses_unknown_names(case):
    q = unfitted(case)
    assert q.set_params(seed=5, chunk_size=7) is q
    assert q.get_params()["seed"] == 5 and q.get_params()["chunk_size"] == 7
    with pytest.raises(ValueError, match=rf"unknown settings \['sede'\] for quantizer '{q.name}'; it takes \["):
        q.set_params(sede=1)
    with pytest.raises(ValueError, match=r"unknown settings \['sede'\]"):
        build_quantizer(q.name, sede=1)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_setting_is_accepted_by_the_constructor_and_refused_by_fit(case):
    name, settings, (key, value), message = CASES[case]
    q = build_quantizer(name, **{**settings, key: value})  # does not raise
    assert q.get_params()[key] == value
    with pytest.raises(ValueError, match=message):
        q.fit(inputs(settings))
    with pytest.raises(ValueError, match=message):
        q.check_params()


@pytest.mark.parametrize("case", CASES)
def test_fit_checks_every_setting(case):
    q = unfitted(case)
    x = inputs(CASES[case][1])
    for key in q.get_params():
        bad = q.clone().set_params(**{key: "bad"})
        with pytest.raises(ValueError, match=rf"{re.escape(key)}\b.*'bad'|'bad'.*{re.escape(key)}"):
            bad.fit(x)


# ---------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("case", CASES)
def test_unfitted_encode_decode_and_save_raise(case, tmp_path: Path):
    q = unfitted(case)
    x = inputs(CASES[case][1])
    for call in (lambda: q.encode(x), lambda: q.decode(torch.zeros(2, len(q.cardinalities), dtype=torch.long)),
                 lambda: q.save(tmp_path / "q.safetensors")):
        with pytest.raises(NotFittedError, match=f"{q.name} quantizer is not fitted: call fit"):
            call()


@pytest.mark.parametrize("case", CASES)
def test_fit_returns_self(case):
    q = unfitted(case)
    assert q.fit(inputs(CASES[case][1])) is q


def test_encode_gives_long_codes_within_the_cardinalities(fitted):
    q, x = fitted
    codes = q.encode(x)
    assert codes.dtype == torch.long and codes.shape == (96, len(q.cardinalities))
    assert (codes >= 0).all() and (codes < torch.tensor(q.cardinalities)).all()


def test_decode_gives_a_tensor_of_the_input_shape(fitted):
    q, x = fitted
    codes = q.encode(x)
    x_hat, per_signal = q.decode(codes), q.decode_signals(codes)
    signals = x if isinstance(x, dict) else {q.signal_names[0]: x}
    assert isinstance(x_hat, torch.Tensor) and x_hat.dtype == torch.float32
    assert x_hat.shape == (96, sum(s.shape[1] for s in signals.values()))
    assert list(per_signal) == q.signal_names and sorted(q.signal_names) == sorted(signals)
    assert {k: v.shape for k, v in per_signal.items()} == {k: v.shape for k, v in signals.items()}
    assert torch.equal(x_hat, torch.cat([per_signal[k] for k in q.signal_names], dim=1))


def test_a_bare_tensor_is_the_one_named_signal(fitted):
    q, x = fitted
    if isinstance(x, dict):
        with pytest.raises(ValueError, match=r"expected 2 signals \['meta', 'text'\] as a \{name: \[N, D_k\]\} dict"):
            q.encode(x["text"])
    else:
        assert torch.equal(q.encode({q.signal_names[0]: x}), q.encode(x))


def test_seeded_refit_gives_identical_codes(fitted):
    q, x = fitted
    again = q.clone().fit(x)
    assert torch.equal(again.encode(x), q.encode(x))
    assert torch.equal(again.fit(x).encode(x), q.encode(x))  # refitting a fitted quantizer starts afresh


def test_save_load_round_trip(fitted, tmp_path: Path):
    q, x = fitted
    loaded = Quantizer.load(q.save(tmp_path / "q.safetensors"))
    assert type(loaded) is type(q)
    assert loaded.get_params() == json.loads(json.dumps(q.get_params()))  # the file stores the settings as JSON
    assert loaded.history_ == q.history_
    codes = q.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), q.decode(codes))
