"""An integer-only reference executor for quantrain's QDQ ONNX exports, following the paper's inference scheme.

``IntegerModel(path)`` reads the graph once and compiles it into integer steps: 8-bit activations (held in int32
tensors), int8 weights, int32 accumulators and biases (``round(b / (s_in * s_w))``), and requantization by a
fixed-point multiplier and shift (``M = s_in * s_w / s_out``). ReLU and Clip become clamps in the integer domain.
Average pools sum ``q - zp_in`` over each window in int32 and fold the window's size into the multiplier:
``q_out = zp_out + requantize(sum, M = s_in / (s_out * count))``, with ``count = kh * kw`` for AveragePool and
``count = H * W``, taken from the input's shape on each call, for GlobalAveragePool.
Floating point is used only where the model meets the outside world: quantizing its inputs and dequantizing its
outputs, and, at compile time, to derive the integer multipliers and biases (GlobalAveragePool's multiplier once
per input size, on the first call that meets it).

Supported: QuantizeLinear/DequantizeLinear, Conv (2-D), Gemm, MatMul, Relu, Clip, Add, MaxPool, AveragePool,
GlobalAveragePool, Flatten, Reshape, Identity. Anything else, or a float tensor reaching a kernel, raises
``ValueError`` naming the node.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quantrain.integer import kernels
from quantrain.integer.fixed_point import quantize_multiplier, requantize

__all__ = ["IntegerModel"]


@dataclass(frozen=True)
class _Quantized:
    """An 8-bit activation: int32 values with one scale and zero point, within [low, high]."""

    scale: float
    zero_point: int
    low: int
    high: int


@dataclass(frozen=True)
class _Accumulator:
    """int32 sums of products, real value = acc * scale (per output channel), waiting for requantization."""

    scale: np.ndarray
    axis: int
    low: float = -np.inf  # real-valued clamps from a following ReLU/Clip
    high: float = np.inf
    count_of: str | None = None  # a tensor whose H * W, known only when running, also divides ``scale``


@dataclass(frozen=True)
class _Sum:
    """Add of two quantized tensors, waiting for its output scale."""

    left: str
    right: str


@dataclass(frozen=True)
class _Step:
    node: str
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    output: str


class IntegerModel:
    """Run an exported model with integer arithmetic only (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import onnx
        from onnx import numpy_helper

        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises several types for damaged files
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {detail})") from None

        self.path = str(path)
        self._const: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self._meta: dict[str, Any] = {i.name: "float" for i in model.graph.input}
        self._steps: list[_Step] = []
        self.inputs = [i.name for i in model.graph.input]
        for node in model.graph.node:
            if node.op_type == "Constant":
                self._const[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                continue
            handler = getattr(self, f"_compile_{node.op_type}", None)
            if handler is None:
                raise ValueError(f"{self.path}: node {node.name!r} ({node.op_type}) is not supported by the integer reference")
            handler(node, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        self.outputs = []
        for output in model.graph.output:
            meta = self._meta.get(output.name)
            if not isinstance(meta, _Quantized):
                raise ValueError(
                    f"{self.path}: output {output.name!r} is not quantized; the integer reference needs a "
                    "QuantizeLinear/DequantizeLinear pair at every output"
                )
            self.outputs.append((output.name, meta))

    # ---- running ---------------------------------------------------------------------------------------------

    def run(self, *inputs: Tensor, trace: dict[str, torch.dtype] | None = None) -> list[Tensor]:
        """Quantize the inputs, run every step on integers, dequantize the outputs. ``trace`` (if given) receives the
        dtype each step produced."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path}: the model takes {len(self.inputs)} inputs, {len(inputs)} were given")
        env: dict[str, Tensor] = dict(zip(self.inputs, inputs, strict=True))
        for step in self._steps:
            value = step.fn(*(env[name] for name in step.inputs))
            if trace is not None:
                trace[step.node] = value.dtype
            env[step.output] = value
        return [(env[name].float() - meta.zero_point) * meta.scale for name, meta in self.outputs]

    # ---- compilation helpers ---------------------------------------------------------------------------------

    def _add(self, node, fn: Callable[..., Tensor], inputs: tuple[str, ...], meta: Any) -> None:
        self._steps.append(_Step(node.name or node.output[0], fn, inputs, node.output[0]))
        self._meta[node.output[0]] = meta

    def _quantized(self, node, name: str) -> _Quantized:
        meta = self._meta.get(name)
        if not isinstance(meta, _Quantized):
            raise ValueError(
                f"{self.path}: node {node.name!r} ({node.op_type}) needs a quantized input, but {name!r} is "
                f"{'a float tensor' if meta == 'float' else type(meta).__name__}"
            )
        return meta

    def _qparams(self, node) -> tuple[float, int, int, int]:
        scale = self._const[node.input[1]]
        if scale.size != 1:
            raise ValueError(f"{self.path}: node {node.name!r}: per-channel activation quantization is not supported")
        zero_point = self._const[node.input[2]]
        info = np.iinfo(zero_point.dtype)
        return float(scale), int(zero_point), int(info.min), int(info.max)

    # ---- quantize / dequantize -------------------------------------------------------------------------------

    def _compile_QuantizeLinear(self, node, attrs) -> None:
        scale, zp, low, high = self._qparams(node)
        out = _Quantized(scale, zp, low, high)
        source = self._meta.get(node.input[0])
        if source == "float":  # the model's input: the one place a float is quantized
            self._add(node, lambda x: torch.clamp(torch.round(x / scale) + zp, low, high).to(torch.int32), (node.input[0],), out)
        elif isinstance(source, _Accumulator) and source.count_of is not None:
            self._add(node, self._counted_requantizer(source, out), (node.input[0], source.count_of), out)
        elif isinstance(source, _Accumulator):
            self._add(node, self._requantizer(source, out), (node.input[0],), out)
        elif isinstance(source, _Quantized):
            self._add(node, self._rescaler(source, out), (node.input[0],), out)
        elif isinstance(source, _Sum):
            left, right = self._meta[source.left], self._meta[source.right]
            rescale_left, rescale_right = self._rescaler(left, out, offset=False), self._rescaler(right, out, offset=False)
            self._add(
                node,
                lambda a, b: torch.clamp(rescale_left(a) + rescale_right(b) + zp, low, high),
                (source.left, source.right),
                out,
            )
        else:
            raise ValueError(f"{self.path}: node {node.name!r} quantizes {node.input[0]!r}, which the integer reference cannot")

    def _compile_DequantizeLinear(self, node, attrs) -> None:
        if node.input[0] in self._const:  # a weight: keep its integers, zero point subtracted
            q = self._const[node.input[0]].astype(np.int64)
            scale = np.atleast_1d(self._const[node.input[1]]).astype(np.float64)
            zp = np.atleast_1d(self._const[node.input[2]]).astype(np.int64) if len(node.input) > 2 else np.zeros(1, np.int64)
            axis = attrs.get("axis", 1) if scale.size > 1 else 0
            shape = [1] * q.ndim
            shape[axis] = -1
            self._const[node.output[0]] = (q - zp.reshape(shape) if zp.size > 1 else q - zp[0]).astype(np.int32)
            self._meta[node.output[0]] = ("weight", scale, axis)
            return
        meta = self._quantized(node, node.input[0])
        scale, zp, _, _ = self._qparams(node)
        if not np.isclose(scale, meta.scale, rtol=0, atol=0) or zp != meta.zero_point:
            raise ValueError(f"{self.path}: node {node.name!r} dequantizes with other parameters than it was quantized with")
        self._add(node, lambda q: q, (node.input[0],), meta)

    def _requantizer(self, acc: _Accumulator, out: _Quantized) -> Callable[[Tensor], Tensor]:
        multipliers = [quantize_multiplier(float(s) / out.scale) for s in np.atleast_1d(acc.scale)]
        shape = [1] * 4
        shape[acc.axis] = -1
        m0 = torch.tensor([m for m, _ in multipliers], dtype=torch.int64)
        shift = torch.tensor([s for _, s in multipliers], dtype=torch.int64)
        low = max(out.low, out.zero_point + int(np.ceil(acc.low / out.scale - 1e-9)) if np.isfinite(acc.low) else out.low)
        high = min(out.high, out.zero_point + int(np.floor(acc.high / out.scale + 1e-9)) if np.isfinite(acc.high) else out.high)

        def fn(values: Tensor) -> Tensor:
            view = [1] * values.dim()
            if m0.numel() > 1:
                view[acc.axis] = -1
            scaled = requantize(values, m0.reshape(view), shift.reshape(view))
            return torch.clamp(scaled + out.zero_point, low, high).to(torch.int32)

        return fn

    def _counted_requantizer(self, acc: _Accumulator, out: _Quantized) -> Callable[[Tensor, Tensor], Tensor]:
        """Requantize a sum over each whole plane of ``acc.count_of``: ``M = acc.scale / (H * W) / out.scale``, the
        plane's size read from that tensor's shape on each call (one integer multiplier per size, then cached)."""
        by_count: dict[int, Callable[[Tensor], Tensor]] = {}

        def fn(values: Tensor, summed: Tensor) -> Tensor:
            count = int(summed.shape[-2]) * int(summed.shape[-1])
            if count not in by_count:
                by_count[count] = self._requantizer(replace(acc, scale=acc.scale / count, count_of=None), out)
            return by_count[count](values)

        return fn

    def _rescaler(self, source: _Quantized, out: _Quantized, offset: bool = True) -> Callable[[Tensor], Tensor]:
        if offset and source.scale == out.scale and source.zero_point == out.zero_point:
            return lambda q: q
        m0, shift = quantize_multiplier(source.scale / out.scale)
        if not offset:
            return lambda q: requantize(q - source.zero_point, m0, shift).to(torch.int32)
        return lambda q: torch.clamp(requantize(q - source.zero_point, m0, shift) + out.zero_point, out.low, out.high).to(
            torch.int32
        )

    # ---- layers ----------------------------------------------------------------------------------------------

    def _weight(self, node, name: str, out_axis: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The integer weight, its scales and their axis; per-channel scales must lie along ``out_axis``, the
        weight's output-channel dim (0 for Conv and for Gemm with transB, 1 for a MatMul or Gemm weight stored
        ``(in, out)``), since the accumulator is requantized per output channel."""
        meta = self._meta.get(name)
        if not (isinstance(meta, tuple) and meta[0] == "weight"):
            raise ValueError(f"{self.path}: node {node.name!r} ({node.op_type}) needs a DequantizeLinear weight as {name!r}")
        weight, scale, axis = self._const[name], meta[1], meta[2]
        if scale.size > 1 and axis % weight.ndim != out_axis:
            raise ValueError(
                f"{self.path}: node {node.name!r} ({node.op_type}): its weight {name!r} of shape {weight.shape} is "
                f"quantized per channel along axis {axis}, but its output channels are on axis {out_axis}; the "
                "integer reference needs one scale per output channel"
            )
        return weight, scale, axis

    def _bias(self, node, index: int, scale: np.ndarray) -> Tensor | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        bias = self._const.get(node.input[index])
        if bias is None:
            raise ValueError(f"{self.path}: node {node.name!r}: the bias must be a constant")
        return torch.from_numpy(np.round(bias.astype(np.float64) / scale).astype(np.int32))

    def _compile_Conv(self, node, attrs) -> None:
        x = self._quantized(node, node.input[0])
        weight, w_scale, _ = self._weight(node, node.input[1], out_axis=0)
        if weight.ndim != 4:
            raise ValueError(f"{self.path}: node {node.name!r}: only 2-D convolutions are supported")
        scale = x.scale * w_scale
        bias = self._bias(node, 2, scale)
        w = torch.from_numpy(weight)
        stride = tuple(attrs.get("strides", (1, 1)))
        dilation = tuple(attrs.get("dilations", (1, 1)))
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        pads = (pads[0], pads[1], pads[2], pads[3])
        groups = attrs.get("group", 1)

        def fn(q: Tensor) -> Tensor:
            acc = kernels.conv2d(q - x.zero_point, w, stride, pads, dilation, groups)
            return acc if bias is None else acc + bias.reshape(1, -1, 1, 1)

        self._add(node, fn, (node.input[0],), _Accumulator(np.broadcast_to(scale, (w.shape[0],)), axis=1))

    def _compile_Gemm(self, node, attrs) -> None:
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            raise ValueError(f"{self.path}: node {node.name!r}: only Gemm with alpha = beta = 1 and no transA is supported")
        self._matmul(node, transpose=bool(attrs.get("transB", 0)))

    def _compile_MatMul(self, node, attrs) -> None:
        self._matmul(node, transpose=False)

    def _matmul(self, node, transpose: bool) -> None:
        x = self._quantized(node, node.input[0])
        weight, w_scale, _ = self._weight(node, node.input[1], out_axis=0 if transpose else 1)
        w = torch.from_numpy(weight.T.copy() if transpose else weight)
        scale = x.scale * w_scale
        bias = self._bias(node, 2, scale)

        def fn(q: Tensor) -> Tensor:
            acc = kernels.matmul(q - x.zero_point, w)
            return acc if bias is None else acc + bias

        self._add(node, fn, (node.input[0],), _Accumulator(np.broadcast_to(scale, (w.shape[1],)), axis=1))

    def _compile_Relu(self, node, attrs) -> None:
        self._clamp(node, 0.0, np.inf)

    def _compile_Clip(self, node, attrs) -> None:
        low = float(self._const[node.input[1]]) if len(node.input) > 1 and node.input[1] else -np.inf
        high = float(self._const[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.inf
        self._clamp(node, low, high)

    def _clamp(self, node, low: float, high: float) -> None:
        source = self._meta.get(node.input[0])
        if isinstance(source, _Accumulator):  # applied when requantizing
            merged = replace(source, low=max(source.low, low), high=min(source.high, high))
            self._add(node, lambda acc: acc, (node.input[0],), merged)
            return
        q = self._quantized(node, node.input[0])
        lo = q.low if not np.isfinite(low) else max(q.low, q.zero_point + int(np.ceil(low / q.scale - 1e-9)))
        hi = q.high if not np.isfinite(high) else min(q.high, q.zero_point + int(np.floor(high / q.scale + 1e-9)))
        self._add(node, lambda values: torch.clamp(values, lo, hi), (node.input[0],), q)

    def _compile_Add(self, node, attrs) -> None:
        for name in node.input:
            self._quantized(node, name)
        self._meta[node.output[0]] = _Sum(node.input[0], node.input[1])

    def _compile_MaxPool(self, node, attrs) -> None:
        q = self._quantized(node, node.input[0])
        kernel, stride = tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"]))
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        self._add(node, lambda v: kernels.max_pool2d(v, kernel, stride, pads, q.low), (node.input[0],), q)

    def _compile_AveragePool(self, node, attrs) -> None:
        q = self._quantized(node, node.input[0])
        kernel, stride = tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"]))
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        if any(pads) and not attrs.get("count_include_pad", 0):
            raise ValueError(f"{self.path}: node {node.name!r}: padded AveragePool must count the padding")
        count = kernel[0] * kernel[1]
        self._add(
            node,
            lambda v: kernels.window_sum2d(v - q.zero_point, kernel, stride, pads),
            (node.input[0],),
            _Accumulator(np.array([q.scale / count]), axis=1),
        )

    def _compile_GlobalAveragePool(self, node, attrs) -> None:
        """``acc = sum over H, W of (q - zp_in)`` (shape N, C, 1, 1); the following QuantizeLinear requantizes it with
        ``M = s_in / (s_out * H * W)``, H * W taken from the input's shape when running."""
        q = self._quantized(node, node.input[0])
        self._add(
            node,
            lambda v: kernels.global_sum2d(v - q.zero_point),
            (node.input[0],),
            _Accumulator(np.array([q.scale]), axis=1, count_of=node.input[0]),
        )

    def _reshaped(self, node, shape_of: Callable[[Tensor], tuple[int, ...]]) -> None:
        q = self._quantized(node, node.input[0])
        self._add(node, lambda v: v.reshape(shape_of(v)), (node.input[0],), q)

    def _compile_Flatten(self, node, attrs) -> None:
        axis = attrs.get("axis", 1)
        self._reshaped(node, lambda v: (int(np.prod(v.shape[:axis])), -1))

    def _compile_Reshape(self, node, attrs) -> None:
        target = [int(d) for d in self._const[node.input[1]]]
        self._reshaped(node, lambda v: tuple(v.shape[i] if d == 0 else d for i, d in enumerate(target)))

    def _compile_Identity(self, node, attrs) -> None:
        self._reshaped(node, lambda v: tuple(v.shape))
