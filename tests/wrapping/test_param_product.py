"""A product with a parameter of the model (ConvNeXt's layer scale, ``x * self.gamma``): with the ``_param_`` target
the parameter is quantized per tensor as a weight is, so ONNX Runtime multiplies integers (QLinearMul) where the
float parameter left a float Mul."""

import collections

import torch
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx
from quantrain.graph import capture
from quantrain.ops.fake_quant import fake_quantize

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.gamma = nn.Parameter(torch.linspace(0.1, 2.0, 8))

    def forward(self, x):
        h = self.fc(x)
        return self.head(self.gamma * h + h * h)  # mul:0 reads a parameter, mul:1 two activations


def _quantize():
    torch.manual_seed(0)
    model = LayerScale()
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight", "_output_"],
            **UINT8,
            "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric"}},
        },
        {"op_types": ["mul"], "target_names": ["_output_", "_param_"], **UINT8},
        {"op_types": ["add"], "target_names": ["_output_"], **UINT8},
    ]
    quantizer = QATQuantizer(model, config, example_inputs=torch.randn(2, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(4):
        model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), quantizer


def _fq(fq, x):
    return fake_quantize(x, fq.scale, fq.zero_point, fq.settings.qmin, fq.settings.qmax)


def test_the_graph_records_the_parameter_an_op_reads():
    graph = capture(LayerScale(), torch.randn(2, 4))
    assert {call.name: call.parameters for call in graph.ops() if call.op_type == "mul"} == {"mul:0": ("gamma",), "mul:1": ()}


def test_the_parameter_is_quantized_from_its_current_range_and_the_product_of_activations_is_left_alone():
    model, quantizer = _quantize()
    param_point, plain_point = quantizer.op_points["mul:0"], quantizer.op_points["mul:1"]
    assert sorted(param_point.fake_quant) == ["_output_0", "_param_0"] and list(plain_point.fake_quant) == ["_output_0"]
    q_param = param_point.fake_quant["_param_0"]
    assert not q_param.activation  # a weight's quantizer: the parameter's range as it is now
    lo, hi = model.gamma.detach().min().clamp(max=0), model.gamma.detach().max()
    torch.testing.assert_close(q_param.scale.reshape(()), (hi - lo) / 255)
    x = torch.randn(8, 4)
    with torch.no_grad():
        h = _fq(model.fc.fake_quant["_output_0"], model.fc(x))
        product = _fq(param_point.fake_quant["_output_0"], _fq(q_param, model.gamma) * h)
        square = _fq(plain_point.fake_quant["_output_0"], h * h)
        hidden = _fq(quantizer.op_points["add:0"].fake_quant["_output_0"], product + square)
        expected = model.head.fake_quant["_output_0"](
            torch.nn.functional.linear(
                _fq(model.head.fake_quant["_input_0"], hidden),
                model.head.fake_quant["weight"](model.head.weight),
                model.head.bias,
            )
        )
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert "mul:0" in quantizer.get_calibration_config() and "_param_0" in quantizer.get_calibration_config()["mul:0"]


def test_the_export_multiplies_integers_and_matches(tmp_path):
    model, _ = _quantize()
    path = tmp_path / "layer_scale.onnx"
    report = export_onnx(model, torch.randn(2, 4), path)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearMul"] == 2 and "Mul" not in ops, ops
    assert not any("_param_0" in note for note in report.notes), report.notes  # uint8 is what QLinearMul takes
    (output,) = check_parity(model, path, torch.randn(64, 4, generator=torch.Generator().manual_seed(5))).outputs
    assert output.max_diff_in_steps <= 1.0 + 1e-4


def test_the_onnx_runtime_preset_quantizes_a_layer_scale():
    model = LayerScale()
    quantizer = QATQuantizer(
        model, deployable_config_list(8, 8, input_module="fc", target="onnxruntime"), example_inputs=torch.randn(2, 4)
    )
    assert sorted(quantizer.op_points["mul:0"].fake_quant) == ["_output_0", "_param_0"]
