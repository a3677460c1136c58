"""The exported graph: a fused ReLU6 leaves no float Clip, idle Clips are dropped, a quantization point the forward
calls more than once gets a distinct node name at each call (ONNX Runtime refuses duplicate names), zero pads fold
into convolutions and spatial means become global average pools."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx
from quantrain.deploy.export import (
    drop_idle_relus,
    fold_constants,
    fold_zero_pads,
    global_average_pools,
    name_quantization_points,
    propagate_quantization,
    unique_node_names,
)
from quantrain.summary import summarize_onnx

ACTIVATIONS = {"quant_dtype": "uint8", "quant_scheme": "affine"}


def _relu6_model():
    """Conv -> BN -> ReLU6 -> Conv, the first three fused (deployable layout: input, weights and outputs)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 3, 3))
    config = deployable_config_list(8, 8)
    config[1]["fuse_names"] = [("0", "1", "2")]
    return model, config


def _train(model, shape, steps=6, gain=3.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step)) * gain
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("exporter", ["torchscript", "torch.export"])
def test_a_fused_relu6_leaves_no_clip_and_both_convs_run_as_integer_kernels(exporter, tmp_path):
    torch.manual_seed(0)
    model, config = _relu6_model()
    QATQuantizer(model, config)
    _train(model, (8, 2, 8, 8))
    assert type(model[2]).__name__ == "FusedReLU6"
    fq = model[0].fake_quant["_output_0"]
    assert fq.zero_point.item() == 0 and 255 * fq.scale.item() <= 6.0  # the quantizer saturates where ReLU6 clips
    path = tmp_path / "relu6.onnx"
    export_onnx(model, torch.randn(2, 2, 8, 8), path, exporter=exporter, opset=18)
    types = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Clip" not in types and "Relu" not in types and types.count("Conv") == 2
    optimized = optimized_op_types(path, tmp_path)
    assert optimized.count("QLinearConv") == 2 and "Conv" not in optimized and "Clip" not in optimized
    (output,) = check_parity(model, path, torch.randn(32, 2, 8, 8) * 3).outputs
    assert output.max_diff_in_steps is not None and output.max_diff_in_steps <= 1.0 + 1e-4


def test_the_fused_relu6_module_passes_the_layer_output_through_and_clamps_anything_else():
    torch.manual_seed(0)
    model, config = _relu6_model()
    quantizer = QATQuantizer(model, config)
    relu6 = model[2]
    produced = []
    model[0].register_forward_hook(lambda module, args, output: produced.append(output))
    hook = relu6.register_forward_hook(lambda module, args, output: produced.append(output))
    model(torch.randn(4, 2, 8, 8) * 3)
    assert produced[1] is produced[0]  # the same tensor: nothing applied again
    hook.remove()
    assert relu6(torch.tensor([-1.0, 3.0, 7.0])).tolist() == [0.0, 3.0, 6.0]  # any other input is still clamped
    quantizer.unwrap_model()
    assert type(relu6) is nn.ReLU6 and "_fused_into" not in relu6.__dict__


def test_the_top_level_above_6_is_kept_as_the_integer_kernel_computes_it(tmp_path):
    """With an output scale whose levels step over 6 (0.07: 6 / 0.07 = 85.7), the fused output at the top is
    round(6 / 0.07) * 0.07 = 6.02, under half a step above 6; ReLU6 applied again would have cut it to 6. The export
    then keeps the clamp before its QuantizeLinear (its saturation, at 255 * 0.07, does not clip at 6), and ONNX
    Runtime computes the same."""
    torch.manual_seed(0)
    model, config = _relu6_model()
    QATQuantizer(model, config)
    _train(model, (8, 2, 8, 8), steps=2)
    model[0].fake_quant["_output_0"].set_qparams(torch.tensor(0.07), torch.tensor(0.0))
    x = torch.randn(16, 2, 8, 8) * 20
    with torch.no_grad():
        hidden = model[:3](x)
    top = torch.tensor(86 * 0.07)
    assert hidden.max().item() == top.item() and top.item() > 6.0
    assert torch.equal(hidden[hidden > 6], torch.full_like(hidden[hidden > 6], top.item()))
    path = tmp_path / "relu6_wide.onnx"
    export_onnx(model, x[:2], path)
    nodes = onnx.load(str(path)).graph.node
    (clip,) = [node for node in nodes if node.op_type == "Clip"]
    (quantize,) = [node for node in nodes if node.name == "0._output_0/quantize"]
    assert quantize.input[0] == clip.output[0]  # clamp, then quantize: no Clip after the DequantizeLinear
    (output,) = check_parity(model, path, x).outputs
    assert output.max_diff_in_steps <= 1.0 + 1e-4


