"""Float islands: the parts of an exported QDQ graph that ONNX Runtime will run in float between integer ones.

ONNX Runtime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into the op's integer kernel (QLinearConv, QGemm,
QLinearAdd, ...). An operator that reads dequantized values but whose output is not quantized again (or that reads a
float value) stays a float operator, and so does everything after it up to the next QuantizeLinear. Such a run of
float operators, entered from a quantized tensor and left into one, is a float island: the integer model pays a
dequantize and a quantize around it, and the operators in it run at float speed.

:func:`float_islands` finds them in the graph ONNX Runtime actually runs (:func:`optimized_graph`); export_onnx
names each in ``report.notes`` with its reason: the operator has no integer kernel in ONNX Runtime
(LayerNormalization, Erf, Pow, ...), or it has one but an input or output around it is not quantized (quantize it
with an op-level entry, see the config_list reference).

>>> from onnx import TensorProto, helper
>>> def tensor(name): return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])
>>> nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["a"], name="in/dequantize"),
...          helper.make_node("Erf", ["a"], ["b"], name="/act/Erf"),
...          helper.make_node("QuantizeLinear", ["b", "s", "z"], ["c"], name="out/quantize")]
>>> graph = helper.make_graph(nodes, "g", [tensor("q")], [tensor("c")])  # as ONNX Runtime would leave it
>>> [(island.nodes, island.reason) for island in float_islands(graph)]
[(('/act/Erf',), 'no integer kernel in ONNX Runtime for Erf')]
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

__all__ = ["INTEGER_KERNELS", "FloatIsland", "float_islands", "optimized_graph"]

INTEGER_KERNELS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "Sigmoid",
        "LeakyRelu",
        "Softmax",
        "Relu",
        "Clip",
        "MaxPool",
        "Resize",
        "Split",
        "Where",
    }
)
"""Operators for which ONNX Runtime's CPU provider has an integer kernel or a QDQ fusion (QLinear*, QGemm,
MatMulInteger, or the int8 versions of the data-movement operators). Not HardSigmoid, HardSwish (which it splits
into HardSigmoid and Mul), Gelu, Tanh or ReduceMean: ONNX Runtime 1.32 leaves ``DequantizeLinear -> op ->
QuantizeLinear`` around them in float (tests/deploy/test_islands.py checks each)."""

DATA_MOVEMENT = frozenset(
    {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather", "Expand", "Split"}
)
"""Operators that only move values: they run on integers wherever their input is, so they never make an island."""

NOT_COMPUTE = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant"})


@dataclass(frozen=True)
class FloatIsland:
    """A connected run of float operators between quantized tensors."""

    nodes: tuple[str, ...]
    """Node names (or op types where a node has no name), in graph order."""
    op_types: tuple[str, ...]
    """The distinct op types in the island, in order of first appearance."""
    reason: str
    """Why it stays float, as export's note says it."""

    @property
    def note(self) -> str:
        shown = ", ".join(self.nodes[:3]) + (f" and {len(self.nodes) - 3} more" if len(self.nodes) > 3 else "")
        return f"float island ({len(self.nodes)} op{'s' * (len(self.nodes) != 1)}: {shown}): {self.reason}"


