"""The integer-only reference: agreement with ONNX Runtime, integer intermediates, and refusals."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from quantrain import QATQuantizer, export_onnx
from quantrain.demo import build_model, demo_config_list, load_digits
from quantrain.integer import IntegerModel, kernels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    x_train, y_train, x_test, _ = load_digits(seed=0)
    model = build_model()
    QATQuantizer(model, demo_config_list(8), fuse="auto")
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
    assert np.abs(out.numpy() - reference).max() <= step * (1 + 1e-5)
    assert (out.numpy().argmax(1) == reference.argmax(1)).mean() >= 0.997
    assert len(trace) > 10 and set(trace.values()) == {torch.int32}  # every step's result is an integer tensor


def _graph_model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq(name, out, scale, zp):
    return [
        helper.make_node("QuantizeLinear", [name, scale, zp], [f"{out}_q"]),
        helper.make_node("DequantizeLinear", [f"{out}_q", scale, zp], [out]),
    ]


def test_add_clip_and_average_pool_agree_with_onnx_runtime(tmp_path):
    """A residual add of two differently scaled tensors, ReLU6 as Clip, and a 2x2 average pool."""
    scalar = lambda name, value, dtype: helper.make_tensor(name, dtype, [], [value])  # noqa: E731
    inits = [
        scalar("sa", 0.05, TensorProto.FLOAT),
        scalar("za", 10, TensorProto.UINT8),
        scalar("sb", 0.03, TensorProto.FLOAT),
        scalar("zb", 128, TensorProto.UINT8),
        scalar("so", 0.04, TensorProto.FLOAT),
        scalar("zo", 100, TensorProto.UINT8),
        scalar("lo", 0.0, TensorProto.FLOAT),
        scalar("hi", 6.0, TensorProto.FLOAT),
        scalar("sp", 0.02, TensorProto.FLOAT),
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
