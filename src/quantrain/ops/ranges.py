"""Range tracking math: min/max per block of a tensor, and the exponential moving average that smooths them.

A block layout gives, for each dim, how many consecutive elements share one scale; :data:`WHOLE` (-1) means the
whole dim. ``(-1, -1)`` on a matrix is one range for everything, ``(1, -1)`` one per row, ``(-1, 32)`` one per 32
columns. The range of a layout has one entry per block, shaped ``(d0 // b0, d1 // b1, ...)`` (so it broadcasts
against the tensor when every block is 1 or whole).

>>> import torch
>>> lo, hi = min_max(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), (1, WHOLE))
>>> lo.tolist(), hi.tolist()
([[-2.0], [3.0]], [[1.0], [4.0]])
>>> round(ema_update(torch.tensor(1.0), torch.tensor(2.0), 0.99).item(), 6)
1.01
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantrain.config.settings import WHOLE
from quantrain.ops import native

__all__ = ["WHOLE", "block_layout", "ema_update", "ema_update_all_", "min_max"]


def block_layout(shape: tuple[int, ...] | torch.Size, blocks: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(split_shape, qparam_shape)``: the tensor viewed as ``(n0, b0, n1, b1, ...)`` and the range shape ``(n0, n1, ...)``.

    Raises ``ValueError`` when a block size does not divide its dim.
    """
    if len(shape) != len(blocks):
        raise ValueError(f"block layout {list(blocks)} needs a tensor with {len(blocks)} dims, got shape {tuple(shape)}")
    split: list[int] = []
    counts: list[int] = []
    for dim, (length, size) in enumerate(zip(shape, blocks, strict=True)):
        size = length if size == WHOLE else size
        if length % size:
            raise ValueError(f"block size {size} does not divide dim {dim} of length {length} (shape {tuple(shape)})")
        counts.append(length // size)
        split += [length // size, size]
    return tuple(split), tuple(counts)


def min_max(x: Tensor, blocks: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """Per-block minimum and maximum of ``x`` (``blocks=None``: of the whole tensor, as 0-dim tensors)."""
    x = x.detach()
    if blocks is None:
        return torch.aminmax(x)
    split, counts = block_layout(x.shape, blocks)
    axes = [d for d, n in enumerate(counts) if n != 1]
    if len(axes) == 1 and counts[axes[0]] == x.shape[axes[0]]:  # one range per index of a dim: one native pass
        fused = native.channel_min_max(x, axes[0])
        if fused is not None:
            return fused[0].reshape(counts), fused[1].reshape(counts)
    view = x.reshape(split)  # amin and amax: on CPU two passes beat aminmax along dims (5x slower, measured)
    dims = tuple(range(1, len(split), 2))
    return view.amin(dim=dims).reshape(counts), view.amax(dim=dims).reshape(counts)


def ema_update(average: Tensor, current: Tensor, decay: float) -> Tensor:
    """``average * decay + (1 - decay) * current``, evaluated in that order (bit-exact with the reference)."""
    return average * decay + (1 - decay) * current


def ema_update_all_(averages: list[Tensor], currents: list[Tensor], decay: float) -> None:
    """:func:`ema_update` for several pairs, written into ``averages`` (the same three roundings, as three
    multi-tensor calls); ``currents`` are overwritten."""

    torch._foreach_mul_(averages, decay)
    torch._foreach_mul_(currents, 1 - decay)
    torch._foreach_add_(averages, currents)