def float_islands(graph: onnx.GraphProto) -> list[FloatIsland]:
    """The float islands of ``graph``, a QDQ graph as ONNX Runtime optimized it (see :func:`optimized_graph`):
    maximal connected runs of float operators that read a dequantized value (or the float output of an integer
    kernel) and lead into a QuantizeLinear. Operators before the first or after the last quantization are not
    islands: the model starts and ends in float."""
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    integers = _integer_values(graph)
    constants = {init.name for init in graph.initializer if init.data_type in FLOATS}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] not in integers}

    def compute(node: onnx.NodeProto) -> bool:
        """A float operator: not Q/DQ/Constant, not an integer kernel, and producing a float value."""
        return node.op_type not in NOT_COMPUTE and not _is_kernel(node) and not set(node.output) <= integers

    floating = [n for n in graph.node if compute(n)]
    float_ids = {id(n) for n in floating}
    parent = {id(n): id(n) for n in floating}

    def root(key: int) -> int:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for node in floating:
        for name in node.input:
            source = producers.get(name)
            if source is not None and id(source) in float_ids:
                parent[root(id(node))] = root(id(source))
    groups: dict[int, list[onnx.NodeProto]] = {}
    for node in floating:
        groups.setdefault(root(id(node)), []).append(node)
    islands = []
    for members in groups.values():
        sources = [producers.get(name) for n in members for name in n.input]
        enters = any(s is not None and (s.op_type == "DequantizeLinear" or _is_kernel(s)) for s in sources)
        leaves = any(c.op_type == "QuantizeLinear" for n in members for out in n.output for c in consumers.get(out, ()))
        if enters and leaves:
            islands.append(_island(members, constants))
    return islands


def optimized_graph(path: str) -> onnx.GraphProto:
    """The graph ONNX Runtime's CPU provider runs for the model at ``path``, after its QDQ fusions (the extended
    optimization level: fusions, no layout changes)."""
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def _is_kernel(node: onnx.NodeProto) -> bool:
    """An integer kernel of ONNX Runtime (its output may be float, as MatMulIntegerToFloat's)."""
    return node.op_type.startswith(("QLinear", "QGemm", "QAttention", "QOrdered")) or "Integer" in node.op_type


def _integer_values(graph: onnx.GraphProto) -> set[str]:
    """Values that are not float: quantized tensors, integer kernels' integer outputs, and what moves or indexes
    them (shapes and indices too)."""
    values: set[str] = {init.name for init in graph.initializer if init.data_type not in FLOATS}
    values |= {v.name for v in graph.input if v.type.tensor_type.elem_type not in FLOATS}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" or node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin"):
            values.update(node.output)
        elif _is_kernel(node) and not node.op_type.endswith("ToFloat"):
            values.update(node.output[:1])
        elif node.op_type == "Cast":
            if next((attr.i for attr in node.attribute if attr.name == "to"), onnx.TensorProto.FLOAT) not in FLOATS:
                values.update(node.output)
        elif node.op_type == "Constant":
            tensor = next((attr.t for attr in node.attribute if attr.name == "value"), None)
            if tensor is not None and tensor.data_type not in FLOATS:
                values.update(node.output)
        elif node.op_type != "DequantizeLinear" and node.input and node.input[0] in values:
            values.update(node.output)  # moves or compares integers (MaxPool, Reshape, Equal on shapes, ...)
    return values


FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


def _island(members: list[onnx.NodeProto], constants: set[str] = frozenset()) -> FloatIsland:
    op_types = tuple(dict.fromkeys(n.op_type for n in members))
    missing = [op for op in op_types if op not in INTEGER_KERNELS and op not in DATA_MOVEMENT]
    by_constant = [n for n in members if n.op_type in INTEGER_KERNELS and any(name in constants for name in n.input)]
    if missing:
        reason = f"no integer kernel in ONNX Runtime for {', '.join(missing)}"
    elif by_constant:
        reason = (
            f"{', '.join(dict.fromkeys(n.op_type for n in by_constant))} with a float constant operand (a parameter "
            "training leaves in float, such as a layer scale): ONNX Runtime's integer kernel needs both operands quantized"
        )
    else:
        shown = (
            [n.name or n.op_type for n in members if n.op_type in INTEGER_KERNELS] or [members[0].name or members[0].op_type]
        )[:3]
        reason = (
            f"ONNX Runtime runs {', '.join(op_types)} in float here (an input or output is not quantized): quantize "
            f"around {', '.join(shown)} with an op-level config entry to make it integer"
        )
    return FloatIsland(tuple(n.name or n.op_type for n in members), op_types, reason)
