from __future__ import annotations

import pytest
import torch
from torchrec.fx import symbolic_trace

from torchrec_sid.modules import DIN, SIM, MeanPooling, TargetAttention, padding_mask

D = 8
LENGTHS = [0, 1, 6]


def _inputs(lengths: list[int] = LENGTHS, width: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "history": torch.randn(len(lengths), width, D, generator=g),
        "mask": padding_mask(torch.tensor(lengths), width),
        "candidate": torch.randn(len(lengths), D, generator=g),
        "history_keys": torch.randint(0, 2, (len(lengths), width), generator=g),
        "candidate_key": torch.tensor([0, 1, 1])[: len(lengths)],
    }


def _blocks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"din": DIN(D, (8, 4)), "sim": SIM(D, top_k=2, attention_hidden_dims=(8, 4)), "pooling": MeanPooling(D)}


@pytest.mark.parametrize("name", ["din", "sim", "pooling"])
def test_shapes_and_empty_history_gives_zeros(name: str) -> None:
    block, inputs = _blocks()[name], _inputs()
    out = block(**inputs)
    assert out.shape == (3, block.output_dim) and torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] != 0).any()


@pytest.mark.parametrize("name", ["din", "sim", "pooling"])
def test_single_event_history_returns_that_event(name: str) -> None:
    inputs = _inputs()
    inputs["history_keys"][1, 0] = inputs["candidate_key"][1]  # SIM finds the one event
    torch.testing.assert_close(_blocks()[name](**inputs)[1], inputs["history"][1, 0])


@pytest.mark.parametrize("name", ["din", "sim", "pooling"])
def test_garbage_padding_never_changes_the_output(name: str) -> None:
    block, inputs = _blocks()[name], _inputs()
    padded = dict(inputs)
    padded["history"] = torch.cat([inputs["history"], torch.full((3, 3, D), float("nan"))], dim=1)
    padded["history"][1, 1:] = 1e6
    padded["mask"] = torch.cat([inputs["mask"], torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    padded["history_keys"] = torch.cat([inputs["history_keys"], torch.ones(3, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(block(**padded), block(**inputs))


def test_mean_pooling_averages_the_valid_events() -> None:
    inputs = _inputs()
    torch.testing.assert_close(MeanPooling(D)(**inputs)[2], inputs["history"][2].mean(dim=0))


def test_sim_attends_over_the_most_recent_events_with_the_candidate_key() -> None:
    blocks, inputs = _blocks(), _inputs()
    inputs["history_keys"][2] = torch.tensor([1, 1, 0, 1, 1, 0])
    row = {k: v[2:] for k, v in inputs.items()}
    din_on_subset = blocks["din"].attention(row["history"][:, [3, 4]], torch.ones(1, 2, dtype=torch.bool),
                                            row["candidate"][:, None])
    blocks["sim"].attention.load_state_dict(blocks["din"].attention.state_dict())
    torch.testing.assert_close(blocks["sim"](**row), din_on_subset.squeeze(1))


def test_target_attention_scores_many_candidates_like_one_at_a_time() -> None:
    torch.manual_seed(0)
    attention, inputs = TargetAttention(D, (8, 4)), _inputs()
    candidates = torch.randn(3, 5, D)
    many = attention(inputs["history"], inputs["mask"], candidates)
    one_by_one = torch.cat([attention(inputs["history"], inputs["mask"], candidates[:, [c]]) for c in range(5)], 1)
    torch.testing.assert_close(many, one_by_one)


@pytest.mark.parametrize("name", ["din", "sim", "pooling"])
def test_traced_block_matches_eager(name: str) -> None:
    block, inputs = _blocks()[name], _inputs()
    unused = {"history_timestamps": None} | ({} if name == "sim" else {"history_keys": None, "candidate_key": None})
    traced = symbolic_trace(block, concrete_args=unused)
    args = {k: v for k, v in inputs.items() if k not in unused}
    torch.testing.assert_close(traced(**args), block(**inputs))


def test_gradients_reach_the_attention_unit() -> None:
    din, inputs = _blocks()["din"], _inputs()
    din(**inputs).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in din.parameters())


@pytest.mark.parametrize("name", ["din", "sim", "pooling"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"history": torch.randn(3, 6)}, r"history must be \[B, L, D=8\], got shape \(3, 6\)"),
        ({"history": torch.randn(3, 6, 4)}, r"history must be \[B, L, D=8\], got shape \(3, 6, 4\)"),
        ({"history": torch.ones(3, 6, D, dtype=torch.long)}, "history must be floating point"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, r"mask must be bool \[B, L\]=\(3, 6\), got torch.bool \(3, 5\)"),
        ({"mask": torch.ones(3, 6)}, r"mask must be bool \[B, L\]=\(3, 6\), got torch.float32"),
        ({"candidate": torch.randn(2, D)}, r"candidate must be \[B, D\]=\(3, 8\), got shape \(2, 8\)"),
    ],
)
def test_bad_inputs_raise_with_block_name_and_shape(name: str, change: dict, message: str) -> None:
    block = _blocks()[name]
    with pytest.raises(ValueError, match=f"{type(block).__name__}: {message}"):
        block(**(_inputs() | change))


def test_sim_without_keys_raises() -> None:
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"SIM: hard search needs history_keys \[B, L\] and candidate_key \[B\]"):
        _blocks()["sim"](inputs["history"], inputs["mask"], inputs["candidate"])
    with pytest.raises(ValueError, match=r"SIM: candidate_key must be \[B\]=\(3,\), got shape \(3, 1\)"):
        _blocks()["sim"](**(inputs | {"candidate_key": torch.zeros(3, 1, dtype=torch.long)}))
    with pytest.raises(ValueError, match=r"SIM: history_keys must be \[B, L\]=\(3, 6\), got shape \(3, 2\)"):
        _blocks()["sim"](**(inputs | {"history_keys": torch.zeros(3, 2, dtype=torch.long)}))


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="SIM: top_k must be positive, got 0"):
        SIM(D, top_k=0)
    with pytest.raises(ValueError, match=r"hidden_dims must be positive and non-empty, got 8 and \(\)"):
        DIN(D, attention_hidden_dims=())
