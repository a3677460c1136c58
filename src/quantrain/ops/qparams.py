"""Scale and zero point from a tracked range.

First the range is widened to contain 0, so that real zero is exactly representable (zero padding stays exact):
``lo = min(min, 0)``, ``hi = max(max, 0)``. Then, for an integer range ``[qmin, qmax]``:

* symmetric: ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, ``zero_point = (qmax + qmin + 1) // 2``
* affine: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``

``scale`` is floored at float32 eps before the zero point is computed, and ``zero_point`` is clamped to
``[qmin, qmax]``. ``round`` is half-to-even, as ``torch.round``.

>>> import torch
>>> scale, zp = calculate_qparams(torch.tensor(-1.0), torch.tensor(3.0), -127, 127, symmetric=False)
>>> round(scale.item() * 254, 6), zp.item()
(4.0, -63.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["calculate_qparams", "symmetric_scale", "symmetric_zero_point"]


EPS = torch.finfo(torch.float32).eps


def calculate_qparams(
    tracked_min: Tensor, tracked_max: Tensor, qmin: int, qmax: int, *, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Return ``(scale, zero_point)`` shaped like ``tracked_min``; the zero point is a float tensor."""
    if symmetric:
        scale = symmetric_scale(tracked_min, tracked_max, qmin, qmax)
        return scale, torch.full_like(scale, float(symmetric_zero_point(qmin, qmax)))
    lo = torch.clamp(tracked_min, max=0.0)
    hi = torch.clamp(tracked_max, min=0.0)
    scale = torch.clamp(_divide(hi - lo, float(qmax - qmin)), min=EPS)
    zero_point = qmin - torch.round(lo / scale)
    return scale, torch.clamp(zero_point, qmin, qmax)


def symmetric_scale(tracked_min: Tensor, tracked_max: Tensor, qmin: int, qmax: int) -> Tensor:
    """``max(|min(lo, 0)|, |max(hi, 0)|) / ((qmax - qmin) / 2)``, floored at eps, computed as
    ``max(-lo, hi) / ((qmax - qmin) / 2)`` floored at eps (the same numbers in four operations)."""
    return torch.clamp(_divide(torch.maximum(torch.neg(tracked_min), tracked_max), float(qmax - qmin) / 2), min=EPS)


def _divide(x: Tensor, divisor: float) -> Tensor:
    """``x / divisor``, correctly rounded on every device: PyTorch's CUDA kernel multiplies by the reciprocal of a
    CPU scalar divisor (one unit in the last place off for some ranges), so elsewhere the divisor is a device tensor."""
    if x.device.type == "cpu":
        return x / divisor
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def symmetric_zero_point(qmin: int, qmax: int) -> int:
    """The constant zero point of a symmetric range: ``(qmax + qmin + 1) // 2`` (0 for signed types)."""
    return min(max((qmax + qmin + 1) // 2, qmin), qmax)
