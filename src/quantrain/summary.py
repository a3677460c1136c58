"""What ``quantrain inspect`` prints: summaries of an ONNX QDQ export and of a calibration config.

Pure functions return frozen dataclasses (:class:`OnnxSummary`, :class:`CalibrationSummary`);
:func:`format_summary` renders either as aligned text tables and :func:`summary_to_dict` as JSON-ready dicts.

**ONNX QDQ models** (as :func:`quantrain.export_onnx` writes them). A *layer* is a Conv, ConvTranspose, Gemm or
MatMul node; it is quantized when its weight is ``DequantizeLinear(q, scale, zero_point)`` of a constant integer
tensor ``q`` (an initializer or a ``Constant`` node), so that ``w = (q - zero_point) * scale``. For each layer:

* ``dtype``: the container of ``q`` (``int8``/``uint8``); ``bits``: the narrowest width holding every stored integer,
  ``[-2^(b-1), 2^(b-1) - 1]`` signed or ``[0, 2^b - 1]`` unsigned (quantrain stores int4 weights in int8 containers,
  in ``[-7, 7]``, so this shows 4).
* ``scheme``: what the zero points show: ``symmetric`` when all are 0 (signed) or ``2^(bits-1)`` (unsigned, the
  middle of the range), else ``affine``.
* ``granularity``: ``per-tensor`` (one scale) or ``per-channel`` along ``axis`` (ONNX's ``axis`` attribute, default 1).

An *activation quantization point* is a QuantizeLinear whose output feeds a DequantizeLinear; its label is
``module.target`` where the export named it (``<label>/quantize``; a point the forward calls again is
``module.target#n`` at its n-th repeated call), else the node's name (a pair the export inserted after a
grid-preserving operator such as Flatten or MaxPool).

Totals: every constant tensor is counted once, in the first role that applies: *integer weight* (the ``q`` input of
a DequantizeLinear), *quantization parameter* (a scale or zero point of a QuantizeLinear/DequantizeLinear), *float*
(any other floating-point constant: biases, unquantized weights) or *other* (shapes, indices). The integer share is
``integer_weight_elements / (integer_weight_elements + float_elements)``.

**Calibration configs** (:func:`quantrain.load_calibration_config`: quantrain's JSON or NNI's
``{module: {target: {scale, zero_point, quant_dtype, quant_scheme, quant_bits, tracked_min, tracked_max}}}``): per
module and target the dtype, scheme, granularity (``per-tensor`` when the scale has one element; ``per-channel`` when
exactly one dim has more than one, e.g. ``(16, 1, 1, 1)`` is axis 0 with 16 channels; else ``per-block``), and the
ranges of scale, zero point and tracked range.

>>> import torch
>>> config = {"fc": {"weight": {"scale": torch.tensor([[0.01], [0.02]]), "zero_point": torch.zeros(2, 1),
...                             "quant_dtype": "int8", "quant_scheme": "symmetric"}}}
>>> target = summarize_calibration_config(config).targets[0]
>>> target.granularity, target.axis, target.channels, round(target.scale_max, 6)
('per-channel', 0, 2, 0.02)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ActivationPoint",
    "CalibrationSummary",
    "CalibrationTarget",
    "LayerSummary",
    "OnnxSummary",
    "format_summary",
    "format_table",
    "summarize_calibration_config",
    "summarize_file",
    "summarize_onnx",
    "summary_to_dict",
]

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Operators with a weight input that an integer engine runs as an integer kernel."""
PASS_THROUGH = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze"})
"""Operators followed backwards from a layer's weight input to find its DequantizeLinear."""
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
"""Operators between a layer and the QuantizeLinear of its output that integer engines fuse into the layer."""
FLOAT_TYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class LayerSummary:
    """One Conv/ConvTranspose/Gemm/MatMul node; the weight fields are ``None`` when its weight is float."""

    node: str
    module: str | None
    op_type: str
    weight_shape: tuple[int, ...]
    dtype: str
    bits: int | None
    scheme: str | None
    granularity: str | None
    axis: int | None
    channels: int
    scale_min: float | None
    scale_max: float | None
    zero_point_min: int | None
    zero_point_max: int | None
    input_dtype: str | None
    output_dtype: str | None

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class ActivationPoint:
    """A QuantizeLinear -> DequantizeLinear pair on an activation."""

    label: str
    node: str
    dtype: str
    scheme: str
    granularity: str
    axis: int | None
    scale_min: float
    scale_max: float
    zero_point_min: int
    zero_point_max: int
    named: bool
    """Whether the export named it after the trained model's ``module.target`` (else the export inserted it)."""


