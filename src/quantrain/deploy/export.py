"""Export a quantized model to ONNX in QDQ form, ready for ONNX Runtime's integer kernels.

Each fake quantizer becomes what ONNX can express: activations a QuantizeLinear/DequantizeLinear pair, weights an
int8 (or uint8) initializer with DequantizeLinear (per tensor, or per channel with ``axis``). Folded BatchNorms are
exported folded (one Conv/Gemm with the folded weight and bias). After export, quantization is propagated through
operators that keep values on the grid (MaxPool, Flatten, Reshape, ...) so that the next Conv/Gemm sees a
DequantizeLinear input and ORT can fuse it into an integer kernel.

>>> import torch, tempfile, os
>>> from torch import nn
>>> from quantrain import QATQuantizer
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> _ = QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"],
...                           "quant_dtype": "uint8", "quant_scheme": "affine",
...                           "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric"}}}])
>>> _ = model(torch.randn(16, 4))
>>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
>>> report = export_onnx(model, torch.randn(2, 4), path)
>>> report.notes
[]
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from quantrain.deploy.islands import FloatIsland, float_islands, optimized_graph
from quantrain.deploy.qdq import ExportActivation, ExportWeight
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import example_arguments, output_tensors
from quantrain.wrapping.op_points import OpPoint
from quantrain.wrapping.quantized_module import is_quantized

__all__ = ["ExportReport", "export_onnx"]

PROPAGATE_THROUGH = frozenset(
    {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Identity", "Relu"}
)
"""Operators whose outputs stay on their input's quantization grid (ReLU too: real zero is always on the grid);
Gather, Slice and Split select from their first input (a transformer's ``hidden[:, 0]`` before its classifier,
ShuffleNet's ``x.chunk(2, dim=1)``)."""
REQUANTIZE_AFTER = frozenset({"AveragePool", "GlobalAveragePool"})
"""Operators whose outputs leave the grid; quantized again with their input's parameters (not trained)."""
WEIGHT_DTYPES = ("auto", "int8", "uint8")
EXPORTERS = ("torch.export", "torchscript")
DEFAULT_OPSETS = {"torch.export": 18, "torchscript": 17}


@dataclass
class ExportReport:
    """What was written, and each way the ONNX model differs from the trained fake-quant model."""

    path: str
    quantized_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weight_dtype: str = "int8"
    """How signed weights are stored: ``'int8'``, or ``'uint8'`` (the same values shifted by 128, see export_onnx)."""
    float_islands: list[FloatIsland] = field(default_factory=list)
    """The runs of operators ONNX Runtime will compute in float between quantized tensors, each also in ``notes``
    with its reason (see :mod:`quantrain.deploy.islands`)."""


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    weight_dtype: str = "auto",
    exporter: str = "torch.export",
) -> ExportReport:
    """Write ``model`` (quantized by quantrain, calibrated) to ``path`` as a QDQ ONNX model; returns a report.

    ``example_inputs``: a tensor, a tuple of tensors (the forward's positional inputs) or a dict of tensors (its
    keyword inputs, e.g. a Hugging Face batch; the ONNX inputs are then named after the keys), used to trace the
    model. The batch dimension is dynamic unless ``dynamic_batch=False``. Raises ``ValueError`` naming the target
    when something has no scale.

    ``weight_dtype``: how signed weights are stored. ``"int8"`` (what ONNX Runtime's own quantizer writes) is
    fastest on CPUs with VNNI and on ARM; ``"uint8"`` stores the same values as ``q + 128`` with zero point
    ``z + 128``, which ONNX Runtime also computes exactly on x86 CPUs without VNNI, where its int8-weight kernels
    saturate (see :func:`quantrain.deploy.runtime.u8s8_saturates`), at some cost in speed. ``"auto"`` (the
    default) picks ``"uint8"`` where this machine's ONNX Runtime saturates and some weight uses more than 7 bits,
    ``"int8"`` otherwise, so the file computes what was trained on the machine that exports it;
    ``report.weight_dtype`` says which.

    ``exporter``: ``"torch.export"`` (the default) captures the model with ``torch.export`` and translates it
    with ``torch.onnx.export(dynamo=True)`` (needs the ``onnxscript`` package, in the ``onnx`` extra; opset 18 or
    later), the path PyTorch maintains; ``"torchscript"`` uses the TorchScript-based exporter that PyTorch
    deprecated in 2.9, kept as a fallback for a forward that ``torch.export`` cannot capture (and about ten times
    faster to export on small models). Both write the same quantization points with the same names
    (``/<module>/<Op>`` for the model's nodes, ``<module>.<target>/quantize`` for the activation points), and
    parity holds for either. ``opset``: 18 by default for ``"torch.export"``, 17 for ``"torchscript"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if opset is None:
        opset = DEFAULT_OPSETS[exporter]
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    if exporter == "torch.export":
        if opset < 18:
            raise ValueError(f"opset: the torch.export-based exporter writes opset 18 or later, got {opset}")
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ImportError("exporter='torch.export' needs onnxscript: pip install onnxscript") from None
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, dict)):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of tensors")
    args, keywords = example_arguments(example_inputs)
    inputs = (*args, *keywords.values())
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of tensors")
    quantized = {name: m for name, m in model.named_modules() if is_quantized(m) or isinstance(m, OpPoint)}
    if not quantized:
        raise ValueError(
            f"{type(model).__name__} has no quantrain quantizers: quantize it with QATQuantizer or "
            "PtqQuantizer, then train or calibrate it, before exporting"
        )
    report = ExportReport(str(path), quantized_layers=list(quantized))
    export_model = copy.deepcopy(model).eval()
    for module in (m for m in export_model.modules() if is_quantized(m) or isinstance(m, OpPoint)):
        for target, fq in list(module.fake_quant.items()):
            module.fake_quant[target] = _export_module(fq, report)
    fold_remaining_batchnorms(export_model, report, example_inputs)
    traced = _Flat(export_model, len(args), list(keywords))
    with torch.no_grad():
        outputs = traced(*inputs)  # records each weight's integers
    count = len(outputs)
    calls: list[str] = []
    for point in export_model.modules():
        if isinstance(point, ExportActivation):
            point.calls = calls
    names = input_names or [*(f"input_{i}" for i in range(len(args))), *keywords]
    out_names = output_names or [f"output_{i}" for i in range(count)]
    axes = {name: {0: "batch"} for name in [*names, *out_names]} if dynamic_batch else None
    calls.clear()  # the export's own trace calls each point once, in graph order
    if exporter == "torch.export":
        graph_model = _export_with_torch_export(traced, inputs, opset, names, out_names, dynamic_batch)
    else:
        graph_model = _export_with_torchscript(traced, inputs, path, opset, names, out_names, axes)
    strip_root_prefix(graph_model.graph, "model")
    name_quantization_points(graph_model.graph, calls)
    fold_constants(graph_model)
    global_average_pools(graph_model.graph, graph_model.opset_import)
    fold_zero_pads(graph_model.graph)
    drop_idle_relus(graph_model.graph)
    prune_unused(graph_model.graph)
    for node in propagate_quantization(graph_model.graph):
        if node.op_type in REQUANTIZE_AFTER:
            report.notes.append(
                f"{node.name or node.op_type}: its averages are quantized again with its input's scale "
                "(training left them in float), so ONNX Runtime can keep integer kernels after it"
            )
    if weight_dtype == "auto":
        from quantrain.deploy.runtime import u8s8_saturates

        weight_dtype = "uint8" if wide_int8_weights(graph_model.graph) and u8s8_saturates() else "int8"
    if weight_dtype == "uint8" and store_weights_unsigned(graph_model.graph):
        prune_unused(graph_model.graph)
    report.weight_dtype = weight_dtype
    unique_node_names(graph_model.graph)  # e.g. the pairs inserted after two calls of one reused operator
    # the exporter's shapes of intermediate tensors predate the rewrites above; ONNX Runtime infers them again
    del graph_model.graph.value_info[:]
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    try:
        optimized = optimized_graph(str(path))
    except ImportError:
        report.notes.append("float islands not checked: onnxruntime is not installed")
    else:
        report.float_islands = float_islands(optimized)
        report.notes.extend(island.note for island in report.float_islands)
    return report


def _export_with_torchscript(traced, inputs, path, opset, names, out_names, axes) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=out_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load(str(path))


def _export_with_torch_export(traced, inputs, opset, names, out_names, dynamic_batch) -> onnx.ModelProto:
    import logging

    from quantrain.deploy.qdq import ONNX_TRANSLATIONS

    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim.AUTO
        shapes = (tuple({0: batch} if x.dim() > 0 else {} for x in inputs),)  # _Flat.forward(*inputs)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                traced,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=out_names,
                dynamic_shapes=shapes,
                custom_translation_table=ONNX_TRANSLATIONS,
                external_data=False,
            )
    finally:
        quiet.setLevel(level)
    model = program.model_proto
    name_from_scopes(model.graph)
    drop_export_metadata(model)
    drop_default_axes(model.graph)
    return model


def global_average_pools(graph: onnx.GraphProto, opsets=()) -> int:
    """Write each ``ReduceMean`` over all spatial dims as ``GlobalAveragePool``, which ONNX Runtime runs in integer
    (QLinearGlobalAveragePool) where ``ReduceMean`` has no integer kernel. ``keepdims=1`` (how the torch.export-based
    exporter writes ``adaptive_avg_pool2d(x, 1)``) is the pool itself; ``keepdims=0`` (``x.mean([2, 3])``, the global
    pool of torchvision's ShuffleNet) is the pool, then a ``Squeeze`` of the spatial axes, with the mean's own
    quantization (the QuantizeLinear that alone reads it) repeated between the two, so the pool reads and writes
    integers and the Squeeze moves them. The axes may be an input (opset 18) or an attribute (opset 17, the
    TorchScript-based exporter). ``opsets``: the model's opset imports, for shape inference where the graph records
    no shapes. Returns how many it rewrote."""
    constants = graph_constants(graph)
    ranks = _ranks(graph, opsets)
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for position, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(position)
    before: dict[int, list[onnx.NodeProto]] = {}  # a node's position -> the nodes to insert before it
    after: dict[int, list[onnx.NodeProto]] = {}
    rewritten = 0
    for position, node in enumerate(nodes):
        if node.op_type != "ReduceMean":
            continue
        attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        if len(node.input) >= 2 and node.input[1]:
            if node.input[1] not in constants:
                continue
            axes = [int(axis) for axis in constants[node.input[1]].flatten()]
        else:
            axes = list(attributes.get("axes", ()))
        rank = ranks.get(node.input[0], 0)
        if rank < 3 or len(axes) != rank - 2 or {axis % rank for axis in axes} != set(range(2, rank)):
            continue
        base = node.name.rpartition("/")[0]
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        node.name = f"{base}/GlobalAveragePool"
        rewritten += 1
        if attributes.get("keepdims", 1):
            continue
        mean = node.output[0]
        pooled = node.output[0] = f"{mean}_pooled"
        spatial = f"{mean}_spatial_axes"
        graph.initializer.append(numpy_helper.from_array(np.arange(2, rank, dtype=np.int64), spatial))
        readers = consumers.get(mean, [])
        quantize = nodes[readers[0]] if len(readers) == 1 and nodes[readers[0]].op_type == "QuantizeLinear" else None
        if quantize is None or any(attr.name == "axis" for attr in quantize.attribute):
            after[position] = [helper.make_node("Squeeze", [pooled, spatial], [mean], name=f"{base}/Squeeze")]
            continue
        params = list(quantize.input[1:])  # placed before the mean's QuantizeLinear, which reads them
        before[readers[0]] = [
            helper.make_node("QuantizeLinear", [pooled, *params], [f"{pooled}_q"], name=f"{base}/GlobalAveragePool_q"),
            helper.make_node("DequantizeLinear", [f"{pooled}_q", *params], [f"{pooled}_dq"], name=f"{base}/GlobalAveragePool_dq"),
            helper.make_node("Squeeze", [f"{pooled}_dq", spatial], [mean], name=f"{base}/Squeeze"),
        ]
    if before or after:
        ordered = [new for at, node in enumerate(nodes) for new in (*before.get(at, ()), node, *after.get(at, ()))]
        del graph.node[:]
        graph.node.extend(ordered)
    return rewritten


def _ranks(graph: onnx.GraphProto, opsets) -> dict[str, int]:
    """The rank of each tensor whose shape the graph records, or ONNX's shape inference finds where it records none
    for a ReduceMean's input."""

    def ranks(values) -> dict[str, int]:
        return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}

    known = ranks([*graph.value_info, *graph.input])
    if all(node.input[0] in known for node in graph.node if node.op_type == "ReduceMean"):
        return known
    opsets = list(opsets) or [helper.make_opsetid("", 17)]
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets))
    return {**ranks(inferred.graph.value_info), **known}