def _graph(nodes, inits, outputs=("y",)):
    return helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in outputs],
        inits,
    )


def test_a_clip_that_holds_every_dequantized_value_is_dropped():
    inits = [
        helper.make_tensor("s_narrow", TensorProto.FLOAT, [], [0.02]),  # 255 * 0.02 = 5.1 <= 6
        helper.make_tensor("s_wide", TensorProto.FLOAT, [], [0.03]),  # 255 * 0.03 = 7.65 > 6
        helper.make_tensor("z0", TensorProto.UINT8, [], [0]),
        helper.make_tensor("z3", TensorProto.UINT8, [], [3]),  # values down to -3 * 0.02 < 0
        helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0]),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s_narrow", "z0"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["ca"]),  # idle
        helper.make_node("DequantizeLinear", ["q", "s_wide", "z0"], ["b"]),
        helper.make_node("Clip", ["b", "lo", "hi"], ["cb"]),  # clips at 6
        helper.make_node("DequantizeLinear", ["q", "s_narrow", "z3"], ["c"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cc"]),  # clips at 0
        helper.make_node("Clip", ["a", "lo"], ["ca_low"]),  # only a lower bound, idle
        helper.make_node("Neg", ["a"], ["computed"]),
        helper.make_node("Clip", ["a", "lo", "computed"], ["cd"]),  # a computed bound: kept
        helper.make_node("Sum", ["ca", "cb", "cc", "ca_low", "cd"], ["y"]),
    ]
    graph = _graph(nodes, inits)
    assert drop_idle_relus(graph) == 2
    assert [n.op_type for n in graph.node].count("Clip") == 3
    assert list(graph.node[-1].input) == ["a", "cb", "cc", "a", "cd"]


def test_an_idle_clip_producing_a_graph_output_leaves_an_identity_of_that_name():
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
        helper.make_tensor("z0", TensorProto.UINT8, [], [0]),
        helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0]),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z0"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["y"])]
    graph = _graph(nodes, inits)
    assert drop_idle_relus(graph) == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in graph.node][-1] == ("Identity", ["a"], ["y"])