@dataclass(frozen=True)
class OnnxSummary:
    path: str | None
    file_bytes: int | None
    opset: int | None
    layers: tuple[LayerSummary, ...]
    activations: tuple[ActivationPoint, ...]
    integer_weight_elements: int
    float_elements: int
    integer_weight_bytes: int
    float_bytes: int
    qparam_bytes: int
    other_bytes: int

    @property
    def integer_share(self) -> float:
        """``integer_weight_elements / (integer_weight_elements + float_elements)`` (0 without constants)."""
        total = self.integer_weight_elements + self.float_elements
        return self.integer_weight_elements / total if total else 0.0


@dataclass(frozen=True)
class CalibrationTarget:
    module: str
    target: str
    kind: str
    """``'activation'`` for ``_input_*``/``_output_*`` targets, ``'parameter'`` otherwise."""
    dtype: str | None
    bits: int | None
    scheme: str | None
    granularity: str
    shape: tuple[int, ...]
    axis: int | None
    channels: int
    scale_min: float
    scale_max: float
    zero_point_min: float
    zero_point_max: float
    tracked_min: float | None
    tracked_max: float | None


@dataclass(frozen=True)
class CalibrationSummary:
    path: str | None
    file_bytes: int | None
    targets: tuple[CalibrationTarget, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.module for t in self.targets))


# ---------------------------------------------------------------------------------------------------------- files