def drop_default_axes(graph: onnx.GraphProto) -> None:
    """Remove ``axis`` from QuantizeLinear/DequantizeLinear nodes whose scale is one number (the torch.export-based
    exporter writes the default ``axis=1`` on every node), so that per-tensor and per-axis nodes read as they do
    from the TorchScript-based exporter."""
    scalars = {init.name for init in graph.initializer if len(init.dims) == 0}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in scalars:
            kept = [attr for attr in node.attribute if attr.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)


def name_from_scopes(graph: onnx.GraphProto) -> None:
    """Name each node as the TorchScript-based exporter does, ``/<module>/<submodule>/<Op>`` (module names in full),
    from the module path the torch.export-based exporter records in the node's ``namespace`` metadata
    (``<class>/<module>: <class>/.../<op>: <aten op>``); duplicates are made unique later."""
    for node in graph.node:
        namespace = next((prop.value for prop in node.metadata_props if prop.key == "namespace"), None)
        if namespace is None:
            continue
        scopes = [part.split(":")[0].strip() for part in namespace.split("/")[1:-1]]
        # a fake quantizer's scope, e.g. model.0.fake_quant.weight, is named by its target, as TorchScript names it
        scopes = [scope.rpartition("fake_quant.")[2] if "fake_quant." in scope else scope for scope in scopes]
        node.name = "/" + "/".join([*scopes, node.op_type])


