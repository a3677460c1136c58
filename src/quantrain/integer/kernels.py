"""Integer kernels: every input, output and intermediate is an integer tensor (int32 accumulators).

Activations arrive as int32 tensors holding 8-bit values with their zero point subtracted where the formula needs it.

>>> import torch
>>> x = torch.arange(16, dtype=torch.int32).reshape(1, 1, 4, 4)
>>> max_pool2d(x, (2, 2), (2, 2), (0, 0, 0, 0), pad_value=0).tolist()
[[[[5, 7], [13, 15]]]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_integer", "conv2d", "global_sum2d", "matmul", "max_pool2d", "window_sum2d"]

INT32_LIMIT = 2**31 - 1


def check_integer(*tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"integer kernel got a {tensor.dtype} tensor")


def _check_accumulation(depth: int, a: Tensor, b: Tensor) -> None:
    bound = depth * int(a.abs().max()) * int(b.abs().max()) if a.numel() and b.numel() else 0
    if bound > INT32_LIMIT:
        raise OverflowError(f"an int32 accumulator could overflow: {depth} products of up to {bound // max(depth, 1)}")


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with int32 operands and accumulators."""
    check_integer(a, b)
    _check_accumulation(a.shape[-1], a, b)
    return torch.matmul(a.to(torch.int32), b.to(torch.int32))


def conv2d(
    x: Tensor, w: Tensor, stride: tuple[int, int], pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int
) -> Tensor:
    """2-D convolution of zero-point-free int32 activations ``x`` (N, C, H, W) with int32 weights ``w`` (O, C/g, kh, kw);
    padding adds zeros, which is real zero once the zero point is subtracted. im2col, then a grouped integer matmul."""
    check_integer(x, w)
    top, left, bottom, right = pads
    x = F.pad(x, (left, right, top, bottom), value=0)
    out_channels, group_channels, kh, kw = w.shape
    patches = x.unfold(2, (kh - 1) * dilation[0] + 1, stride[0]).unfold(3, (kw - 1) * dilation[1] + 1, stride[1])
    patches = patches[..., :: dilation[0], :: dilation[1]]  # (N, C, OH, OW, kh, kw)
    n, _, oh, ow = patches.shape[:4]
    patches = patches.reshape(n, groups, group_channels, oh, ow, kh * kw).permute(0, 1, 3, 4, 2, 5)
    patches = patches.reshape(n, groups, oh * ow, group_channels * kh * kw)
    weights = w.reshape(groups, out_channels // groups, group_channels * kh * kw).transpose(1, 2)
    out = matmul(patches, weights.unsqueeze(0))  # (N, g, OH*OW, O/g)
    return out.permute(0, 1, 3, 2).reshape(n, out_channels, oh, ow)


def max_pool2d(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int], pad_value: int
) -> Tensor:
    check_integer(x)
    top, left, bottom, right = pads
    x = F.pad(x, (left, right, top, bottom), value=pad_value)
    return x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).amax(dim=(-1, -2))


def window_sum2d(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int]) -> Tensor:
    """Sums over each pooling window (zero padding), as int32."""
    check_integer(x)
    top, left, bottom, right = pads
    x = F.pad(x, (left, right, top, bottom), value=0)
    return x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).sum(dim=(-1, -2), dtype=torch.int32)


def global_sum2d(x: Tensor) -> Tensor:
    """``acc[n, c, 0, 0] = sum over h, w of x[n, c, h, w]``: the whole plane summed, as int32, shape (N, C, 1, 1).
    Summed in int64 first, so that a plane too large for an int32 accumulator raises instead of wrapping."""
    check_integer(x)
    acc = x.sum(dim=(-1, -2), keepdim=True, dtype=torch.int64)
    if acc.numel() and int(acc.abs().max()) > INT32_LIMIT:
        raise OverflowError(
            f"an int32 accumulator overflows: a sum of {x.shape[-2] * x.shape[-1]} values reaches {int(acc.abs().max())}"
        )
    return acc.to(torch.int32)