class Reused(nn.Module):
    """``fc`` and ``relu`` each run twice per forward (as torchvision's BasicBlock calls its ``relu`` twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.relu(self.fc(x)) + self.relu(self.fc(-x)))


REUSED_CONFIG = [
    {
        "op_types": ["Linear"],
        "target_names": ["_input_", "weight"],
        **ACTIVATIONS,
        "target_settings": {"weight": deployable_config_list(8, 8)[1]["target_settings"]["weight"]},
    },
    {"op_names": ["relu", "head"], "target_names": ["_output_"], **ACTIVATIONS},
]


@pytest.mark.parametrize("exporter", ["torchscript", "torch.export"])
def test_points_called_twice_get_distinct_names_and_onnx_runtime_loads_the_model(exporter, tmp_path):
    torch.manual_seed(0)
    model = Reused()
    QATQuantizer(model, REUSED_CONFIG, integer_bias=True)
    _train(model, (16, 4), gain=1.0)
    path = tmp_path / "reused.onnx"
    export_onnx(model, torch.randn(2, 4), path, exporter=exporter, opset=18)
    graph = onnx.load(str(path)).graph
    names = [node.name for node in graph.node]
    assert [name for name, count in collections.Counter(names).items() if count > 1] == []
    quantize = [n.name for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize == [
        "fc._input_0/quantize",
        "relu._output_0/quantize",
        "fc._input_0#1/quantize",
        "relu._output_0#1/quantize",
        "head._input_0/quantize",
        "head._output_0/quantize",
    ]
    assert "relu._output_0#1/dequantize" in names
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # refused before: duplicate node names
    labels = [point.label for point in summarize_onnx(str(path)).activations if point.named]
    assert labels == [name.removesuffix("/quantize") for name in quantize]
    x = torch.randn(64, 4)
    report = check_parity(model, path, x, per_layer=True)
    (output,) = report.outputs
    assert output.top1_agreement == 1.0 and output.max_diff_in_steps <= 1.0 + 1e-4
    # each first call is compared with its quantizer (the fake-quant model records a point's first call)
    assert [layer.label for layer in report.layers] == ["fc._input_0", "relu._output_0", "head._input_0", "head._output_0"]
    assert all(layer.max_diff_in_steps <= 1.0 + 1e-4 for layer in report.layers)


def test_naming_numbers_repeated_labels_and_leaves_the_first_call_as_it_was():
    nodes = []
    for i in range(3):
        nodes.append(helper.make_node("QuantizeLinear", [f"x{i}", "s", "z"], [f"q{i}"], name=f"Q{i}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"], name=f"D{i}"))
    graph = helper.make_graph(nodes, "g", [], [])
    assert name_quantization_points(graph, ["relu._output_0", "fc._input_0", "relu._output_0"])
    assert [n.name for n in graph.node] == [
        "relu._output_0/quantize",
        "relu._output_0/dequantize",
        "fc._input_0/quantize",
        "fc._input_0/dequantize",
        "relu._output_0#1/quantize",
        "relu._output_0#1/dequantize",
    ]
    assert not name_quantization_points(graph, ["one label for three pairs"])  # counts differ: nothing renamed
    assert graph.node[0].name == "relu._output_0/quantize"


def test_pairs_inserted_after_operators_without_names_or_with_clashing_names_end_up_unique():
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
        helper.make_node("Flatten", ["x"], ["f"]),  # no name: the inserted pair is named after its output
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x2"], name="dq2"),
        helper.make_node("Flatten", ["x2"], ["f2"], name="flat"),
        helper.make_node("Identity", ["f2"], ["g"], name="flat_q"),  # a name the inserted Q would take
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    propagate_quantization(graph)
    names = [n.name for n in graph.node]
    assert "f_q" in names and "f_dq" in names
    assert names.count("flat_q") == 2
    assert unique_node_names(graph) == 1
    names = [n.name for n in graph.node]
    assert len(set(names)) == len(names) and "flat_q_1" in names
    assert unique_node_names(graph) == 0
    unnamed = helper.make_graph([helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Relu", ["b"], ["c"])], "g", [], [])
    assert unique_node_names(unnamed) == 0 and [n.name for n in unnamed.node] == ["", ""]  # empty names are left


def test_a_zero_pad_before_a_convolution_is_folded_into_its_pads(tmp_path):
    """Hugging Face's EfficientNet pads with nn.ZeroPad2d, then convolves with padding='valid'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2))
    QATQuantizer(model, deployable_config_list(8, 8), fuse="auto", example_inputs=torch.randn(1, 3, 9, 9))
    _train(model, (8, 3, 9, 9))
    path = tmp_path / "pad.onnx"
    report = export_onnx(model, torch.randn(1, 3, 9, 9), path)
    graph = onnx.load(str(path)).graph
    assert "Pad" not in [node.op_type for node in graph.node]
    (second,) = [node for node in graph.node if node.name == "/3/Conv"]
    assert [list(a.ints) for a in second.attribute if a.name == "pads"] == [[0, 0, 1, 1]]  # begin h, w; end h, w
    assert optimized_op_types(path, tmp_path).count("QLinearConv") == 2 and report.float_islands == []
    (output,) = check_parity(model, path, torch.randn(32, 3, 9, 9)).outputs
    assert output.max_diff_in_steps <= 1.0 + 1e-4