def drop_export_metadata(model: onnx.ModelProto) -> None:
    """Remove what the torch.export-based exporter records on each node and function for debugging (module classes,
    FX nodes, the Python stack trace with this machine's file paths): it would be most of a small model's file."""
    for graph in (model.graph, *(function for function in model.functions)):
        for node in graph.node:
            del node.metadata_props[:]


class _Flat(nn.Module):
    """What the exporter traces: the model called with positional tensors (the keyword ones after them, by name),
    returning the tensors of its output in order (tuples, dicts, Hugging Face outputs), as check_parity reads them."""

    def __init__(self, model: nn.Module, positional: int, keywords: list[str]) -> None:
        super().__init__()
        self.model, self.positional, self.keywords = model, positional, keywords

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, rest = inputs[: self.positional], inputs[self.positional :]
        return tuple(output_tensors(self.model(*args, **dict(zip(self.keywords, rest, strict=True)))))


def strip_root_prefix(graph: onnx.GraphProto, attribute: str) -> None:
    """Name nodes and values as the user's model names them: without the scope that :class:`_Flat`, holding the
    model as ``model``, adds to every name. The exporter names a scope by each module's full name, so
    ``/model/model.0/model.0.1/Relu`` becomes ``/0/0.1/Relu`` and the parameter ``model.0.bias`` becomes ``0.bias``."""
    root, dotted = f"/{attribute}/", f"{attribute}."

    def stripped(name: str) -> str | None:
        if name.startswith(root):
            head, _, op = name[len(root) :].rpartition("/")
            scopes = [scope[len(dotted) :] if scope.startswith(dotted) else scope for scope in head.split("/") if head]
            return "/" + "/".join([*scopes, op])
        return name[len(dotted) :] if name.startswith(dotted) else None

    for node in graph.node:
        node.name = stripped(node.name) or node.name
    renamed = {}
    for values in (graph.initializer, graph.value_info):
        for value in values:
            new = stripped(value.name)
            if new is not None:
                renamed[value.name] = value.name = new
    for node in graph.node:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                if name not in renamed and name.startswith(root):
                    renamed[name] = stripped(name)
                names[index] = renamed.get(name, name)
    for value in graph.input:
        value.name = renamed.get(value.name, value.name)


