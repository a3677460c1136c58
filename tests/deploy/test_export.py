"""ONNX QDQ export: the file, ONNX Runtime's integer kernels, parity with the fake-quant model, and bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, export_onnx
from quantrain.config.presets import deployable_config_list
from quantrain.demo import build_model, load_digits
from quantrain.deploy.export import graph_constants, propagate_quantization
from quantrain.deploy.runtime import u8s8_saturates


def _config(weight_bits=8, activation_dtype="uint8"):
    config = deployable_config_list(weight_bits, 8)
    for entry in config:
        entry["quant_dtype"] = activation_dtype
    return config


def _train(model, x, y, steps=60):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        index = torch.arange(step * 64, step * 64 + 64) % len(y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """The demo's conv-BN-ReLU CNN, float-trained then QAT-trained with BN folded (int8 weights, uint8 activations)."""
    torch.manual_seed(0)
    x_train, y_train, _, _ = digits
    model = _train(build_model(), x_train, y_train)
    quantizer = QATQuantizer(model, _config(), fuse="auto", freeze_bn_step=40, example_inputs=torch.zeros(1, 1, 8, 8))
    _train(model, x_train, y_train)
    return model, quantizer


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory, digits):
    model, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    report = export_onnx(model, digits[2][:2], path)
    return path, report


def _optimized_node_types(path, tmp_path):
    return optimized_op_types(path, tmp_path, "all")


def test_the_file_is_a_valid_qdq_model_with_int8_weights(exported):
    path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert report.notes == [] and report.quantized_layers == ["0", "3", "8", "10"]
    types = [node.op_type for node in model.graph.node]
    assert types.count("Conv") == 2 and types.count("Gemm") == 2 and "BatchNormalization" not in types
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(weight_dqs) == 4  # one per conv/linear weight, per channel
    constants = {
        out: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant" for out in n.output
    }
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [{**constants, **initializers}[n.input[0]] for n in weight_dqs]
    if report.weight_dtype == "int8":
        assert all(w.dtype == np.int8 and w.min() >= -127 for w in weights)
    else:  # this CPU's int8-weight kernels saturate: the same values stored as q + 128 (see the tests below)
        assert report.weight_dtype == "uint8" and u8s8_saturates()
        assert all(w.dtype == np.uint8 and w.min() >= 1 for w in weights)
    read = {name for node in model.graph.node for name in node.input}
    assert set(initializers) <= read and set(constants) <= read  # the folded-away float weights and BN are gone
    assert not any(w.dtype == np.float32 and w.ndim > 1 for w in initializers.values())


def test_onnx_runtime_runs_it_with_integer_kernels(exported, tmp_path):
    path, _ = exported
    types = _optimized_node_types(path, tmp_path)
    assert "QLinearConv" in types and ("QGemm" in types or "QLinearMatMul" in types)
    assert "Conv" not in types and "Gemm" not in types and "MatMul" not in types


def test_parity_on_the_digits_test_set(trained, exported, digits):
    model, _ = trained
    path, _ = exported
    x_test, y_test = digits[2], digits[3]
    report = check_parity(model, path, x_test)
    (output,) = report.outputs
    assert output.top1_agreement >= 0.998
    assert output.max_diff_in_steps is not None and output.max_diff_in_steps <= 1.0 + 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_accuracy = (session.run(None, {"input_0": x_test.numpy()})[0].argmax(1) == y_test.numpy()).mean()
    with torch.no_grad():
        torch_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert abs(onnx_accuracy - torch_accuracy) * 100 <= 0.3  # at most one of 360 images
    assert "top-1 agreement" in str(report)


