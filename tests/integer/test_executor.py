"""The integer-only reference: agreement with ONNX Runtime, integer intermediates, and refusals."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from quantrain import QATQuantizer, export_onnx
from quantrain.config.presets import deployable_config_list
from quantrain.demo import build_model, demo_config_list, load_digits
from quantrain.integer import IntegerModel, kernels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    x_train, y_train, x_test, _ = load_digits(seed=0)
    model = build_model()
    QATQuantizer(model, demo_config_list(8), fuse="auto", example_inputs=torch.zeros(1, 1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        index = torch.arange(step * 64, step * 64 + 64) % len(y_train)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("integer") / "digits.onnx"
    export_onnx(model.eval(), x_test[:2], path)
    return path, x_test


def test_agrees_with_onnx_runtime_within_one_step_using_integers_only(exported):
    path, x_test = exported
    integer = IntegerModel(path)
    trace = {}
    (out,) = integer.run(x_test, trace=trace)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x_test.numpy()})[0]
    step = integer.outputs[0][1].scale
    rounding = 4 * np.finfo(np.float32).eps * np.abs(reference).max()  # both dequantize in float32
    assert np.abs(out.numpy() - reference).max() <= step + rounding
    assert (out.numpy().argmax(1) == reference.argmax(1)).mean() >= 0.997
    assert len(trace) > 10 and set(trace.values()) == {torch.int32}  # every step's result is an integer tensor


def _graph_model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scalar(name, value, dtype):
    return helper.make_tensor(name, dtype, [], [value])


def _qdq(name, out, scale, zp):
    return [
        helper.make_node("QuantizeLinear", [name, scale, zp], [f"{out}_q"]),
        helper.make_node("DequantizeLinear", [f"{out}_q", scale, zp], [out]),
    ]


def test_add_clip_and_average_pool_agree_with_onnx_runtime(tmp_path):
    """A residual add of two differently scaled tensors, ReLU6 as Clip, and a 2x2 average pool."""
    inits = [
        _scalar("sa", 0.05, TensorProto.FLOAT),
        _scalar("za", 10, TensorProto.UINT8),
        _scalar("sb", 0.03, TensorProto.FLOAT),
        _scalar("zb", 128, TensorProto.UINT8),
        _scalar("so", 0.04, TensorProto.FLOAT),
        _scalar("zo", 100, TensorProto.UINT8),
        _scalar("lo", 0.0, TensorProto.FLOAT),
        _scalar("hi", 6.0, TensorProto.FLOAT),
        _scalar("sp", 0.02, TensorProto.FLOAT),
    ]
    nodes = [
        *_qdq("a", "a_dq", "sa", "za"),
        *_qdq("b", "b_dq", "sb", "zb"),
        helper.make_node("Add", ["a_dq", "b_dq"], ["sum"]),
        *_qdq("sum", "sum_dq", "so", "zo"),
        helper.make_node("Clip", ["sum_dq", "lo", "hi"], ["clipped"]),
        *_qdq("clipped", "clip_dq", "so", "zo"),
        helper.make_node("AveragePool", ["clip_dq"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        *_qdq("pooled", "y", "sp", "zo"),
    ]
    shape = [1, 2, 4, 4]
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        inits,
    )
    path = tmp_path / "ops.onnx"
    onnx.save(model, path)
    torch.manual_seed(1)
    a, b = torch.rand(shape) * 6 - 0.4, torch.randn(shape) * 2
    (out,) = IntegerModel(path).run(a, b)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"a": a.numpy(), "b": b.numpy()})[0]
    assert np.abs(out.numpy() - reference).max() <= 0.02 * (1 + 1e-5)
    assert out.max() <= 6.0 + 1e-6


def test_global_average_pool_matches_hand_computed_integers(tmp_path):
    """uint8 in (s = 0.5, zp = 10), uint8 out (s = 0.25, zp = 3): q_out = 3 + round(sum(q - 10) * 0.5 / (0.25 * H * W))."""
    inits = [
        _scalar("si", 0.5, TensorProto.FLOAT),
        _scalar("zi", 10, TensorProto.UINT8),
        _scalar("so", 0.25, TensorProto.FLOAT),
        _scalar("zo", 3, TensorProto.UINT8),
    ]
    nodes = [
        *_qdq("x", "x_dq", "si", "zi"),
        helper.make_node("GlobalAveragePool", ["x_dq"], ["pooled"], name="gap"),
        *_qdq("pooled", "y", "so", "zo"),
    ]
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", 1, 1])],
        inits,
    )
    path = tmp_path / "gap.onnx"
    onnx.save(model, path)
    integer = IntegerModel(path)

    # 2x2 planes, count = 4, M = 0.5 / (0.25 * 4) = 1/2
    q = torch.tensor([[[[12, 14], [20, 30]], [[0, 5], [9, 10]], [[11, 12], [14, 10]]]])
    # channel 0: (2 + 4 + 10 + 20) = 36 -> 36 / 2 = 18 -> 3 + 18 = 21
    # channel 1: (-10 - 5 - 1 + 0) = -16 -> -8 -> 3 - 8 = -5 -> clamped to uint8: 0
    # channel 2: (1 + 2 + 4 + 0) = 7 -> 3.5 -> 4 (ties away from zero) -> 3 + 4 = 7
    expected_q = torch.tensor([21, 0, 7])
    trace = {}
    (out,) = integer.run((q - 10) * 0.5, trace=trace)
    assert out.shape == (1, 3, 1, 1)
    assert torch.equal(out.flatten(), (expected_q - 3) * 0.25)
    assert set(trace.values()) == {torch.int32}

    # a 1x3 plane on the next call: count = 3, M = 0.5 / (0.25 * 3) = 2/3
    q = torch.tensor([[[[10, 11, 13]]]])
    # (0 + 1 + 3) = 4 -> 8/3 = 2.67 -> 3 -> 3 + 3 = 6
    (out,) = integer.run((q - 10) * 0.5)
    assert out.shape == (1, 1, 1, 1) and out.item() == (6 - 3) * 0.25


@pytest.mark.parametrize(
    "output_op_types, output_steps",
    [(("AdaptiveAvgPool2d",), 1), ((), 2)],
    ids=["pool-quantized", "pool-requantized"],
)
def test_global_average_pool_model_agrees_with_onnx_runtime(tmp_path, output_op_types, output_steps):
    """The pool's own quantized output agrees with ORT within one step of its scale. So does the model's output when
    the pool's output is trained; when the export requantizes it with the ReLU's (coarser) parameters instead, one
    step there (a tie rounded away from zero rather than to even, or a Conv output already one step off) can move
    the Linear's output by two of its steps, so the model's output is allowed two."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    QATQuantizer(
        model, deployable_config_list(8, 8, output_op_types=output_op_types), fuse="auto", example_inputs=torch.zeros(1, 1, 8, 8)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    path = tmp_path / "gap_model.onnx"
    export_onnx(model, x[:2], path)

    graph = onnx.load(str(path))
    consumers = {name: node for node in graph.graph.node for name in node.input}
    (pool,) = [node for node in graph.graph.node if node.op_type == "GlobalAveragePool"]
    requantize = consumers[pool.output[0]]
    assert requantize.op_type == "QuantizeLinear"
    pooled = consumers[requantize.output[0]].output[0]  # its DequantizeLinear: also a model output from here on
    graph.graph.output.append(helper.make_tensor_value_info(pooled, TensorProto.FLOAT, ["batch", 4, 1, 1]))
    onnx.save(graph, path)

    integer = IntegerModel(path)
    trace = {}
    out, pool_out = integer.run(x, trace=trace)
    reference, pool_reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_0": x.numpy()}
    )
    assert pool_out.shape == (32, 4, 1, 1)
    pool_step, step = integer.outputs[1][1].scale, integer.outputs[0][1].scale
    assert np.abs(pool_out.numpy() - pool_reference).max() <= pool_step * (1 + 1e-5)
    assert np.abs(out.numpy() - reference).max() <= output_steps * step * (1 + 1e-5)
    assert trace and all(not dtype.is_floating_point and not dtype.is_complex for dtype in trace.values())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_float_model_is_refused_naming_the_node(tmp_path):

    model = nn.Sequential(nn.Linear(4, 2)).eval()
    path = tmp_path / "float.onnx"
    torch.onnx.export(model, (torch.randn(1, 4),), str(path), dynamo=False)
    with pytest.raises(ValueError, match=r"needs a quantized input, but .* is a float tensor"):
        IntegerModel(path)


@pytest.mark.parametrize("content", [b"", b"garbage"])
def test_damaged_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        IntegerModel(path)


def test_kernels_refuse_float_tensors_and_overflowing_accumulators():
    with pytest.raises(TypeError, match="float32"):
        kernels.matmul(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int32))
    big = torch.full((1, 70000), 127, dtype=torch.int32)
    with pytest.raises(OverflowError, match="int32 accumulator"):
        kernels.matmul(big, torch.full((70000, 1), 255, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32"):
        kernels.global_sum2d(torch.ones(1, 1, 2, 2))
    plane = torch.full((1, 1, 1, 1), 255, dtype=torch.int32).expand(1, 1, 3000, 3000)  # 9e6 * 255 > 2^31 - 1
    with pytest.raises(OverflowError, match="int32 accumulator"):
        kernels.global_sum2d(plane)
