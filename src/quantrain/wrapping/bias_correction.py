"""Empirical bias correction: move each quantized layer's bias by the mean output shift its weight rounding causes.

Quantizing a weight ``W`` to ``Q(W)`` shifts the layer's pre-activation output by ``(W - Q(W)) x`` for an input
``x``. Over data, the mean of that shift per output channel ``c`` is a constant the bias can absorb
(Nagel et al., "Data-Free Quantization", 2019, section 4.2, measured empirically as NNI's PtqQuantizer does)::

    shift[c] = mean over batch and positions of  op(x, W - Q(W))[c]
    b[c]    += shift[c]

``x`` is the input the layer sees in the quantized model (its input quantizer applied), ``op`` the layer's linear
map without its bias (linear or convolution). For a layer with a folded BatchNorm, ``W`` is the folded weight and
the shift goes into BatchNorm's ``beta`` (the folded bias is ``beta + (b - mean) * s``), or into the layer's own
bias divided by ``s`` when the BatchNorm has no affine parameters.

>>> import torch
>>> from torch import nn
>>> from quantrain import PtqQuantizer
>>> model = nn.Sequential(nn.Linear(3, 2))
>>> ptq = PtqQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int2"}])
>>> ptq.track_forward(torch.ones(4, 3))
>>> _ = ptq.compress()
>>> measurement = BiasShift(ptq.quantized_modules)
>>> with measurement:
...     _ = model(torch.ones(4, 3))
>>> measurement.shifts()["0"].shape
torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from quantrain.wrapping.fusion import fold_factor, fold_parameters
from quantrain.wrapping.quantized_module import FUSION_NAME, QuantizedModule

__all__ = ["BiasShift", "correctable", "correct_bias"]


def correctable(module: nn.Module) -> bool:
    """Whether bias correction applies: a Linear or convolution whose weight is fake-quantized."""
    return isinstance(module, QuantizedModule) and isinstance(module, (nn.Linear, _ConvNd)) and "weight" in module.fake_quant


def _channel_dim(module: nn.Module, output: Tensor) -> int:
    """The output's channel dimension: 1 for convolutions (``N, C, ...``), the last for linear layers."""
    return 1 if isinstance(module, _ConvNd) else output.dim() - 1


def _folded_bn(module: nn.Module):
    fusion = module._modules.get(FUSION_NAME)
    return None if fusion is None else fusion.bn


def _weights(module: QuantizedModule) -> tuple[Tensor, Tensor]:
    """The float weight the layer computes with (the folded one under a folded BatchNorm) and its quantized value."""
    bn = _folded_bn(module)
    weight = module.weight if bn is None else fold_parameters(module.weight, module.bias, bn)[0]
    return weight, module.fake_quant["weight"](weight)


class BiasShift:
    """Inside ``with BiasShift(modules):``, every forward of a correctable module also measures its output shift.

    The measurement runs beside the module's own forward (one more linear map per call, without gradients); it
    changes neither the output nor any state. :meth:`shifts` gives the mean shift per output channel by module name.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = {name: module for name, module in modules.items() if correctable(module)}
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> BiasShift:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def measure(module: QuantizedModule, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                args, kwargs = module.quantize_inputs(args, kwargs)
                weight, quantized = _weights(module)
                shift = module.float_forward({"weight": weight - quantized, "bias": None}, *args, **kwargs)
                dim = _channel_dim(module, shift)
                other = [d for d in range(shift.dim()) if d != dim]
                total = shift.double().sum(dim=other) if other else shift.double()
                self._sums[name] = self._sums[name] + total if name in self._sums else total
                self._counts[name] = self._counts.get(name, 0) + shift.numel() // shift.shape[dim]

        return measure

    def shifts(self) -> dict[str, Tensor]:
        """Mean output shift per channel, ``mean(op(x, W - Q(W)))``, for each module that ran (float32)."""
        return {name: (total / self._counts[name]).float() for name, total in self._sums.items()}


@torch.no_grad()
def correct_bias(module: nn.Module, shift: Tensor) -> bool:
    """Add ``shift`` to the layer's effective bias; ``False`` when it has nowhere to go (no bias, no folded BN beta)."""
    bn = _folded_bn(module)
    if bn is not None and bn.bias is not None:
        bn.bias.add_(shift.to(bn.bias))
        return True
    bias = module._parameters.get("bias")
    if bias is None:
        return False
    if bn is not None:  # folded bias = beta + (b - mean) * s: b moves by shift / s (s = 0 channels have W = 0, no shift)
        factor = fold_factor(bn)
        shift = torch.where(factor == 0, torch.zeros_like(shift), shift / torch.where(factor == 0, 1.0, factor))
    bias.add_(shift.to(bias))
    return True