def _logits_differing(integer_bias, digits, path):
    torch.manual_seed(0)
    x_train, y_train, x_test, _ = digits
    model = _train(build_model(), x_train, y_train)
    QATQuantizer(
        model, _config(), fuse="auto", freeze_bn_step=40, integer_bias=integer_bias, example_inputs=torch.zeros(1, 1, 8, 8)
    )
    _train(model, x_train, y_train)
    export_onnx(model, x_test[:2], path)
    produced = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x_test.numpy()})[0]
    with torch.no_grad():
        expected = model.eval()(x_test).numpy()
    assert np.array_equal(produced.argmax(1), expected.argmax(1))
    return float((produced != expected).mean())


def test_integer_bias_removes_most_differences_between_onnx_runtime_and_fake_quant(digits, tmp_path):
    """ORT adds each bias rounded to the int32 grid S_in * S_w; trained and evaluated on that grid, the model's
    logits equal ORT's except where float accumulation lands within rounding error of a tie (measured: 3 of 3600
    logits, against 59 of 3600 with float biases)."""
    with_float_bias = _logits_differing(False, digits, tmp_path / "float_bias.onnx")
    with_integer_bias = _logits_differing(True, digits, tmp_path / "integer_bias.onnx")
    assert with_integer_bias <= 0.002 and with_float_bias >= 5 * max(with_integer_bias, 1 / 3600)


def test_the_batch_dimension_is_dynamic(exported, digits):

    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        assert session.run(None, {"input_0": digits[2][:batch].numpy()})[0].shape == (batch, 10)


def test_sub_8_bit_weights_are_int8_containers_and_activation_differences_are_reported(digits, tmp_path):
    torch.manual_seed(0)
    model = build_model()
    QATQuantizer(model, _config(weight_bits=4, activation_dtype="int4"), fuse="auto", example_inputs=torch.zeros(1, 1, 8, 8))
    _train(model, digits[0], digits[1], steps=5)
    report = export_onnx(model, digits[2][:2], tmp_path / "w4.onnx")
    assert any("int4 is exported in int8" in note for note in report.notes)
    graph = onnx.load(str(tmp_path / "w4.onnx")).graph
    int8_weights = [c for c in graph_constants(graph).values() if c.dtype == np.int8 and c.ndim > 1]
    assert int8_weights and all(c.min() >= -7 and c.max() <= 7 for c in int8_weights)


def test_uncalibrated_models_and_unquantized_models_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no quantrain quantizers"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx")
    QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight"]}], quant_start_step=5)
    with pytest.raises(ValueError, match=r"0\.weight has no scale yet"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_block_granularity_cannot_be_exported(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight"], "granularity": [1, 2]}])
    model(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"0\.weight: granularity \[1, 2\] cannot be exported"):
        export_onnx(model, torch.randn(1, 4), tmp_path / "m.onnx")


@pytest.mark.parametrize("content", [b"", b"not an onnx model", None])
def test_check_parity_refuses_damaged_files(tmp_path, content):
    model = nn.Sequential(nn.Linear(4, 2))
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.onnx"):
        check_parity(model, path, torch.randn(1, 4))


def test_propagation_inserts_the_same_qdq_after_grid_preserving_ops():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("z", TensorProto.UINT8, [], [3])],
    )
    assert [n.op_type for n in propagate_quantization(graph)] == ["MaxPool", "Flatten", "Relu"]
    assert [n.op_type for n in graph.node] == [
        "DequantizeLinear",
        "MaxPool",
        "QuantizeLinear",
        "DequantizeLinear",
        "Flatten",
        "QuantizeLinear",
        "DequantizeLinear",
        "Relu",
        "QuantizeLinear",
        "DequantizeLinear",
    ]
    assert all(list(n.input[1:]) == ["s", "z"] for n in graph.node if n.op_type.endswith("quantizeLinear"))
    assert graph.node[-1].output[0] == "y"


