"""Fake quantization: quantize then dequantize in floating point, with a straight-through gradient.

    t = x / scale + zero_point
    x_hat = (round(clamp(t, qmin, qmax)) - zero_point) * scale
    d x_hat / d x = 1 where qmin <= t <= qmax, else 0

No gradient flows to ``scale`` or ``zero_point``. ``round`` is half-to-even. The arithmetic runs in the promoted
dtype of ``x`` and ``scale`` (float32 for half-precision inputs); the result has ``x``'s dtype. A ``zero_point`` of
``None`` means 0 (symmetric signed types), and skips the two additions.

Cost: on contiguous float32 CPU tensors, one pass of a native kernel that writes the result and a one-bit-per-element
mask (:mod:`quantrain.ops.native`); elsewhere one division, clamp, comparison, rounding and multiplication, each a
vectorized pass writing into the same buffer, with the same numbers. The backward pass is one multiplication by the
mask. (PyTorch's own ``fake_quantize_per_*_affine`` kernels are not used: on CPU they are slower, they multiply by
``1 / scale`` instead of dividing, and their gradient mask tests the rounded value, so their numbers differ from the
reference's.)

>>> import torch
>>> x = torch.tensor([-1.0, 0.26, 0.3, 5.0], requires_grad=True)
>>> y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), -10, 10)
>>> [round(v, 4) for v in y.tolist()]
[-1.0, 0.3, 0.3, 1.0]
>>> y.sum().backward(); x.grad.tolist()
[1.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from quantrain.ops import native
from quantrain.ops.ranges import block_layout

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "clamp_gate",
    "clamp_with_mask",
    "fake_quantize",
    "fake_quantize_clamped",
    "integer_bias",
    "observe_fake_quantize",
    "quantize_dequantize",
    "torch_quantize_dequantize_with_mask",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def torch_quantize_dequantize_with_mask(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    clamp: tuple[float, float | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward of the module docstring and its straight-through mask ``qmin <= t <= qmax`` (bool), in PyTorch
    operations (any dtype and device; traceable); with ``clamp=(lo, hi)``, of ``clamp(x, lo, hi)``, the mask also
    requiring ``lo < x < hi``. The native kernel computes the same in one pass, its mask packed one bit per element
    (:func:`quantrain.ops.native.fake_quantize_with_mask`)."""
    gate = None
    if clamp is not None:
        gate = clamp_gate(x, *clamp)
        x = torch.clamp(x, *clamp)
    # Compute on the float32 grid of the stored scale: a 0-dim scale would otherwise be cast down to
    # x's dtype by type promotion (float16/bfloat16), giving other levels than a per-channel scale.
    work = x if x.dtype == scale.dtype else x.to(torch.promote_types(x.dtype, scale.dtype))
    if scale.dim() > 0:
        # Broadcast views, not (C, 1)-shaped operands: PyTorch's CPU kernels divide by the latter several times slower.
        scale = scale.expand_as(work)
        zero_point = None if zero_point is None else zero_point.expand_as(work)
    t = torch.div(work, scale)
    if zero_point is not None:
        t.add_(zero_point)
    q = torch.clamp(t, qmin, qmax)
    mask = torch.eq(q, t, out=torch.empty_like(t, dtype=MASK_DTYPE))
    if gate is not None:
        mask.logical_and_(gate)
    q.round_()
    if zero_point is not None:
        q.sub_(zero_point)
    q.mul_(scale)
    return (q if q.dtype == x.dtype else q.to(x.dtype)), mask


def _masked(grad: Tensor, mask: Tensor) -> Tensor:
    """``grad * mask`` for a bool mask, or a mask packed in bits (uint8) by the native kernels."""
    if mask.dtype == torch.uint8:
        return native.masked_grad(grad, mask)
    # A bool mask read as uint8: the multiplication then converts in its loop (several times faster than bool).
    return grad * mask.view(torch.uint8)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize forward; gradient masked to the unclamped region (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, clamp) -> Tensor:
        args = (x, scale, zero_point, qmin, qmax, clamp)
        out, mask = native.fake_quantize_with_mask(*args) or torch_quantize_dequantize_with_mask(*args)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (inside,) = ctx.saved_tensors
        return _masked(grad_output, inside), None, None, None, None, None