def summarize_file(path: str | os.PathLike) -> OnnxSummary | CalibrationSummary:
    """Summarize ``path``: an ONNX model (``.onnx``, or any file not starting with ``{``) or a calibration JSON.

    Raises ``FileNotFoundError`` when it does not exist, ``ValueError`` when it is neither, and ``ImportError`` when
    it is an ONNX model and the ``onnx`` package is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if _looks_like_json(path):
        from quantrain.calibration import load_calibration_config

        config = load_calibration_config(path)
        return dataclasses.replace(summarize_calibration_config(config), path=path, file_bytes=os.path.getsize(path))
    return summarize_onnx(path)


def _looks_like_json(path: str) -> bool:
    if path.lower().endswith(".json"):
        return True
    if path.lower().endswith(".onnx"):
        return False
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


# ----------------------------------------------------------------------------------------------------------- ONNX


def summarize_onnx(model: Any) -> OnnxSummary:
    """Summarize an ONNX model: a ``ModelProto`` or a path (see the module docstring for what is counted)."""
    import onnx

    path = None
    if not isinstance(model, onnx.ModelProto):
        path = os.fspath(model)
        try:
            model = onnx.load(path)
        except Exception as exc:  # protobuf raises its own error types for non-ONNX bytes
            raise ValueError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
        if not model.graph.node:
            raise ValueError(f"{path}: not an ONNX model (no graph nodes)")
    graph = _Graph(model.graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    totals = graph.totals()
    return OnnxSummary(
        path=path,
        file_bytes=os.path.getsize(path) if path else model.ByteSize(),
        opset=opset,
        layers=tuple(graph.layer(node) for node in graph.nodes if node.op_type in LAYER_OPS),
        activations=tuple(graph.activation(node) for node in graph.nodes if graph.is_activation_point(node)),
        **totals,
    )


class _Graph:
    """Constants, producers and consumers of an ONNX graph, and the per-node analyses."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.nodes = list(graph.node)
        self.constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute:
                self.constants[node.output[0]] = _constant_value(node.attribute[0])
        self.producers = {output: node for node in self.nodes for output in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def totals(self) -> dict[str, int]:
        """Elements and bytes per role of each constant (see the module docstring)."""
        integer_weights, qparams = set(), set()
        for node in self.nodes:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                qparams.update(node.input[1:])
                if node.op_type == "DequantizeLinear" and node.input[0] in self.constants:
                    integer_weights.add(node.input[0])
        counts = dict.fromkeys(("integer_weight_elements", "float_elements"), 0)
        counts |= dict.fromkeys(("integer_weight_bytes", "float_bytes", "qparam_bytes", "other_bytes"), 0)
        for name, value in self.constants.items():
            if name in integer_weights:
                counts["integer_weight_elements"] += value.size
                counts["integer_weight_bytes"] += value.nbytes
            elif name in qparams:
                counts["qparam_bytes"] += value.nbytes
            elif value.dtype.name in FLOAT_TYPES:
                counts["float_elements"] += value.size
                counts["float_bytes"] += value.nbytes
            else:
                counts["other_bytes"] += value.nbytes
        return counts

    def _qparams(self, node: Any) -> tuple[np.ndarray, np.ndarray, str]:
        """``(scale, zero_point, dtype)`` of a QuantizeLinear/DequantizeLinear with constant parameters."""
        scale = self.constants.get(node.input[1])
        if scale is None:
            raise ValueError(f"{node.op_type} {node.name!r}: its scale is not a constant")
        if len(node.input) > 2 and node.input[2]:
            zero_point = self.constants.get(node.input[2])
            if zero_point is None:
                raise ValueError(f"{node.op_type} {node.name!r}: its zero point is not a constant")
        elif node.op_type == "DequantizeLinear" and node.input[0] in self.constants:
            zero_point = np.zeros(scale.shape, self.constants[node.input[0]].dtype)
        else:
            zero_point = np.zeros(scale.shape, np.uint8)  # ONNX's default output type of QuantizeLinear
        return scale.astype(np.float64), zero_point, zero_point.dtype.name

    def _weight_source(self, node: Any) -> str | None:
        """The weight input of a layer node: input 1, or for MatMul whichever input derives from a constant."""
        candidates = [1] if node.op_type != "MatMul" else [1, 0]
        for index in candidates:
            if index < len(node.input) and self._constant_origin(node.input[index]) is not None:
                return node.input[index]
        return None

    def _constant_origin(self, name: str) -> Any:
        """The DequantizeLinear (of a constant) or the constant name that ``name`` derives from, through
        :data:`PASS_THROUGH` operators; ``None`` when it is computed from the graph's inputs."""
        while True:
            if name in self.constants:
                return name
            producer = self.producers.get(name)
            if producer is None:
                return None
            if producer.op_type == "DequantizeLinear":
                return producer if producer.input[0] in self.constants else None
            if producer.op_type not in PASS_THROUGH:
                return None
            name = producer.input[0]

    def layer(self, node: Any) -> LayerSummary:
        source = self._weight_source(node)
        origin = self._constant_origin(source) if source is not None else None
        common = {
            "node": node.name,
            "module": module_name(node.name),
            "op_type": node.op_type,
            "input_dtype": self._quantized_input(node),
            "output_dtype": self._quantized_output(node),
        }
        if origin is None or isinstance(origin, str):
            value = self.constants.get(origin) if isinstance(origin, str) else None
            return LayerSummary(
                weight_shape=tuple(value.shape) if value is not None else (),
                dtype=value.dtype.name if value is not None else "float",
                **dict.fromkeys(("bits", "scheme", "granularity", "axis", "scale_min", "scale_max"), None),
                **dict.fromkeys(("zero_point_min", "zero_point_max"), None),
                channels=0,
                **common,
            )
        q = self.constants[origin.input[0]]
        scale, zero_point, dtype = self._qparams(origin)
        bits = stored_bits(q)
        axis = _attribute(origin, "axis", 1) if scale.size > 1 else None
        if axis is not None and axis < 0:
            axis += q.ndim
        return LayerSummary(
            weight_shape=tuple(q.shape),
            dtype=dtype,
            bits=bits,
            scheme=scheme_of(zero_point, bits),
            granularity=_granularity_of(scale, q.ndim),
            axis=axis,
            channels=int(scale.size),
            scale_min=float(scale.min()),
            scale_max=float(scale.max()),
            zero_point_min=int(zero_point.min()),
            zero_point_max=int(zero_point.max()),
            **common,
        )

    def _quantized_input(self, node: Any) -> str | None:
        """The dtype of the layer's activation input when it is dequantized from a QuantizeLinear."""
        producer = self.producers.get(node.input[0]) if node.input else None
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        source = self.producers.get(producer.input[0])
        if source is None or source.op_type != "QuantizeLinear":
            return None
        return self._qparams(producer)[2]

    def _quantized_output(self, node: Any) -> str | None:
        """The dtype of the QuantizeLinear after the layer (possibly after a fused Relu/Clip)."""
        name = node.output[0]
        for _ in range(2):
            consumers = self.consumers.get(name, [])
            quantize = next((c for c in consumers if c.op_type == "QuantizeLinear"), None)
            if quantize is not None:
                return self._qparams(quantize)[2]
            if len(consumers) != 1 or consumers[0].op_type not in FUSED_ACTIVATIONS:
                return None
            name = consumers[0].output[0]
        return None

    def is_activation_point(self, node: Any) -> bool:
        return node.op_type == "QuantizeLinear" and any(
            c.op_type == "DequantizeLinear" for c in self.consumers.get(node.output[0], [])
        )

    def activation(self, node: Any) -> ActivationPoint:
        scale, zero_point, dtype = self._qparams(node)
        named = node.name.endswith("/quantize")
        bits = zero_point.dtype.itemsize * 8
        axis = _attribute(node, "axis", 1) if scale.size > 1 else None
        return ActivationPoint(
            label=node.name.removesuffix("/quantize") if named else node.name,
            node=node.name,
            dtype=dtype,
            scheme=scheme_of(zero_point, bits),
            granularity="per-tensor" if scale.size == 1 else "per-channel",
            axis=axis,
            scale_min=float(scale.min()),
            scale_max=float(scale.max()),
            zero_point_min=int(zero_point.min()),
            zero_point_max=int(zero_point.max()),
            named=named,
        )


def _constant_value(attribute: Any) -> np.ndarray:
    """The value of a ``Constant`` node's attribute: ``value`` (a tensor), ``value_float(s)`` or ``value_int(s)``."""
    from onnx import helper, numpy_helper

    if attribute.name == "value":
        return numpy_helper.to_array(attribute.t)
    value = helper.get_attribute_value(attribute)
    dtype = np.float32 if attribute.name.startswith("value_float") else np.int64
    return np.asarray(value, dtype=dtype) if not isinstance(value, (bytes, str)) else np.asarray(0, dtype=np.int64)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _granularity_of(scale: np.ndarray, rank: int) -> str:
    if scale.size == 1:
        return "per-tensor"
    return "per-block" if scale.ndim == rank and rank > 1 else "per-channel"


def stored_bits(q: np.ndarray) -> int:
    """The narrowest width ``b >= 2`` holding every value of ``q``: ``[-2^(b-1), 2^(b-1) - 1]`` for a signed
    container, ``[0, 2^b - 1]`` for an unsigned one.

    >>> stored_bits(np.array([-7, 0, 7], np.int8)), stored_bits(np.array([0, 255], np.uint8))
    (4, 8)
    """
    container = q.dtype.itemsize * 8
    if q.size == 0:
        return container
    lo, hi = int(q.min()), int(q.max())
    signed = np.issubdtype(q.dtype, np.signedinteger)
    for bits in range(2, container):
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if low <= lo and hi <= high:
            return bits
    return container


def scheme_of(zero_point: np.ndarray, bits: int) -> str:
    """``'symmetric'`` when every zero point is 0 (signed) or ``2^(bits-1)`` (unsigned), else ``'affine'``.

    >>> scheme_of(np.zeros(3, np.int8), 8), scheme_of(np.array([128], np.uint8), 8), scheme_of(np.array(3, np.uint8), 8)
    ('symmetric', 'symmetric', 'affine')
    """
    middle = 0 if np.issubdtype(zero_point.dtype, np.signedinteger) else 2 ** (bits - 1)
    return "symmetric" if bool(np.all(zero_point.astype(np.int64) == middle)) else "affine"


def module_name(node_name: str) -> str | None:
    """The PyTorch module a node came from, rebuilt from the TorchScript exporter's scope name (best effort).

    The exporter names a node ``/<scope>/.../<op>``, one scope per called module, each the module's qualified name
    from its last non-numeric part on: ``features.0.conv`` is ``/features/features.0/conv``. A scope ending in a
    number repeats its parent's tail (``features`` + ``features.0``); one ending in a name adds to it. ``None``
    when the name does not look like that (e.g. the root module's own nodes).

    >>> module_name("/features/features.0/conv/Conv"), module_name("/0/Conv"), module_name("/Gemm")
    ('features.0.conv', '0', None)
    """
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0] != "" or not all(parts[1:-1]):
        return None
    atoms: list[str] = []
    for scope in parts[1:-1]:
        atoms = _extend_scope(atoms, scope.split("."))
    return ".".join(atoms)