def test_propagation_quantizes_each_part_of_a_split_and_what_gather_and_slice_select():
    from onnx import TensorProto, helper, numpy_helper

    constants = {"s": np.array(0.5, np.float32), "z": np.array(3, np.uint8), "split": np.array([1, 3], np.int64)}
    constants |= {"index": np.array(0, np.int64), "starts": np.array([1]), "ends": np.array([3]), "axes": np.array([1])}
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
        helper.make_node("Split", ["x", "split"], ["a", "b"], name="/split", axis=1),
        helper.make_node("Gather", ["x", "index"], ["g"], name="/gather", axis=1),
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["c"], name="/slice"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("a", "b", "g", "c")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 4])],
        outputs,
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    assert [n.name for n in propagate_quantization(graph)] == ["/split", "/gather", "/slice"]
    pairs = [n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    split = ["/split_q_0", "/split_dq_0", "/split_q_1", "/split_dq_1"]
    assert pairs == ["", *split, "/gather_q", "/gather_dq", "/slice_q", "/slice_dq"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q = np.array([[3, 5, 7, 9], [0, 255, 4, 6]], np.uint8)
    x = (q.astype(np.float32) - 3) * 0.5
    a, b, g, c = session.run(None, {"q": q})  # on the grid already: the pairs change nothing
    np.testing.assert_array_equal(a, x[:, :1])
    np.testing.assert_array_equal(b, x[:, 1:])
    np.testing.assert_array_equal(g, x[:, 0])
    np.testing.assert_array_equal(c, x[:, 1:3])


def test_idle_relus_after_zero_based_dequantization_are_dropped():
    from onnx import TensorProto, helper

    from quantrain.deploy.export import drop_idle_relus

    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z0"], ["x"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z3"], ["x3"]),
        helper.make_node("Relu", ["x3"], ["r3"]),
        helper.make_node("Add", ["r", "r3"], ["y"]),
    ]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("z0", TensorProto.UINT8, [], [0]),
        helper.make_tensor("z3", TensorProto.UINT8, [], [3]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        inits,
    )
    assert drop_idle_relus(graph) == 1  # zero point 3: values below 0 exist, that ReLU stays
    assert [n.op_type for n in graph.node] == ["DequantizeLinear", "DequantizeLinear", "Relu", "Add"]
    assert list(graph.node[-1].input) == ["x", "r3"]


def test_per_layer_parity_names_every_quantization_point(trained, exported, digits):
    model, _ = trained
    path, _ = exported
    report = check_parity(model, path, digits[2][:100], per_layer=True)
    assert [layer.label for layer in report.layers] == ["0._input_0", "0._output_0", "3._output_0", "8._output_0", "10._output_0"]
    assert report.layers[0].max_diff_in_steps == 0.0  # quantizing the input is the same arithmetic in both
    assert all(layer.max_diff_in_steps <= 1.0 + 1e-4 and layer.sqnr_db > 30 for layer in report.layers)
    assert "0._output_0 |" in str(report)


@pytest.mark.parametrize("granularity", ["default", "out_channel"])
def test_a_batchnorm_not_folded_in_training_is_folded_exactly_at_export(tmp_path, granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.5, 0.25, 2.0]))  # a negative gamma flips the weight's sign
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-1, 1)
    activations = {"quant_dtype": "uint8", "quant_scheme": "affine"}
    config = [
        {
            "op_names": ["0"],
            "target_names": ["_input_", "weight"],
            **activations,
            "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": granularity}},
        },
        {
            "op_names": ["4"],
            "target_names": ["_input_", "weight", "_output_"],
            **activations,
            "target_settings": {"weight": {"quant_dtype": "int8"}},
        },
    ]
    QATQuantizer(model, config)
    for _ in range(3):
        model(torch.randn(16, 2, 6, 6))
    model.eval()
    with pytest.warns(UserWarning, match=r"folded at export .*\['0 \+ 1'\]"):
        report = export_onnx(model, torch.randn(2, 2, 6, 6), tmp_path / "bn.onnx")
    assert any("folded at export" in note for note in report.notes)
    types = [n.op_type for n in onnx.load(str(tmp_path / "bn.onnx")).graph.node]
    assert "BatchNormalization" not in types
    parity = check_parity(model, tmp_path / "bn.onnx", torch.randn(64, 2, 6, 6)).outputs[0]
    assert parity.top1_agreement == 1.0 and parity.max_diff_in_steps <= 1.0 + 1e-4
    assert type(model[1]) is nn.BatchNorm2d  # the user's model is untouched