class _ObservedFakeQuantizeSTE(torch.autograd.Function):
    """:func:`quantrain.ops.native.observe_fake_quantize` (observe, update the qparams, fake-quantize; one call), with
    the straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, layout, plan, state, quant_zero_point: bool) -> Tensor:
        out, mask = native.observe_fake_quantize(x, layout, plan, *state[:4], quant_zero_point, *state[4:] or [None])
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (inside,) = ctx.saved_tensors
        return _masked(grad_output, inside), None, None, None, None


def observe_fake_quantize(x: Tensor, layout, plan, state: tuple[Tensor, ...], quant_zero_point: bool) -> Tensor:
    """Observe ``x``, update the quantizer's ``state`` (tracked min and max, scale, zero point, optionally the
    non-finite counter) and fake-quantize ``x`` with the new qparams, in one native call (after
    :func:`quantrain.ops.native.observe_layout` gave ``layout``), with the straight-through gradient."""
    return _ObservedFakeQuantizeSTE.apply(x, layout, plan, state, quant_zero_point)


class _ClampWithMask(torch.autograd.Function):
    """``clamp(x, lo, hi)`` that keeps a boolean mask of where the gradient passes instead of its float output
    (``lo < x < hi``, strictly: ReLU's derivative at 0 is 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float | None) -> Tensor:
        ctx.save_for_backward(clamp_gate(x, lo, hi))
        return torch.clamp(x, lo, hi)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return _masked(grad, mask), None, None


def clamp_gate(x: Tensor, lo: float, hi: float | None) -> Tensor:
    """Where ``clamp(x, lo, hi)`` passes its gradient: ``lo < x < hi`` (no upper bound when ``hi`` is None)."""
    above = torch.gt(x, lo)
    return above if hi is None else above.logical_and_(torch.lt(x, hi))


def clamp_with_mask(x: Tensor, lo: float, hi: float | None = None) -> Tensor:
    """``torch.clamp(x, lo, hi)`` with the same gradient, keeping a 1-byte mask for backward instead of the output.

    >>> x = torch.tensor([-1.0, 0.0, 2.0, 7.0], requires_grad=True)
    >>> clamp_with_mask(x, 0.0, 6.0).sum().backward(); x.grad.tolist()
    [0.0, 0.0, 1.0, 0.0]
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _ClampWithMask.apply(x, lo, hi)
    return torch.clamp(x, lo, hi)


def fake_quantize_clamped(
    x: Tensor, lo: float, hi: float | None, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int
) -> Tensor:
    """``fake_quantize(clamp(x, lo, hi))`` (a fused ReLU/ReLU6 and its output quantizer), keeping one mask.

    The gradient is the composition's: ``grad`` where ``lo < x < hi`` and the clamped value is inside the
    quantization range.

    >>> x = torch.tensor([-1.0, 0.26, 9.0], requires_grad=True)
    >>> y = fake_quantize_clamped(x, 0.0, 6.0, torch.tensor(0.1), None, 0, 255)
    >>> [round(v, 4) for v in y.tolist()]
    [0.0, 0.3, 6.0]
    >>> y.sum().backward(); x.grad.tolist()
    [0.0, 1.0, 0.0]
    """
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, (lo, hi))


MASK_DTYPE = torch.bool
"""The saved gradient mask's dtype: one byte per element."""


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``x`` with ``scale``/``zero_point`` broadcastable to it (see module docstring)."""
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, None)


def quantize_dequantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, blocks: tuple[int, ...] | None
) -> Tensor:
    """:func:`fake_quantize` with one scale per block of ``blocks`` (``None``: one for the whole tensor)."""
    if blocks is None or scale.dim() == 0:
        return fake_quantize(x, scale, zero_point, qmin, qmax)
    split, counts = block_layout(x.shape, blocks)
    if all(n == 1 or size == 1 for n, size in zip(counts, split[1::2], strict=True)):
        return fake_quantize(x, scale, zero_point, qmin, qmax)  # per-axis: the range shape already broadcasts
    expanded = [n if i % 2 == 0 else 1 for i, n in enumerate(split)]
    zero_point = None if zero_point is None else zero_point.reshape(expanded)
    out = fake_quantize(x.reshape(split), scale.reshape(expanded), zero_point, qmin, qmax)
    return out.reshape(x.shape)


def integer_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """The bias an integer engine adds to its int32 accumulator, in real units, with a straight-through gradient.

    ``b_hat = clamp(round(b / (S_in * S_w)), -2^31, 2^31 - 1) * S_in * S_w`` with ``S_in`` the (per tensor) input
    scale and ``S_w`` the weight's scale, per tensor or one per output channel: any shape with that many elements,
    in the bias's order, whichever axis of the weight holds them (a keepdim ``(1, out)`` scale of an ``(in, out)``
    weight is flattened to ``(out,)``).

    >>> integer_bias(torch.tensor([0.3, -0.7]), torch.tensor(0.5), torch.tensor([0.5, 0.25])).tolist()
    [0.25, -0.75]

    """
    step = input_scale * weight_scale.reshape(-1)
    rounded = torch.clamp(torch.round(bias / step), INT32_MIN, INT32_MAX) * step
    return bias + (rounded - bias).detach()