def test_pads_that_are_not_zeros_before_a_convolution_stay():
    def graph(mode, value):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")
        fill = numpy_helper.from_array(np.array(value, dtype=np.float32), "fill")
        weight = numpy_helper.from_array(np.ones((2, 2, 3, 3), dtype=np.float32), "w")
        nodes = [
            helper.make_node("Pad", ["x", "pads", "fill"], ["p"], name="/pad", mode=mode),
            helper.make_node("Conv", ["p", "w"], ["y"], name="/conv"),
        ]
        return helper.make_graph(nodes, "g", [x], [y], [pads, fill, weight])

    folded = graph("constant", 0.0)
    assert fold_zero_pads(folded) == 1 and [n.op_type for n in folded.node] == ["Conv"]
    assert [list(a.ints) for a in folded.node[0].attribute if a.name == "pads"] == [[1, 1, 1, 1]]
    for mode, value in (("constant", 0.5), ("reflect", 0.0), ("edge", 0.0)):
        kept = graph(mode, value)
        assert fold_zero_pads(kept) == 0 and [n.op_type for n in kept.node] == ["Pad", "Conv"]


def test_constant_arithmetic_is_folded_and_what_onnx_cannot_evaluate_is_left_for_onnx_runtime():
    # BERT's token-type buffer is gathered along 512 positions; onnx's evaluator takes at most 64 (numpy.choose)
    data = np.arange(100, dtype=np.int64).reshape(1, 100)
    index = np.array([[99, 0, 64, 65]], dtype=np.int64)
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])
    outputs = [helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in ("y", "z")]
    nodes = [
        helper.make_node("Mul", ["two", "three"], ["six"], name="/mul"),
        helper.make_node("Add", ["x", "six"], ["y"], name="/add"),
        helper.make_node("GatherElements", ["data", "index"], ["z"], name="/gather", axis=1),
    ]
    constants = [numpy_helper.from_array(v, n) for n, v in (("two", np.array(2)), ("three", np.array(3)), ("data", data))]
    constants.append(numpy_helper.from_array(index, "index"))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, constants), opset_imports=[helper.make_opsetid("", 17)])
    assert fold_constants(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add", "GatherElements"]
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "six")) == 6
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z = session.run(None, {"x": np.array([[1, 2, 3, 4]], dtype=np.int64)})
    assert y.tolist() == [[7, 8, 9, 10]] and z.tolist() == [[99, 0, 64, 65]]


def _mean_graph(axes, keepdims, rank=4, *, attribute=False, quantized=False):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5][:rank])
    inputs, initializers = ["x"], []
    if attribute:
        mean = helper.make_node("ReduceMean", inputs, ["y"], name="/pool/ReduceMean", keepdims=keepdims, axes=axes)
    else:
        initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="/pool/ReduceMean", keepdims=keepdims)
    nodes, out = [mean], "y"
    if quantized:
        initializers += [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(3, np.uint8), "z"),
        ]
        nodes.append(helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="/pool/q"))
        out = "yq"
    y = helper.make_tensor_value_info(out, TensorProto.UINT8 if quantized else TensorProto.FLOAT, None)
    return helper.make_graph(nodes, "g", [x], [y], initializers)


def test_a_mean_over_every_spatial_dim_keeping_them_becomes_a_global_average_pool():
    for axes, rank, attribute in (([2, 3], 4, False), ([-1, -2], 4, False), ([2], 3, False), ([2, 3], 4, True)):
        g = _mean_graph(axes, 1, rank, attribute=attribute)
        assert global_average_pools(g, [helper.make_opsetid("", 17 if attribute else 18)]) == 1
        (node,) = g.node
        assert (node.op_type, list(node.input), node.name, list(node.attribute)) == (
            "GlobalAveragePool",
            ["x"],
            "/pool/GlobalAveragePool",
            [],
        )


