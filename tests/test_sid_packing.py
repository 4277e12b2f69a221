from __future__ import annotations

import itertools

import pytest
import torch

from torchrec_sid.sid import pack_codes, unpack_codes


def test_ternary_packing_is_side_formula_and_inverts_every_digit_vector() -> None:
    n = 6
    digits = torch.tensor(list(itertools.product([-1, 0, 1], repeat=n)))  # every {-1, 0, 1}^6 vector
    packed = pack_codes(digits + 1, [3] * n)
    side = ((digits + 1) * 3 ** torch.arange(n)).sum(1)  # s = sum_k 3^(k-1) (1 + d_k), 1-based k
    assert torch.equal(packed, side)
    assert sorted(packed.tolist()) == list(range(3**n)), "dense and one-to-one"
    assert torch.equal(unpack_codes(packed, [3] * n) - 1, digits)


def test_mixed_radix_round_trip_on_fsq_levels() -> None:
    levels = [8, 5, 5, 3]
    codes = torch.tensor(list(itertools.product(*[range(r) for r in levels])))
    packed = pack_codes(codes, levels)
    assert sorted(packed.tolist()) == list(range(8 * 5 * 5 * 3))
    assert torch.equal(unpack_codes(packed, levels), codes)
    assert unpack_codes(packed.view(30, 20), levels).shape == (30, 20, 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pack_codes(torch.tensor([[0, 3]]), [3, 3]), r"codes\[0, 1\] = 3 is outside \[0, 3\)"),
        (lambda: pack_codes(torch.tensor([[-1, 0]]), [3, 3]), r"codes\[0, 0\] = -1 is outside \[0, 3\)"),
        (lambda: pack_codes(torch.tensor([[0, 1, 2]]), [3, 3]), "codes have 3 digits, radices give 2"),
        (lambda: unpack_codes(torch.tensor([9]), [3, 3]), r"packed ids must be in \[0, 9\)"),
        (lambda: pack_codes(torch.tensor([[0]]), [2**40, 2**40][:1] * 2), "more than int64 holds"),
        (lambda: unpack_codes(torch.tensor([0]), []), "non-empty list"),
    ],
)
def test_bad_input_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
