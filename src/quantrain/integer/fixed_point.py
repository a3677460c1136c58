"""Requantization by a fixed-point multiplier and a shift, as the paper does it (gemmlowp's arithmetic).

A real multiplier ``M > 0`` is written ``M = M0 * 2^-31 * 2^-shift`` with the int32 ``M0`` in ``[2^30, 2^31)``.
Then ``requantize(acc) = rounding_shift(rounding_doubling_high_mul(acc, M0), shift)`` with only integer operations:

    high = trunc((acc * M0 + nudge) / 2^31),  nudge = 2^30 if acc * M0 >= 0 else 1 - 2^30   (ties upward)
    out  = (high >> shift) + (remainder > threshold)   # round(high / 2^shift), ties away from zero,
           remainder = high & (2^shift - 1),  threshold = (2^shift - 1) >> 1 + (high < 0)

(a negative ``shift`` is a left shift of ``acc`` first).

>>> m0, shift = quantize_multiplier(0.3)
>>> import torch
>>> requantize(torch.tensor([100, -100, 5], dtype=torch.int32), m0, shift).tolist()
[30, -30, 2]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["quantize_multiplier", "requantize"]


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(M0, shift)`` with ``real ~= M0 * 2^(-31 - shift)``, ``M0`` in ``[2^30, 2^31)`` (``shift`` may be negative)."""
    if not real > 0 or not math.isfinite(real):
        raise ValueError(f"a requantization multiplier must be positive and finite, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:
        m0, exponent = m0 // 2, exponent + 1
    return m0, -exponent


def requantize(acc: Tensor, m0: int | Tensor, shift: int | Tensor) -> Tensor:
    """``round(acc * M)`` in integer arithmetic (int64 intermediates); ``m0``/``shift`` may be per-channel tensors."""
    if acc.is_floating_point():
        raise TypeError(f"requantize takes integer accumulators, got {acc.dtype}")
    acc = acc.to(torch.int64)
    m0 = torch.as_tensor(m0, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    product = (acc << torch.clamp(-shift, min=0)) * m0
    nudge = torch.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = torch.div(product + nudge, 1 << 31, rounding_mode="trunc")
    right = torch.clamp(shift, min=0)
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (high < 0).to(torch.int64)
    return (high >> right) + ((high & mask) > threshold).to(torch.int64)
