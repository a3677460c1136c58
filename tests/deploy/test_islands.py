"""Float islands in the graph ONNX Runtime runs: which runs of float operators count, and the reason given."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from quantrain.deploy.islands import INTEGER_KERNELS, float_islands


def _graph(nodes, initializers=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.uint8), "z")
    return helper.make_graph(nodes, "g", [x], [y], [scale, zero, *initializers])


def q(src, dst, name):
    return helper.make_node("QuantizeLinear", [src, "s", "z"], [dst], name=name)


def dq(src, dst, name):
    return helper.make_node("DequantizeLinear", [src, "s", "z"], [dst], name=name)


def test_a_float_run_between_a_dequantize_and_a_quantize_is_one_island_with_its_reason():
    nodes = [
        q("x", "xq", "in/quantize"),
        dq("xq", "a", "in/dequantize"),
        helper.make_node("LayerNormalization", ["a", "gamma"], ["b"], name="/ln/LayerNormalization"),
        helper.make_node("Add", ["b", "a"], ["c"], name="/add/Add"),
        q("c", "cq", "out/quantize"),
        dq("cq", "y", "out/dequantize"),
    ]
    gamma = numpy_helper.from_array(np.ones(4, dtype=np.float32), "gamma")
    (island,) = float_islands(_graph(nodes, [gamma]))
    assert island.nodes == ("/ln/LayerNormalization", "/add/Add")
    assert island.op_types == ("LayerNormalization", "Add")
    assert island.reason == "no integer kernel in ONNX Runtime for LayerNormalization"
    assert island.note == f"float island (2 ops: /ln/LayerNormalization, /add/Add): {island.reason}"


def test_an_op_with_an_integer_kernel_left_in_float_is_named_with_what_to_quantize():
    nodes = [
        q("x", "xq", "in/quantize"),
        dq("xq", "a", "in/dequantize"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="/act/Sigmoid"),
    ]
    nodes += [
        helper.make_node("Mul", ["a", "b"], ["c"], name="/act/Mul"),
        q("c", "cq", "out/quantize"),
        dq("cq", "y", "out/dequantize"),
    ]
    (island,) = float_islands(_graph(nodes))
    assert island.op_types == ("Sigmoid", "Mul")
    assert island.reason.startswith("ONNX Runtime runs Sigmoid, Mul in float here") and "/act/Sigmoid, /act/Mul" in island.reason


def test_a_product_with_a_float_parameter_is_named_as_such_not_as_something_to_quantize():
    nodes = [
        q("x", "xq", "in/quantize"),
        dq("xq", "a", "in/dequantize"),
        helper.make_node("Mul", ["layer_scale", "a"], ["b"], name="/block/Mul"),  # ConvNeXt's layer scale
        q("b", "bq", "out/quantize"),
        dq("bq", "y", "out/dequantize"),
    ]
    scale = numpy_helper.from_array(np.full(4, 1e-6, dtype=np.float32), "layer_scale")
    (island,) = float_islands(_graph(nodes, [scale]))
    assert island.op_types == ("Mul",)
    assert island.reason.startswith("Mul with a float constant operand (a parameter training leaves in float")


def test_float_ops_before_the_first_or_after_the_last_quantization_are_not_islands():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="/pre/Relu"),  # the model starts in float
        q("r", "rq", "in/quantize"),
        dq("rq", "a", "in/dequantize"),
        helper.make_node("Softmax", ["a"], ["y"], name="/head/Softmax"),  # and ends in float
    ]
    assert float_islands(_graph(nodes)) == []


def test_integer_kernels_data_movement_on_integers_and_shape_arithmetic_are_not_islands():
    shape = numpy_helper.from_array(np.array([0], dtype=np.int64), "index")
    nodes = [
        q("x", "xq", "in/quantize"),
        helper.make_node(
            "QLinearSigmoid", ["xq", "s", "z", "s", "z"], ["sq"], name="/act/QLinearSigmoid", domain="com.microsoft"
        ),
        helper.make_node("MaxPool", ["sq"], ["mq"], name="/pool/MaxPool", kernel_shape=[1]),  # on uint8
        helper.make_node("Shape", ["mq"], ["dims"], name="/flat/Shape"),
        helper.make_node("Gather", ["dims", "index"], ["batch"], name="/flat/Gather"),
        helper.make_node("Concat", ["batch", "batch"], ["target"], name="/flat/Concat", axis=0),
        helper.make_node("Reshape", ["mq", "target"], ["fq"], name="/flat/Reshape"),
        dq("fq", "y", "out/dequantize"),
    ]
    assert float_islands(_graph(nodes, [shape])) == []


def test_two_float_runs_separated_by_a_quantization_are_two_islands():
    nodes = [q("x", "xq", "a/quantize"), dq("xq", "a", "a/dequantize"), helper.make_node("Erf", ["a"], ["b"], name="/one/Erf")]
    nodes += [
        q("b", "bq", "b/quantize"),
        dq("bq", "c", "b/dequantize"),
        helper.make_node("Pow", ["c", "c"], ["d"], name="/two/Pow"),
    ]
    nodes += [q("d", "dq", "d/quantize"), dq("dq", "y", "d/dequantize")]
    assert [island.nodes for island in float_islands(_graph(nodes))] == [("/one/Erf",), ("/two/Pow",)]


UNARY = ("Sigmoid", "Softmax", "LeakyRelu", "GlobalAveragePool", "HardSigmoid", "HardSwish", "Gelu", "Tanh", "ReduceMean")


def test_the_kernel_list_says_what_this_onnx_runtime_fuses_between_a_dequantize_and_a_quantize(tmp_path):
    """For each unary operator: ONNX Runtime's optimized graph of ``DequantizeLinear -> op -> QuantizeLinear`` is
    one integer kernel exactly when INTEGER_KERNELS lists the op, and otherwise an island with that reason."""
    import onnx
    import onnxruntime as ort

    fused = {}
    for op in UNARY:
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 8, 8])
        nodes = [
            dq("x", "a", "in/dequantize"),
            helper.make_node(op, ["a"], ["b"], name=f"/act/{op}"),
            q("b", "y", "out/quantize"),
        ]
        y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
        scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
        zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "z")
        model = helper.make_model(
            helper.make_graph(nodes, "g", [x], [y], [scale, zero]), opset_imports=[helper.make_opsetid("", 20)]
        )
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{op}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / f"{op}.onnx")).graph
        fused[op] = "DequantizeLinear" not in [node.op_type for node in optimized.node]
        islands = float_islands(optimized)
        if fused[op]:
            assert islands == [], op
        else:
            reasons = [island.reason for island in islands]
            assert reasons and all(reason.startswith("no integer kernel in ONNX Runtime for ") for reason in reasons), op
    assert {op for op, yes in fused.items() if yes} == {op for op in UNARY if op in INTEGER_KERNELS}
    assert fused == {op: op in ("Sigmoid", "Softmax", "LeakyRelu", "GlobalAveragePool") for op in UNARY}