def fold_remaining_batchnorms(model: nn.Module, report: ExportReport, example_inputs: tuple = ()) -> None:
    """Fold each BatchNorm that directly follows a quantized Conv/Linear but was not folded during training.

    The folded weight ``w * s`` gets the per-channel scale ``scale * |s|``, so its integers are exactly the trained
    ones (sign flipped where ``s < 0``); the bias becomes ``beta + (b - running_mean) * s``. A quantized output of the
    conv (taken before BatchNorm) has no counterpart after folding and is dropped. Warns naming the layers.
    The model's graph is captured from ``example_inputs`` (see :mod:`quantrain.graph`) only when some quantized
    Conv/Linear is not folded and the model has a BatchNorm.
    """
    from quantrain.config.fusion import FOLDABLE, NORMS
    from quantrain.graph import CallKind, CaptureError, capture
    from quantrain.wrapping.fusion import fold_factor, fold_parameters

    modules = dict(model.named_modules())
    unfolded = [m for m in modules.values() if is_quantized(m) and isinstance(m, FOLDABLE) and "fusion" not in m._modules]
    if not unfolded or not any(isinstance(m, NORMS) for m in modules.values()):
        return
    try:
        graph = capture(model, example_inputs, units=frozenset(name for name, m in modules.items() if is_quantized(m)))
    except CaptureError as exc:  # the export computes the same without this: BatchNorms then stay separate operators
        report.notes.append(f"BatchNorms after unfolded layers were left as they are: {exc}")
        return
    folded = []
    for node in graph.calls:
        conv = modules.get(node.target) if node.kind is CallKind.MODULE else None
        users = node.users
        if not (is_quantized(conv) and isinstance(conv, FOLDABLE) and "fusion" not in conv._modules and len(users) == 1):
            continue
        if len(graph.module_calls(node.target)) != 1:
            continue
        bn_name = users[0].target if users[0].kind is CallKind.MODULE else ""
        bn = modules.get(bn_name)
        weight_fq = conv.fake_quant["weight"] if "weight" in conv.fake_quant else None  # noqa: SIM401 (ModuleDict)
        if not isinstance(bn, NORMS) or bn.running_var is None or not isinstance(weight_fq, ExportWeight):
            continue
        if weight_fq.settings.scheme.value != "symmetric":
            report.notes.append(
                f"{node.target}: BatchNorm {bn_name!r} was not folded during training and cannot be folded "
                "exactly into affine weights; it stays a separate float operator"
            )
            continue
        with torch.no_grad():
            factor = fold_factor(bn)
            weight, bias = fold_parameters(conv.weight, conv.bias, bn)
            conv.weight.copy_(weight)
            conv.bias = nn.Parameter(bias)
            weight_fq.scale = (weight_fq.scale * factor.abs()).flatten().float()
            weight_fq.zero_point = torch.zeros(weight_fq.scale.shape, dtype=weight_fq.zero_point.dtype)
            weight_fq.axis = 0
        if "_output_0" in conv.fake_quant:
            conv.fake_quant["_output_0"] = nn.Identity()
            report.notes.append(
                f"{node.target}._output_0 quantized the output before BatchNorm {bn_name!r}; that point "
                "does not exist once the BatchNorm is folded, and is dropped"
            )
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        folded.append(f"{node.target} + {bn_name}")
    if folded:
        message = f"folded at export (not during training; fold during QAT with fuse='auto' or fuse_names): {folded}"
        warnings.warn(message, stacklevel=3)
        report.notes.append(message)