def test_a_mean_dropping_the_spatial_dims_becomes_a_pool_then_a_squeeze_quantized_between_as_the_mean_is():
    g = _mean_graph([2, 3], 0)
    assert global_average_pools(g, [helper.make_opsetid("", 18)]) == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("GlobalAveragePool", ["x"], ["y_pooled"]),
        ("Squeeze", ["y_pooled", "y_spatial_axes"], ["y"]),
    ]
    assert numpy_helper.to_array(g.initializer[-1]).tolist() == [2, 3]
    g = _mean_graph([3, 2], 0, attribute=True, quantized=True)  # the TorchScript-based exporter's form, then its Q
    assert global_average_pools(g, [helper.make_opsetid("", 17)]) == 1
    assert [(n.op_type, list(n.input)) for n in g.node] == [
        ("GlobalAveragePool", ["x"]),
        ("QuantizeLinear", ["y_pooled", "s", "z"]),
        ("DequantizeLinear", ["y_pooled_q", "s", "z"]),
        ("Squeeze", ["y_pooled_dq", "y_spatial_axes"]),
        ("QuantizeLinear", ["y", "s", "z"]),
    ]
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.clip(np.round(x.mean(axis=(2, 3)) / 0.1) + 3, 0, 255)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)


def test_other_means_stay():
    for axes, keepdims, rank in (([1, 2, 3], 1, 4), ([3], 1, 4), ([3], 0, 4), ([1], 0, 3), ([2, 2], 0, 4)):
        g = _mean_graph(axes, keepdims, rank)
        assert global_average_pools(g, [helper.make_opsetid("", 18)]) == 0
        assert [n.op_type for n in g.node] == ["ReduceMean"]


@pytest.mark.parametrize("exporter", ["torchscript", "torch.export"])
def test_a_functional_spatial_mean_before_a_linear_runs_as_integer_pool_and_gemm(exporter, tmp_path):
    """torchvision's ShuffleNet pools with ``x.mean([2, 3])``; the ONNX Runtime preset quantizes that mean, and the
    export writes it as QLinearGlobalAveragePool, so the classifier reads integers."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).mean([2, 3]))

    torch.manual_seed(0)
    model, example = Net(), torch.randn(2, 3, 8, 8)
    config = deployable_config_list(8, 8, input_module="conv", target="onnxruntime")
    with pytest.warns(UserWarning, match="selects no module or op"):
        quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=example)
    assert list(quantizer.op_points) == ["mean:0"]
    model(torch.randn(16, 3, 8, 8))
    model.eval()
    path = tmp_path / "net.onnx"
    report = export_onnx(model, example, path, exporter=exporter, opset=18 if exporter == "torch.export" else 17)
    assert report.float_islands == []
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1 and ops["QLinearConv"] == 1
    assert "ReduceMean" not in ops and "Gemm" not in ops
    parity = check_parity(model, path, torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert parity.outputs[0].top1_agreement == 1.0 and parity.outputs[0].max_diff_in_steps <= 1.0 + 1e-4


@pytest.mark.parametrize("exporter", ["torch.export", "torchscript"])
def test_a_linear_on_token_sequences_exports_as_integer_gemms_on_rows(exporter, tmp_path):
    # (batch, tokens, features) -> rows of one matrix: Gemm, which ONNX Runtime fuses with bias and requantization
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    example = torch.randn(2, 5, 8)
    QATQuantizer(model, deployable_config_list(8, 8), fuse="auto", integer_bias=True, example_inputs=example)
    for seed in range(3):
        model(torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(seed)))
    path = tmp_path / "tokens.onnx"
    export_onnx(model.eval(), example, path, exporter=exporter)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QGemm"] == 2 and not {"MatMulIntegerToFloat", "MatMul", "Gemm", "Add"} & set(ops), ops
    report = check_parity(model, path, torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(9)))  # other batch
    assert report.outputs[0].max_diff_in_steps <= 1.0 + 1e-4, report
    assert model(example).shape == (2, 5, 4)  # the training forward is the module's own
