"""SiLU as ONNX Runtime runs it: ``q_out(x * q_gate(sigmoid(x)))`` when its entry names the ``_gate_`` target, so
the export holds a QLinearSigmoid and a QLinearMul instead of a float island."""

import collections

import torch
import torch.nn.functional as F
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx
from quantrain.ops.fake_quant import fake_quantize

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.silu(self.fc(x)))  # silu:0


def _quantize(targets):
    torch.manual_seed(0)
    model = Gated()
    config = [
        {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], **UINT8},
        {"op_types": ["silu"], "target_names": targets, **UINT8},
    ]
    return model, QATQuantizer(model, config, example_inputs=torch.randn(2, 4))


def _fq(fq, x):
    lo, hi = fq.settings.qmin, fq.settings.qmax
    return fake_quantize(x, fq.scale, fq.zero_point, lo, hi)


def test_the_gate_quantizes_the_sigmoid_before_the_product():
    model, quantizer = _quantize(["_output_", "_gate_"])
    assert sorted(quantizer.op_points["silu:0"].fake_quant) == ["_gate_0", "_output_0"]
    for step in range(3):
        model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step)))
    model.eval()
    x = torch.randn(8, 4)
    point = model.op_quant["silu:0"]
    gate, out = point.fake_quant["_gate_0"], point.fake_quant["_output_0"]
    with torch.no_grad():
        h = _fq(model.fc.fake_quant["_output_0"], model.fc(x))  # fc's output, as its quantizer left it
        expected = model.head(_fq(out, h * _fq(gate, torch.sigmoid(h))))
        assert torch.equal(model(x), expected)
        assert gate.observer.tracked_min.item() >= 0.0 and gate.observer.tracked_max.item() <= 1.0  # a sigmoid's range
    seen = []
    handle = gate.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    with torch.no_grad():
        model(x)
    handle.remove()
    ((sigmoid, gated),) = seen  # the gate read the sigmoid of fc's output, and put it on its grid
    assert torch.allclose(sigmoid, torch.sigmoid(h))
    levels = gated / gate.scale + gate.zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-3) and not torch.equal(gated, sigmoid)


def test_without_the_gate_silu_is_quantized_once_at_its_output():
    model, quantizer = _quantize(["_output_"])
    assert list(quantizer.op_points["silu:0"].fake_quant) == ["_output_0"]
    model(torch.randn(16, 4))
    model.eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        h = _fq(model.fc.fake_quant["_output_0"], model.fc(x))
        assert torch.equal(model(x), model.head(_fq(model.op_quant["silu:0"].fake_quant["_output_0"], F.silu(h))))


def test_the_preset_gates_silu_and_onnx_runtime_runs_it_in_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 3))
    quantizer = QATQuantizer(model, deployable_config_list(8, 8, target="onnxruntime"), example_inputs=torch.randn(1, 3, 8, 8))
    assert sorted(quantizer.op_points["1.silu:0"].fake_quant) == ["_gate_0", "_output_0"]
    for step in range(3):
        model(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step)))
    assert sorted(quantizer.get_calibration_config()["1.silu:0"]) == ["_gate_0", "_output_0"]
    path = tmp_path / "silu.onnx"
    report = export_onnx(model.eval(), torch.randn(1, 3, 8, 8), path)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1 and ops["QLinearConv"] == 2, ops
    assert not {"Sigmoid", "Mul", "Conv"} & set(ops) and report.float_islands == []
    (output,) = check_parity(model, path, torch.randn(32, 3, 8, 8)).outputs
    assert output.max_diff_in_steps <= 1.0 + 1e-4


def test_the_preset_gates_hardswish_so_its_product_runs_as_qlinearmul(tmp_path):
    # ONNX Runtime runs Hardswish as HardSigmoid (float: no integer kernel) and a Mul, integer once the gate is quantized
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 4, 3))
    quantizer = QATQuantizer(model, deployable_config_list(8, 8, target="onnxruntime"), example_inputs=torch.randn(1, 3, 8, 8))
    point = quantizer.op_points["1.hardswish:0"]
    assert sorted(point.fake_quant) == ["_gate_0", "_output_0"]
    for step in range(3):
        model(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step)))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = _fq(model[0].fake_quant["_output_0"], model[0](x))
        gate, out = point.fake_quant["_gate_0"], point.fake_quant["_output_0"]
        torch.testing.assert_close(model[1](h), _fq(out, h * _fq(gate, F.hardsigmoid(h))), rtol=0, atol=0)
        assert gate.observer.tracked_min.item() >= 0.0 and gate.observer.tracked_max.item() <= 1.0
    path = tmp_path / "hardswish.onnx"
    report = export_onnx(model, torch.randn(1, 3, 8, 8), path)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearMul"] == 1 and ops["QLinearConv"] == 2 and not {"Mul", "Conv", "HardSwish"} & set(ops), ops
    assert [island.op_types for island in report.float_islands] == [("HardSigmoid",)]
    (output,) = check_parity(model, path, torch.randn(32, 3, 8, 8)).outputs
    assert output.max_diff_in_steps <= 1.0 + 1e-4
