"""Export of weights whose output channels lie on dim 1 (ConvTranspose, GPT-2's Conv1D, a registered module): the
DequantizeLinear axis, parity with ONNX Runtime, the summary and the integer reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx, register_weight_axis
from quantrain.config.resolve import WEIGHT_AXES
from quantrain.integer import IntegerModel
from quantrain.summary import summarize_onnx

ACTIVATIONS = {"quant_dtype": "uint8", "quant_scheme": "affine"}
WEIGHTS = deployable_config_list(8, 8)[1]["target_settings"]["weight"]  # int8 symmetric, out_channel


def _config(op_types, last):
    """Every layer quantizes its own input (so integer_bias needs no graph) and its weight; ``last`` its output."""
    return [
        {
            "op_types": list(op_types),
            "target_names": ["_input_", "weight"],
            **ACTIVATIONS,
            "target_settings": {"weight": WEIGHTS},
        },
        {"op_names": [last], "target_names": ["_output_"], **ACTIVATIONS},
    ]


def _train(model, shape, steps=8):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model.eval()


def _weight_dequantizers(path):
    """Each weight DequantizeLinear (a constant input): (axis, number of scales, integer weight shape)."""
    model = onnx.load(str(path))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            found.append((axis, constants[node.input[1]].size, constants[node.input[0]].shape))
    return found


def test_conv_transpose_exports_axis_1_scales_and_matches_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 3, 3, stride=2), nn.Conv2d(3, 2, 1))
    QATQuantizer(model, _config(("Conv2d", "ConvTranspose2d"), last="2"), integer_bias=True)
    _train(model, (8, 2, 6, 6))
    assert model[1].fake_quant["weight"].scale.shape == (1, 3, 1, 1)
    path = tmp_path / "transpose.onnx"
    export_onnx(model, torch.randn(2, 2, 6, 6), path)
    # Conv weights (out, in, k, k) on axis 0; the ConvTranspose weight (in=4, out=3, k, k) on axis 1, 3 scales
    assert _weight_dequantizers(path) == [(0, 4, (4, 2, 3, 3)), (1, 3, (4, 3, 3, 3)), (0, 2, (2, 3, 1, 1))]
    (layer,) = [s for s in summarize_onnx(str(path)).layers if s.op_type == "ConvTranspose"]
    assert (layer.granularity, layer.axis, layer.channels) == ("per-channel", 1, 3)
    report = check_parity(model, path, torch.randn(32, 2, 6, 6))
    (output,) = report.outputs
    assert output.max_diff_in_steps is not None and output.max_diff_in_steps <= 1.0 + 1e-4


class Projection(nn.Module):
    """GPT-2's Conv1D, as a layer of a small classifier (inputs (batch, features))."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = nn.Linear(4, 8)
        self.proj = Conv1D(nf=6, nx=8)  # weight (8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.proj(torch.relu(self.fc(x))))


def test_gpt2_conv1d_exports_axis_1_scales_runs_as_an_integer_gemm_and_matches_onnx_runtime(tmp_path):
    pytest.importorskip("transformers", reason="GPT-2's Conv1D comes from transformers")
    torch.manual_seed(0)
    model = Projection()
    QATQuantizer(model, _config(("Linear", "Conv1D"), last="head"), integer_bias=True)
    _train(model, (16, 4))
    assert model.proj.fake_quant["weight"].scale.shape == (1, 6)
    path = tmp_path / "conv1d.onnx"
    export_onnx(model, torch.randn(2, 4), path)
    assert _weight_dequantizers(path) == [(0, 8, (8, 4)), (1, 6, (8, 6)), (0, 3, (3, 6))]
    gemms = [s for s in summarize_onnx(str(path)).layers if s.module == "proj"]
    assert [(s.op_type, s.axis, s.channels) for s in gemms] == [("Gemm", 1, 6)]
    report = check_parity(model, path, torch.randn(64, 4))
    (output,) = report.outputs
    assert output.top1_agreement == 1.0 and output.max_diff_in_steps <= 1.0 + 1e-4
    types = optimized_op_types(path, tmp_path)
    assert types.count("QGemm") == 3 and "Gemm" not in types  # the axis-1 weight too runs as an integer kernel


class TransposedLinear(nn.Module):
    """y = x @ W + b with W stored (in, out), exported as Gemm without transB."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * torch.linspace(0.1, 2.0, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


@pytest.fixture
def registered():
    saved = dict(WEIGHT_AXES)
    register_weight_axis(TransposedLinear, 1)
    yield
    WEIGHT_AXES.clear()
    WEIGHT_AXES.update(saved)


def test_a_registered_module_exports_its_axis_and_the_integer_reference_computes_it(registered, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(5, 4))
    QATQuantizer(model, _config(("TransposedLinear",), last="0"), integer_bias=True)
    _train(model, (16, 5))
    path = tmp_path / "transposed.onnx"
    export_onnx(model, torch.randn(2, 5), path)
    assert _weight_dequantizers(path) == [(1, 4, (5, 4))]
    x = torch.randn(64, 5)
    (integer,) = IntegerModel(path).run(x)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]
    step = model[0].fake_quant["_output_0"].scale.item()
    with torch.no_grad():
        trained = model(x).numpy()
    assert np.abs(integer.numpy() - reference).max() <= step * (1 + 1e-5)
    assert np.abs(integer.numpy() - trained).max() <= step * (1 + 1e-5)


def test_the_integer_reference_refuses_a_gemm_weight_scaled_along_its_input_axis(tmp_path):
    """A Gemm weight stored (in=3, out=2) without transB but with its 3 scales on axis 0: no per-output requantizer."""
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("z", TensorProto.UINT8, [], [128]),
        numpy_helper.from_array(np.array([[1, -2], [3, 4], [-5, 6]], dtype=np.int8), "wq"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03], dtype=np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3, dtype=np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Gemm", ["xd", "w"], ["y"], name="gemm"),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    path = tmp_path / "input_axis.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    message = r"node 'gemm' \(Gemm\): its weight 'w' .* along axis 0, but its output channels are on axis 1"
    with pytest.raises(ValueError, match=message):
        IntegerModel(path)
