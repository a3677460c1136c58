"""Fixed-point multipliers and requantization: golden values and an exact rational reference."""

import math
from fractions import Fraction

import pytest
import torch

from quantrain.integer import quantize_multiplier, requantize


@pytest.mark.parametrize(
    "real, expected",
    [(0.5, (2**30, 0)), (0.75, (3 * 2**29, 0)), (1.5, (3 * 2**29, -1)), (0.25, (2**30, 1)), (2**-20, (2**30, 19))],
)
def test_multiplier_golden_values(real, expected):
    assert quantize_multiplier(real) == expected


def _round_half_away(value: Fraction) -> int:
    return int(math.copysign(math.floor(abs(value) + Fraction(1, 2)), value))


@pytest.mark.parametrize("real", [0.5, 0.25, 1.5, 3 / 1024, 0.123456, 0.0007])
def test_requantize_equals_rounding_half_away_from_zero(real):
    m0, shift = quantize_multiplier(real)
    exact = Fraction(m0, 2 ** (31 + shift)) if shift >= -31 else None
    acc = torch.tensor([0, 1, -1, 3, -3, 5, -5, 1023, -1024, 2**20 + 7, -(2**20) - 7], dtype=torch.int32)
    got = requantize(acc, m0, shift).tolist()
    # gemmlowp rounds twice (high multiply, then shift): compare with the same two roundings, exactly
    for a, g in zip(acc.tolist(), got, strict=True):
        product = a * m0 * (2 ** max(-shift, 0))
        high = int(Fraction(product + (2**30 if product >= 0 else 1 - 2**30), 2**31))  # truncation toward zero
        assert g == _round_half_away(Fraction(high, 2 ** max(shift, 0))), (a, g)
        assert abs(g - float(a * exact)) <= 1  # and within one unit of the exact product


def test_ties_follow_gemmlowp_and_per_channel_multipliers_broadcast():
    m0, shift = quantize_multiplier(0.5)  # no shift: only the doubling high multiply rounds, ties upward
    assert requantize(torch.tensor([1, 3, -1, -3], dtype=torch.int32), m0, shift).tolist() == [1, 2, 0, -1]
    m0, shift = quantize_multiplier(0.25)  # the rounding shift rounds ties away from zero
    assert requantize(torch.tensor([2, 6, -2, -6], dtype=torch.int32), m0, shift).tolist() == [1, 2, -1, -2]
    (m_a, s_a), (m_b, s_b) = quantize_multiplier(0.5), quantize_multiplier(0.25)
    acc = torch.tensor([[8, 8], [12, 12]], dtype=torch.int32)
    out = requantize(acc, torch.tensor([[m_a, m_b]]), torch.tensor([[s_a, s_b]]))
    assert out.tolist() == [[4, 2], [6, 3]] and out.dtype == torch.int64


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_multipliers_and_float_accumulators_are_refused(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        quantize_multiplier(bad)
    with pytest.raises(TypeError, match="integer accumulators"):
        requantize(torch.tensor([1.0]), 2**30, 0)
