from __future__ import annotations

import pytest
import torch
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_sid.modules import HSTU, HSTULayer, jagged_to_padded, padding_mask, time_buckets

D = 8


def _layer(**settings) -> HSTULayer:
    torch.manual_seed(0)
    return HSTULayer(D, num_heads=2, attention_dim=4, linear_dim=4, max_relative_position=3, num_time_buckets=16,
                     **settings)


def _batch(lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x: [B, L, D]``, ``mask: [B, L]``, ``timestamps: [B, L]`` for histories of ``lengths`` (0, 1, mixed)."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(lengths), width, D, generator=g)
    timestamps = torch.randint(0, 10**6, (len(lengths), width), generator=g).sort(dim=1).values
    return x, padding_mask(torch.tensor(lengths), width), timestamps


def test_shapes_and_zero_padding_for_empty_single_and_mixed_histories() -> None:
    x, mask, timestamps = _batch([0, 1, 5])
    y = _layer()(x, mask, timestamps)
    assert y.shape == (3, 5, D) and torch.isfinite(y).all()
    assert (y[~mask] == 0).all() and (y[mask] != 0).any(dim=-1).all()


def test_garbage_padding_never_changes_the_output() -> None:
    x, mask, timestamps = _batch([0, 1, 5])
    layer = _layer()
    padded_x = torch.cat([x, torch.full((3, 4, D), float("nan"))], dim=1)
    padded_x[1, 1:5] = 1e6  # garbage inside row 1's padding too
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    padded_timestamps = torch.cat([timestamps, torch.full((3, 4), -(10**12))], dim=1)
    padded = layer(padded_x, padded_mask, padded_timestamps)
    torch.testing.assert_close(padded[:, :5], layer(x, mask, timestamps))
    assert (padded[:, 5:] == 0).all()


def test_time_and_position_biases_change_the_output() -> None:
    x, mask, timestamps = _batch([6])
    layer = _layer()
    assert not torch.allclose(layer(x, mask, timestamps), layer(x, mask, timestamps * 100))
    assert not torch.allclose(layer(x, mask), layer(x.flip(1), mask).flip(1))  # order matters via positions
    unordered = HSTULayer(D, max_relative_position=None)
    torch.testing.assert_close(unordered(x, mask), unordered(x.flip(1), mask).flip(1))


def test_time_buckets_are_log2_of_the_gap() -> None:
    gaps = torch.tensor([0, 1, 3, 4, 3600, -3600, 10**9])
    assert time_buckets(gaps, num_buckets=20).tolist() == [0, 1, 2, 2, 11, 11, 19]


def test_causal_layer_ignores_later_tokens() -> None:
    x, mask, _ = _batch([5])
    layer = _layer(causal=True)
    changed = x.clone()
    changed[0, 3:] += 1.0
    torch.testing.assert_close(layer(changed, mask)[:, :3], layer(x, mask)[:, :3])


def test_stack_is_traceable_and_matches_eager() -> None:
    torch.manual_seed(0)
    hstu = HSTU([HSTULayer(D, num_time_buckets=16) for _ in range(2)]).eval()
    x, mask, timestamps = _batch([0, 1, 5])
    traced = symbolic_trace(hstu)
    torch.testing.assert_close(traced(x, mask, timestamps), hstu(x, mask, timestamps))
    untimed = symbolic_trace(hstu, concrete_args={"timestamps": None})
    torch.testing.assert_close(untimed(x, mask), hstu(x, mask))


def test_gradients_reach_every_parameter() -> None:
    layer = _layer()
    x, mask, timestamps = _batch([1, 5])
    layer(x, mask, timestamps).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_jagged_history_keeps_the_most_recent_events() -> None:
    jt = JaggedTensor(values=torch.arange(6.0)[:, None].expand(6, D), lengths=torch.tensor([1, 0, 5]))
    history, mask = jagged_to_padded(jt, max_len=3)
    assert history.shape == (3, 3, D) and mask.tolist() == [[True, False, False], [False] * 3, [True] * 3]
    assert history[..., 0].tolist() == [[0, 0, 0], [0, 0, 0], [3, 4, 5]]
    times, _ = jagged_to_padded(JaggedTensor(values=torch.arange(6), lengths=torch.tensor([1, 0, 5])), max_len=3)
    assert times.tolist() == [[0, 0, 0], [0, 0, 0], [3, 4, 5]]
    with pytest.raises(ValueError, match="max_len must be positive, got 0"):
        jagged_to_padded(jt, max_len=0)


def test_jagged_to_padded_is_traceable_and_differentiable() -> None:
    class Pad(torch.nn.Module):
        def forward(self, jt: JaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jagged_to_padded(jt, max_len=2)

    values = torch.randn(4, D, requires_grad=True)
    jt = JaggedTensor(values=values, lengths=torch.tensor([3, 0, 1]))
    (history, mask), (eager, eager_mask) = symbolic_trace(Pad())(jt), Pad()(jt)
    assert torch.equal(history, eager) and torch.equal(mask, eager_mask)
    history.sum().backward()
    assert values.grad[:, 0].tolist() == [0, 1, 1, 1]  # the oldest event of row 0 is dropped


@pytest.mark.parametrize(
    ("x", "mask", "timestamps", "message"),
    [
        (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), None, r"x must be \[B, L, D=8\], got shape \(2, 3\)"),
        (torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool), None, r"D=8\], got shape \(2, 3, 5\)"),
        (torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool), None, r"mask must be bool \[B, L\]=\(2, 3\)"),
        (torch.randn(2, 3, D), torch.ones(2, 3), None, r"mask must be bool .* got torch.float32"),
        (torch.randn(2, 3, D), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 3), r"timestamps must be \[B, L\]"),
    ],
)
def test_bad_inputs_raise_with_the_shape(x, mask, timestamps, message) -> None:
    with pytest.raises(ValueError, match=message):
        _layer()(x, mask, timestamps)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="num_heads must be positive, got 0"):
        HSTULayer(D, num_heads=0)
    with pytest.raises(ValueError, match="timestamps given but the layer has no time bias"):
        HSTULayer(D)(torch.randn(1, 2, D), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"one embedding_dim, got \[8, 4\]"):
        HSTU([HSTULayer(D), HSTULayer(4)])
