"""Modules for operations that PyTorch writes as plain functions, so that they can be quantization targets.

An integer engine quantizes the output of a residual addition like any layer's. ``x + y`` in a forward has no module
to configure; ``self.add = Add()`` and ``self.add(x, y)`` does, and its default target is ``_output_``.

>>> import torch
>>> Add()(torch.tensor([1.0]), torch.tensor([2.0])).tolist()
[3.0]
"""

from __future__ import annotations

from torch import Tensor, nn

from quantrain.config.resolve import register_default_targets

__all__ = ["Add"]


class Add(nn.Module):
    """``a + b``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


register_default_targets(Add, ("_output_0",))
