"""Export-time stand-ins for fake quantizers: they compute what ONNX's QuantizeLinear/DequantizeLinear compute, and
export as exactly those operators.

* :class:`ExportActivation`: ``DequantizeLinear(QuantizeLinear(x, scale, zp), scale, zp)``, with ONNX's semantics:
  ``q = saturate(round(x / scale) + zp)`` to the 8-bit container (uint8 or int8). A fused ReLU/ReLU6 is exported
  before it as Relu/Clip only where that saturation does not already clamp to the same values.
* :class:`ExportWeight`: ``DequantizeLinear(q, scale, zp)`` with ``q`` the integer weight stored as an int8/uint8
  initializer, computed once (in a recording forward) as training quantized it: ``clamp(round(w / scale + zp),
  qmin, qmax)``. Sub-8-bit weights are int8 containers holding the narrow values.

Scales and zero points are plain tensor attributes, so the exporter writes them as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantrain.fake_quantizer import FakeQuantizer

__all__ = ["ExportActivation", "ExportWeight", "container_dtype"]


def container_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def _axis_of(scale: Tensor) -> int | None:
    """The single axis along which a keepdim-shaped scale varies (``None``: one scale)."""
    varying = [dim for dim, size in enumerate(scale.shape) if size > 1]
    if scale.numel() == 1:
        return None
    if len(varying) != 1:
        raise ValueError(f"scales of shape {tuple(scale.shape)} vary along several dims; ONNX supports one axis")
    return varying[0]


class _QuantizeDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, low: int, high: int) -> Tensor:
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        s, z = scale.reshape(shape), zero_point.float().reshape(shape)
        return (torch.clamp(torch.round(x / s) + z, low, high) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis, low, high):
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point, **kwargs), scale, zero_point, **kwargs)


class _DequantizeConstant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
        shape = [1] * q.dim()
        if axis is not None:
            shape[axis] = -1
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w, q, scale, zero_point, axis):
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


class _ExportBase(nn.Module):
    def __init__(self, fq: FakeQuantizer) -> None:
        super().__init__()
        if not fq.is_calibrated:
            raise ValueError(f"{fq.label} has no scale yet: train or calibrate the model before exporting it")
        self.label = fq.label
        self.settings = fq.settings
        scale = fq.scale.detach().float()
        try:
            self.axis = _axis_of(scale)
        except ValueError as exc:
            raise ValueError(f"{fq.label}: granularity {fq.settings.granularity.spec!r} cannot be exported: {exc}") from None

        self.scale = scale.flatten() if self.axis is not None else scale.reshape(())
        zp = fq.zero_point.detach().round().flatten() if self.axis is not None else fq.zero_point.detach().round().reshape(())
        self.zero_point = zp.to(container_dtype(fq.settings.dtype.signed))


class ExportActivation(_ExportBase):
    """An input/output quantization point: Q then DQ, with ONNX's saturation to the 8-bit container.

    ``calls``, when set to a list, receives this point's label at each call (the export names nodes from it).
    """

    calls: list[str] | None = None
    clamps_when_tracing = True
    """A fused layer hands this quantizer its activation's clamp while the export traces it too (see
    :class:`~quantrain.wrapping.quantized_module.QuantizedModule`): the clamp is then exported only where the
    quantization does not already saturate to it (:meth:`saturates_to`)."""

    def forward(self, x: Tensor, clamp: tuple[float, float | None] | None = None) -> Tensor:
        if self.calls is not None:
            self.calls.append(self.label)
        # a fused ReLU/ReLU6 that the quantizer applied (see FakeQuantizer.forward), unless the saturation does it
        if clamp is not None and not self.saturates_to(*clamp):
            x = torch.relu(x) if clamp == (0.0, None) else torch.clamp(x, *clamp)
        info = torch.iinfo(self.zero_point.dtype)

        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.axis, info.min, info.max)

    def saturates_to(self, lo: float, hi: float | None) -> bool:
        """Whether quantizing already clamps to ``[lo, hi]``: ``q(lo)`` is the container's minimum and ``q(hi)`` its
        maximum (``q(v) = round(v / scale) + zp``, checked with a margin of 0.001 from the rounding boundary), so
        ``q(clamp(x, lo, hi)) = q(x)`` for every ``x`` and the export needs no Relu/Clip before the QuantizeLinear
        (e.g. a ReLU6 before a uint8 quantizer with zero point 0 and ``255 * scale <= 6``)."""
        key = (lo, hi)
        cached = self.__dict__.setdefault("_saturates", {})
        if key not in cached:
            info = torch.iinfo(self.zero_point.dtype)
            scale, zero_point = self.scale.double(), self.zero_point.double()
            low = bool((lo / scale + zero_point <= info.min + 0.499).all())
            high = hi is None or bool((hi / scale + zero_point >= info.max - 0.499).all())
            cached[key] = low and high
        return cached[key]


class ExportWeight(_ExportBase):
    """A parameter: its integers as an initializer, then DQ. The first call records them from the tensor given."""

    q: Tensor | None = None

    def forward(self, w: Tensor) -> Tensor:
        if self.q is None:
            self.q = self._integers(w.detach())
        return _DequantizeConstant.apply(w, self.q, self.scale, self.zero_point, self.axis)

    def _integers(self, w: Tensor) -> Tensor:
        shape = [1] * w.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        s, z = self.scale.reshape(shape), self.zero_point.float().reshape(shape)
        q = torch.clamp(torch.round(w / s + z), self.settings.qmin, self.settings.qmax)
        return q.to(self.zero_point.dtype)