def _extend_scope(parent: list[str], scope: list[str]) -> list[str]:
    """The qualified name of a module whose unqualified name is ``scope``, called inside ``parent``."""
    if all(atom.isdigit() for atom in scope):
        return scope  # no non-numeric part: the exporter used the whole qualified name
    if not scope[-1].isdigit():
        return parent + scope
    for overlap in range(len(scope) - 1, 0, -1):  # the longest tail of parent that the scope repeats
        if parent[-overlap:] == scope[:overlap]:
            return parent[:-overlap] + scope
    return parent + scope  # a container that is never called (ModuleList, ModuleDict) has no scope of its own


# ---------------------------------------------------------------------------------------------------- calibration


def summarize_calibration_config(config: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> CalibrationSummary:
    """Summarize a calibration_config (``get_calibration_config()`` or :func:`quantrain.load_calibration_config`)."""
    targets = []
    for module, entries in config.items():
        for target, entry in entries.items():
            targets.append(_calibration_target(module, target, entry))
    return CalibrationSummary(path=None, file_bytes=None, targets=tuple(targets))


def _calibration_target(module: str, target: str, entry: Mapping[str, Any]) -> CalibrationTarget:
    scale, zero_point = _array(entry["scale"]), _array(entry["zero_point"])
    varying = [dim for dim, size in enumerate(scale.shape) if size > 1]
    granularity = "per-tensor" if scale.size == 1 else "per-channel" if len(varying) == 1 else "per-block"
    tracked_min, tracked_max = entry.get("tracked_min"), entry.get("tracked_max")
    bits = entry.get("quant_bits")
    return CalibrationTarget(
        module=module,
        target=target,
        kind="activation" if target.startswith(("_input_", "_output_")) else "parameter",
        dtype=entry.get("quant_dtype"),
        bits=int(bits) if bits is not None else None,
        scheme=entry.get("quant_scheme"),
        granularity=granularity,
        shape=tuple(scale.shape),
        axis=varying[0] if granularity == "per-channel" else None,
        channels=int(scale.size),
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        zero_point_min=float(zero_point.min()),
        zero_point_max=float(zero_point.max()),
        tracked_min=float(_array(tracked_min).min()) if tracked_min is not None else None,
        tracked_max=float(_array(tracked_max).max()) if tracked_max is not None else None,
    )


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------- formatting


def summary_to_dict(summary: OnnxSummary | CalibrationSummary) -> dict[str, Any]:
    """A JSON-ready dict: the dataclass fields, the derived totals, and non-finite numbers as strings."""
    data = dataclasses.asdict(summary)
    if isinstance(summary, OnnxSummary):
        data["kind"] = "onnx"
        data["integer_share"] = summary.integer_share
        for layer, entry in zip(summary.layers, data["layers"], strict=True):
            entry["quantized"] = layer.quantized
    else:
        data["kind"] = "calibration_config"
        data["modules"] = list(summary.modules)
    return _finite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by `` | ``, a ``-+-`` rule under the first row (the header).

    >>> print(format_table([("a", "bb"), ("ccc", "d")]))
    a   | bb
    ----+---
    ccc | d
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def format_summary(summary: OnnxSummary | CalibrationSummary) -> str:
    """The text ``quantrain inspect`` prints."""
    if isinstance(summary, OnnxSummary):
        return _format_onnx(summary)
    return _format_calibration(summary)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.1f} MiB"