# ---- how weights are stored: int8, or the same values as uint8 ------------------------------------------------


def _weights_and_zero_points(path):
    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values.update((n.output[0], numpy_helper.to_array(n.attribute[0].t)) for n in graph.node if n.op_type == "Constant")
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values]
    return [(values[n.input[0]], values[n.input[2]]) for n in dqs]


def test_uint8_weights_are_the_int8_values_shifted_and_run_the_same(trained, digits, tmp_path):
    model, _ = trained
    x = digits[2][:64]
    signed = export_onnx(model, x[:2], tmp_path / "s8.onnx", weight_dtype="int8")
    unsigned = export_onnx(model, x[:2], tmp_path / "u8.onnx", weight_dtype="uint8")
    assert (signed.weight_dtype, unsigned.weight_dtype) == ("int8", "uint8") and signed.notes == unsigned.notes == []
    pairs = list(zip(_weights_and_zero_points(tmp_path / "s8.onnx"), _weights_and_zero_points(tmp_path / "u8.onnx"), strict=True))
    assert len(pairs) == 4
    for (q8, z8), (u8, zu8) in pairs:
        assert q8.dtype == z8.dtype == np.int8 and u8.dtype == zu8.dtype == np.uint8
        assert np.array_equal(u8.astype(np.int32) - 128, q8) and np.array_equal(zu8.astype(np.int32) - 128, z8)
    # ONNX's own reference semantics (no integer kernels): both files compute the same numbers
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(str(tmp_path / f), options, providers=["CPUExecutionProvider"]) for f in ("s8.onnx", "u8.onnx")]
    first, second = (run.run(None, {"input_0": x.numpy()})[0] for run in runs)
    assert np.array_equal(first, second)
    # with the integer kernels, the uint8 file agrees with the trained model within one step on every CPU
    report = check_parity(model, tmp_path / "u8.onnx", digits[2])
    assert report.outputs[0].max_diff_in_steps <= 1.0 + 1e-4 and report.notes == ()
    assert "QLinearConv" in _optimized_node_types(tmp_path / "u8.onnx", tmp_path)


def test_parity_explains_int8_weight_saturation_where_this_cpu_has_it(trained, digits, tmp_path):
    model, _ = trained
    export_onnx(model, digits[2][:2], tmp_path / "s8.onnx", weight_dtype="int8")
    report = check_parity(model, tmp_path / "s8.onnx", digits[2])
    if u8s8_saturates():
        (note,) = report.notes
        assert "saturation" in note and "/0/weight/DequantizeLinear" in note and "weight_dtype='uint8'" in note
        assert f"note: {note}" in str(report)
    else:  # VNNI or ARM: int8 weights are exact, and nothing needs explaining
        assert report.notes == () and report.outputs[0].max_diff_in_steps <= 1.0 + 1e-4


def test_the_saturation_probe_matches_the_arithmetic_of_a_real_layer(tmp_path):
    """A one-layer model whose exact int8 result needs more than 16 bits per pair of products."""
    model = nn.Sequential(nn.Linear(64, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric"}},
        }
    ]
    QATQuantizer(model, config)
    x = torch.ones(4, 64)
    model(x)
    model(torch.zeros(4, 64))  # the input range (0, 1): x quantizes to 255, the weights to 127
    export_onnx(model, x, tmp_path / "s8.onnx", weight_dtype="int8")
    (out,) = ort.InferenceSession(str(tmp_path / "s8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert np.allclose(out, expected, atol=1e-6) != u8s8_saturates()