def _export_module(fq: FakeQuantizer, report: ExportReport) -> nn.Module:

    dtype = fq.settings.dtype
    if fq.activation:
        if dtype.bits < 8:
            report.notes.append(
                f"{fq.label}: {dtype.name} is exported in {'int8' if dtype.signed else 'uint8'}; values "
                f"beyond the trained range saturate at the container's limits, not at [{dtype.qmin}, {dtype.qmax}]"
            )
        elif dtype.signed:
            report.notes.append(
                f"{fq.label}: int8 [-127, 127] is exported as ONNX int8 [-128, 127]; values below the "
                "trained range can reach -128"
            )
        return ExportActivation(fq)
    if not dtype.signed and not fq.label.endswith("._param_0"):  # a product's parameter: QLinearMul takes uint8
        report.notes.append(f"{fq.label}: unsigned weights are not fused into integer kernels by ONNX Runtime")
    elif fq.settings.scheme.value == "affine" and fq.scale.numel() > 1:
        report.notes.append(
            f"{fq.label}: per-channel weights with non-zero zero points are not fused into integer kernels "
            "by ONNX Runtime; use quant_scheme 'symmetric' for weights"
        )
    return ExportWeight(fq)


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace float operators whose inputs are all constants (e.g. the folded-BatchNorm bias arithmetic) by
    initializers holding their results; returns how many were folded. Q/DQ nodes are kept, and so is a node that
    onnx's reference evaluator cannot compute (its GatherElements takes at most 64 entries along the axis, for one):
    ONNX Runtime folds what is left when it loads the file."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kept, folded = [], 0
    for node in graph.node:
        if _constant_value(node) is not None:
            constants[node.output[0]] = _constant_value(node)
        foldable = node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")
        if foldable and node.input and all(name in constants or name == "" for name in node.input):
            inputs = [
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(constants[name].dtype), None)
                for name in node.input
                if name
            ]
            outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in node.output]
            single = helper.make_model(helper.make_graph([node], "fold", inputs, outputs), opset_imports=model.opset_import)
            try:
                results = ReferenceEvaluator(single).run(None, {name: constants[name] for name in node.input if name})
            except Exception:  # an operator onnx's evaluator cannot run at this size: ONNX Runtime folds it at load
                kept.append(node)
                continue
            for name, value in zip(node.output, results, strict=True):
                constants[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
            folded += 1
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node holding a tensor (``None`` for any other node)."""
    if node.op_type == "Constant" and len(node.output) == 1 and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant value of ``graph`` by name: its initializers and the tensors of its ``Constant`` nodes."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants.update((node.output[0], value) for node in graph.node if (value := _constant_value(node)) is not None)
    return constants


def wide_int8_weights(graph: onnx.GraphProto) -> list[str]:
    """The int8 weight DequantizeLinear nodes whose values go beyond [-64, 63], by node name: the layers whose
    products can saturate in ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI."""
    constants = graph_constants(graph)
    wide = []
    for node in graph.node:
        q = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is not None and q.dtype == np.int8 and q.size and (q.min() < -64 or q.max() > 63):
            wide.append(node.name or node.input[0])
    return wide


def store_weights_unsigned(graph: onnx.GraphProto) -> int:
    """Rewrite each int8 weight ``DequantizeLinear(q, scale, z)`` as ``DequantizeLinear(q + 128, scale, z + 128)`` in
    uint8: the same values (``(q + 128) - (z + 128) = q - z``), which ONNX Runtime's uint8 x uint8 kernels compute
    without the 16-bit saturation of its uint8 x int8 ones on x86 CPUs lacking VNNI. Returns how many it rewrote."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants.update((node.output[0], _constant_value(node)) for node in graph.node if _constant_value(node) is not None)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        q, zero_point = constants.get(node.input[0]), constants.get(node.input[2])
        if q is None or zero_point is None or q.dtype != np.int8 or zero_point.dtype != np.int8:
            continue
        for index, value in ((0, q), (2, zero_point)):
            name = f"{node.input[index]}_uint8"
            if name not in constants:
                shifted = (value.astype(np.int16) + 128).astype(np.uint8)
                graph.initializer.append(numpy_helper.from_array(shifted, name))
                constants[name] = shifted
            node.input[index] = name
        rewritten += 1
    return rewritten


def prune_unused(graph: onnx.GraphProto) -> int:
    """Remove initializers and ``Constant`` nodes that no node or graph output reads (e.g. the float weights and
    BatchNorm parameters that :func:`fold_constants` replaced); returns how many were removed."""
    removed = 0
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        unused = [init for init in graph.initializer if init.name not in read]
        idle = [n for n in graph.node if n.op_type == "Constant" and not any(out in read for out in n.output)]
        if not unused and not idle:
            return removed
        stale = {init.name for init in unused}
        for init in unused:
            graph.initializer.remove(init)
        for value in [v for v in graph.input if v.name in stale]:  # initializers listed as inputs (old IR)
            graph.input.remove(value)

        for node in idle:
            graph.node.remove(node)
        removed += len(unused) + len(idle)


def name_quantization_points(graph: onnx.GraphProto, labels: list[str]) -> bool:
    """Name the k-th QuantizeLinear/DequantizeLinear pair on activations after the k-th label (``module.target``):
    ``<label>/quantize`` and ``<label>/dequantize``, and for a point the forward calls again (a module reused, such
    as torchvision's ``BasicBlock.relu``), ``<label>#<n>/quantize`` at its n-th repeated call (n = 1, 2, ...), so
    names stay unique. Returns whether the counts matched (otherwise nothing is renamed)."""
    pairs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    if len(pairs) != len(labels):
        return False
    consumers = {name: node for node in graph.node if node.op_type == "DequantizeLinear" for name in node.input[:1]}
    seen: dict[str, int] = {}
    for quantize, label in zip(pairs, labels, strict=True):
        repeat = seen[label] = seen.get(label, -1) + 1
        point = label if repeat == 0 else f"{label}#{repeat}"
        quantize.name = f"{point}/quantize"
        dequantize = consumers.get(quantize.output[0])
        if dequantize is not None:
            dequantize.name = f"{point}/dequantize"
    return True


def unique_node_names(graph: onnx.GraphProto) -> int:
    """Rename each node whose (non-empty) name an earlier node already has, to ``<name>_<n>`` with the smallest
    ``n >= 1`` not taken; ONNX Runtime refuses a model with two nodes of one name. Returns how many it renamed."""
    taken = {node.name for node in graph.node}
    seen: set[str] = set()
    renamed = 0
    for node in graph.node:
        if node.name and node.name in seen:
            n = 1
            while f"{node.name}_{n}" in taken:
                n += 1
            node.name = f"{node.name}_{n}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


def drop_idle_relus(graph: onnx.GraphProto) -> int:
    """Remove each Relu or Clip (with constant bounds) that leaves every value its DequantizeLinear input can produce
    unchanged: those values are ``(q - zp) * scale`` for ``q`` in the integer type's range, so a Relu is idle when
    the zero point is the type's minimum (no value is negative), and a Clip when ``[lo, hi]`` holds the whole range
    (e.g. a model's own ReLU6 after a uint8 output with zero point 0 and ``255 * scale <= 6``). Returns how many
    were removed."""
    constants = graph_constants(graph)
    producers = {output: node for node in graph.node for output in node.output}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        source = producers.get(renamed.get(node.input[0], node.input[0])) if node.input else None
        if node.op_type in ("Relu", "Clip") and source is not None and source.op_type == "DequantizeLinear":
            bounds = (0.0, np.inf) if node.op_type == "Relu" else _clip_bounds(node, constants)
            if bounds is not None and _dequantized_within(source, constants, *bounds):
                renamed[node.output[0]] = renamed.get(node.input[0], node.input[0])
                continue
        kept.append(node)
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    outputs = {output.name for output in graph.output}
    for relu_output, replacement in renamed.items():
        if relu_output in outputs:  # a graph output keeps its name: restore it with an Identity
            kept.append(helper.make_node("Identity", [replacement], [relu_output]))
    del graph.node[:]
    graph.node.extend(kept)
    return len(renamed)


def _clip_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """A Clip's ``(min, max)`` inputs (absent: unbounded); ``None`` when one is computed, not a constant."""
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        name = node.input[index] if len(node.input) > index else ""
        if name and name not in constants:
            return None
        bounds.append(float(constants[name]) if name else default)
    return bounds[0], bounds[1]


def _dequantized_within(node: onnx.NodeProto, constants: dict[str, np.ndarray], low: float, high: float) -> bool:
    """Whether every value DequantizeLinear ``node`` can produce, ``(q - zp) * scale`` in float32 for ``q`` in its
    integer type's range, lies in ``[low, high]``."""
    if len(node.input) < 3 or node.input[1] not in constants or node.input[2] not in constants:
        return False
    scale, zero_point = constants[node.input[1]].astype(np.float32), constants[node.input[2]]
    info = np.iinfo(zero_point.dtype)
    smallest, largest = ((np.int64(q) - zero_point.astype(np.int64)).astype(np.float32) * scale for q in (info.min, info.max))
    return bool(np.all(smallest >= low) and np.all(largest <= high))


def fold_zero_pads(graph: onnx.GraphProto) -> int:
    """Fold each Pad that adds zeros around the spatial dims of a 4-D (or 3-D, 5-D) tensor read only by a Conv into
    that Conv's ``pads`` (``nn.ZeroPad2d`` before a convolution, as Hugging Face's EfficientNet and MobileNet pad):
    exact, since a convolution pads with real zero, which integer kernels write as the input's zero point. ONNX
    Runtime would otherwise run the Pad in float and the convolution after it too. Returns how many it folded."""
    constants = graph_constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in constants or not _pads_with_zeros(pad, constants):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # padding chosen axes only (opset 18's axes input)
        readers = consumers.get(pad.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Conv" or readers[0].input[0] != pad.output[0] or pad.output[0] in outputs:
            continue
        conv = readers[0]
        pads = [int(v) for v in constants[pad.input[1]].flatten()]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        auto_pad = next((attr.s for attr in conv.attribute if attr.name == "auto_pad"), b"NOTSET")
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0 or auto_pad not in (b"NOTSET", b"VALID"):
            continue  # VALID: no padding of its own (Hugging Face pads explicitly, then convolves with padding="valid")
        spatial = rank - 2
        current = next((list(attr.ints) for attr in conv.attribute if attr.name == "pads"), [0] * (2 * spatial))
        merged = [c + p for c, p in zip(current, [*begin[2:], *end[2:]], strict=True)]
        kept = [attr for attr in conv.attribute if attr.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("pads", merged)])
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    return len(folded)


def _pads_with_zeros(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Whether a Pad adds zeros (constant mode, no value or 0): real zero is on every quantization grid."""
    mode = next((attr.s for attr in node.attribute if attr.name == "mode"), b"constant")
    if mode != b"constant":
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = constants.get(node.input[2])
    return value is not None and not value.any()


def propagate_quantization(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """After each grid-preserving operator fed by a per-tensor DequantizeLinear, insert the same Q/DQ pair (exact:
    those operators only move or select values already on the grid); after an averaging operator too (not exact).
    Returns the operators after which a pair was inserted."""
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    constants = graph_constants(graph) if any(node.op_type == "Pad" for node in graph.node) else {}
    inserted: list[onnx.NodeProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        source = producers.get(node.input[0]) if node.input else None
        if (
            node.op_type not in PROPAGATE_THROUGH | REQUANTIZE_AFTER | {"Pad"}
            or source is None
            or source.op_type != "DequantizeLinear"
        ):
            continue
        if node.op_type == "Pad" and not _pads_with_zeros(node, constants):
            continue
        if any(attr.name == "axis" for attr in source.attribute):
            continue  # per-channel: the layout may change
        scale, zero_point = source.input[1], source.input[2]
        base = node.name or node.output[0]  # unique_node_names settles any clash left
        pairs = 0
        for index, original in enumerate(node.output):  # a Split has one output per part
            if not original or (consumers.get(original) and all(op == "QuantizeLinear" for op in consumers[original])):
                continue  # unused, or already quantized by the model
            suffix = f"_{index}" if len(node.output) > 1 else ""
            quantized = f"{original}_quantized"
            node.output[index] = f"{original}_float"
            nodes.append(
                helper.make_node("QuantizeLinear", [node.output[index], scale, zero_point], [quantized], name=f"{base}_q{suffix}")
            )
            nodes.append(
                helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [original], name=f"{base}_dq{suffix}")
            )
            producers[original] = nodes[-1]
            pairs += 1
        if pairs:
            inserted.append(node)

    del graph.node[:]
    graph.node.extend(nodes)
    return inserted