def _granularity(granularity: str | None, axis: int | None, channels: int) -> str:
    if granularity is None:
        return "-"
    return f"per-channel (axis {axis}, {channels})" if granularity == "per-channel" else granularity


def _format_onnx(s: OnnxSummary) -> str:
    quantized = sum(layer.quantized for layer in s.layers)
    total = s.integer_weight_elements + s.float_elements
    lines = [
        f"{s.path or '<in memory>'}: ONNX model, opset {s.opset}, {_size(s.file_bytes)}",
        f"{quantized} of {len(s.layers)} Conv/Gemm/MatMul layers with integer weights; {len(s.activations)} activation "
        f"quantization points",
        f"{s.integer_weight_elements} of {total} weight elements stored as integers ({100 * s.integer_share:.2f}%); "
        f"constants: integer weights {_size(s.integer_weight_bytes)}, float {_size(s.float_bytes)}, "
        f"scales and zero points {_size(s.qparam_bytes)}, other {_size(s.other_bytes)}",
    ]
    if s.layers:
        header = ("layer", "op", "weight", "dtype", "bits", "scheme", "granularity", "scale min", "scale max", "in", "out")
        rows = [header, *(_layer_row(layer) for layer in s.layers)]
        lines += ["", format_table(rows)]
    if s.activations:
        header = ("activation", "dtype", "scheme", "granularity", "scale min", "scale max", "zero point")
        rows = [header, *(_activation_row(point) for point in s.activations)]
        lines += ["", format_table(rows)]
        if not all(point.named for point in s.activations):
            lines.append("(activations named by node were added by the export after grid-preserving operators)")
    return "\n".join(lines)


