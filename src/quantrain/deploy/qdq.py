"""Export-time stand-ins for fake quantizers: they compute what ONNX's QuantizeLinear/DequantizeLinear compute, and
export as exactly those operators.

* :class:`ExportActivation`: ``DequantizeLinear(QuantizeLinear(x, scale, zp), scale, zp)``, with ONNX's semantics:
  ``q = saturate(round(x / scale) + zp)`` to the 8-bit container (uint8 or int8). A fused ReLU/ReLU6 is exported
  before it as Relu/Clip only where that saturation does not already clamp to the same values.
* :class:`ExportWeight`: ``DequantizeLinear(q, scale, zp)`` with ``q`` the integer weight stored as an int8/uint8
  initializer, computed once (in a recording forward) as training quantized it: ``clamp(round(w / scale + zp),
  qmin, qmax)``. Sub-8-bit weights are int8 containers holding the narrow values.

Scales and zero points are plain tensor attributes, so the exporter writes them as constants.

Both exporters see the same two operators. The TorchScript-based one reads the ``symbolic`` of the autograd
functions below; the torch.export-based one (``torch.onnx.export(dynamo=True)``) captures the custom operators
``quantrain::quantize_dequantize`` and ``quantrain::dequantize``, which :data:`ONNX_TRANSLATIONS` writes as the
same ONNX nodes.
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


def _broadcast(scale: Tensor, zero_point: Tensor, dim: int, axis: int | None) -> tuple[Tensor, Tensor]:
    shape = [1] * dim
    if axis is not None:
        shape[axis] = -1
    return scale.reshape(shape), zero_point.float().reshape(shape)


@torch.library.custom_op("quantrain::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, low: int, high: int) -> Tensor:
    """ONNX's ``DequantizeLinear(QuantizeLinear(x))``: ``(clamp(round(x / s) + z, low, high) - z) * s``."""
    s, z = _broadcast(scale, zero_point, x.dim(), axis)
    return (torch.clamp(torch.round(x / s) + z, low, high) - z) * s


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, low: int, high: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("quantrain::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    """ONNX's ``DequantizeLinear(q)``: ``(q - z) * s``."""
    s, z = _broadcast(scale, zero_point, q.dim(), axis)
    return (q.float() - z) * s


@dequantize.register_fake
def _(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _onnx_quantize_dequantize(x, scale, zero_point, axis=None, low=0, high=255):
    from onnxscript import opset17 as op

    if axis is None:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


def _onnx_dequantize(q, scale, zero_point, axis=None):
    from onnxscript import opset17 as op

    if axis is None:
        return op.DequantizeLinear(q, scale, zero_point)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


ONNX_TRANSLATIONS = {
    torch.ops.quantrain.quantize_dequantize.default: _onnx_quantize_dequantize,
    torch.ops.quantrain.dequantize.default: _onnx_dequantize,
}
"""``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the quantrain operators as ONNX nodes."""


class _QuantizeDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, low: int, high: int) -> Tensor:
        return quantize_dequantize(x, scale, zero_point, axis, low, high)

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis, low, high):
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point, **kwargs), scale, zero_point, **kwargs)


class _DequantizeConstant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
        return dequantize(q, scale, zero_point, axis)

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

        if torch.compiler.is_exporting():  # torch.export: the custom operator itself, translated by ONNX_TRANSLATIONS
            return quantize_dequantize(x, self.scale, self.zero_point, self.axis, info.min, info.max)
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
        if torch.compiler.is_exporting():
            return dequantize(self.q, self.scale, self.zero_point, self.axis)
        return _DequantizeConstant.apply(w, self.q, self.scale, self.zero_point, self.axis)

    def _integers(self, w: Tensor) -> Tensor:
        shape = [1] * w.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        s, z = self.scale.reshape(shape), self.zero_point.float().reshape(shape)
        q = torch.clamp(torch.round(w / s + z), self.settings.qmin, self.settings.qmax)
        return q.to(self.zero_point.dtype)