def _layer_row(layer: LayerSummary) -> tuple[str, ...]:
    return (
        layer.module or layer.node,
        layer.op_type,
        "x".join(map(str, layer.weight_shape)) or "-",
        layer.dtype,
        "-" if layer.bits is None else str(layer.bits),
        layer.scheme or "-",
        _granularity(layer.granularity, layer.axis, layer.channels),
        _number(layer.scale_min),
        _number(layer.scale_max),
        layer.input_dtype or "float",
        layer.output_dtype or "float",
    )


def _activation_row(point: ActivationPoint) -> tuple[str, ...]:
    zero_point = str(point.zero_point_min)
    if point.zero_point_max != point.zero_point_min:
        zero_point += f"..{point.zero_point_max}"
    return (
        point.label,
        point.dtype,
        point.scheme,
        _granularity(point.granularity, point.axis, 0),
        _number(point.scale_min),
        _number(point.scale_max),
        zero_point,
    )


def _format_calibration(s: CalibrationSummary) -> str:
    parameters = sum(t.kind == "parameter" for t in s.targets)
    lines = [
        f"{s.path or '<in memory>'}: calibration config" + (f", {_size(s.file_bytes)}" if s.file_bytes else ""),
        f"{len(s.modules)} modules, {len(s.targets)} targets ({parameters} parameters, "
        f"{len(s.targets) - parameters} activations)",
    ]
    if s.targets:
        header = ("module", "target", "dtype", "scheme", "granularity", "scale min", "scale max", "zero point", "tracked range")
        rows = [header, *(_calibration_row(target) for target in s.targets)]
        lines += ["", format_table(rows)]
    return "\n".join(lines)


def _calibration_row(t: CalibrationTarget) -> tuple[str, ...]:
    if t.granularity == "per-channel":
        granularity = f"per-channel (axis {t.axis}, {t.channels})"
    elif t.granularity == "per-block":
        granularity = f"per-block {'x'.join(map(str, t.shape))}"
    else:
        granularity = "per-tensor"
    zero_point = f"{t.zero_point_min:g}" + (f"..{t.zero_point_max:g}" if t.zero_point_max != t.zero_point_min else "")
    tracked = "-" if t.tracked_min is None or t.tracked_max is None else f"{t.tracked_min:.4g} .. {t.tracked_max:.4g}"
    return (
        t.module,
        t.target,
        t.dtype or ("-" if t.bits is None else f"{t.bits} bits"),
        t.scheme or "-",
        granularity,
        _number(t.scale_min),
        _number(t.scale_max),
        zero_point,
        tracked,
    )
