"""Bias correction (PtqQuantizer(bias_correction=True), NNI's is_bias_correction): hand-computed shifts for Linear,
convolution and a folded BatchNorm, the pass that follows, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import PtqQuantizer, TorchEvaluator
from quantrain.wrapping.bias_correction import BiasShift

INT2_WEIGHTS = [{"op_types": ["Linear", "Conv2d"], "target_names": ["weight"], "quant_dtype": "int2"}]
"""int2 symmetric weights: [-1, 1] times scale = max|w| (qmax - qmin = 2), so the rounding is easy to follow."""


def _evaluator(model, batches):
    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        raise AssertionError("not called without a budget")

    def evaluating_func(model):
        model.eval()
        return {"default": float(sum(model(x).sum() for x in batches))}

    return TorchEvaluator(
        training_func, torch.optim.SGD(model.parameters(), lr=0.1), lambda b, m: m(b).sum(), evaluating_func=evaluating_func
    )


def test_linear_bias_moves_by_the_mean_output_shift_of_its_weight_rounding():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.55, -0.45]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    ptq = PtqQuantizer(model, INT2_WEIGHTS, _evaluator(model, [x]), is_bias_correction=True)  # NNI's spelling
    _, config = ptq.compress()
    # scale = max|w| = 1: Q(W) = [[0, 0, 1], [1, 1, 0]], W - Q(W) = [[0.3, -0.2, -0.1], [0, -0.45, -0.45]]
    # rows of x (W - Q(W))^T: [-0.4, -2.25] and [0.15, -0.45]; their mean: [-0.125, -1.35]
    assert torch.equal(config["0"]["weight"]["scale"], torch.tensor(1.0))
    assert torch.allclose(ptq.corrected_biases["0"], torch.tensor([-0.125, -1.35]), atol=1e-6)
    assert torch.allclose(model[0].bias, torch.tensor([0.375, -1.85]), atol=1e-6)
    # the quantized layer's mean output now equals the float layer's
    with torch.no_grad():
        float_out = F.linear(x, model[0].weight, torch.tensor([0.5, -0.5]))
        assert torch.allclose(model(x).mean(0), float_out.mean(0), atol=1e-6)


def test_a_convolution_is_corrected_per_output_channel_over_batch_and_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2))
    bias = model[0].bias.detach().clone()
    batches = [torch.randn(4, 2, 5, 5) for _ in range(2)]
    ptq = PtqQuantizer(model, INT2_WEIGHTS, _evaluator(model, batches), bias_correction=True)
    _, config = ptq.compress()
    weight = model[0].weight
    quantized = torch.clamp(torch.round(weight / config["0"]["weight"]["scale"]), -1, 1) * config["0"]["weight"]["scale"]
    with torch.no_grad():
        shifts = torch.cat([F.conv2d(x, weight - quantized) for x in batches])
    expected = shifts.mean(dim=(0, 2, 3))
    assert expected.shape == (3,) and expected.abs().max() > 1e-2
    assert torch.allclose(ptq.corrected_biases["0"], expected, atol=1e-6)
    assert torch.allclose(model[0].bias, bias + expected, atol=1e-6)


def test_a_folded_batchnorm_takes_the_shift_in_its_beta():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 2, bias=False), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        model[1].weight.copy_(torch.tensor([1.5, -0.5, 0.8]))
    beta = model[1].bias.detach().clone()
    batches = [torch.randn(4, 2, 5, 5)]
    config = [{**INT2_WEIGHTS[0], "op_types": ["Conv2d"], "fuse_names": [("0", "1")]}]
    ptq = PtqQuantizer(model.eval(), config, _evaluator(model, batches), bias_correction=True)
    _, calibration = ptq.compress()
    s = model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
    folded = model[0].weight * s.reshape(-1, 1, 1, 1)
    scale = calibration["0"]["weight"]["scale"]  # per tensor: max |folded weight|
    quantized = torch.clamp(torch.round(folded / scale), -1, 1) * scale
    with torch.no_grad():
        expected = F.conv2d(batches[0], folded - quantized).mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].bias, beta + expected, atol=1e-5)
    assert model[0].bias is None


def test_the_pass_after_correction_widens_ranges_for_the_new_bias():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.55, -0.45]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    config = [{"op_types": ["Linear"], "target_names": ["weight", "bias"], "quant_dtype": "int2"}]
    ptq = PtqQuantizer(model, config, _evaluator(model, [x]), bias_correction=True)
    _, calibration = ptq.compress()
    bias = calibration["0"]["bias"]
    # the bias range covers the old bias (0.5, -0.5) and the corrected one (0.375, -1.85): extremes, as in NNI
    assert torch.allclose(bias["tracked_min"], torch.tensor(-1.85)) and torch.allclose(bias["tracked_max"], torch.tensor(0.5))
    assert torch.allclose(bias["scale"], torch.tensor(1.85))


def test_a_layer_without_bias_is_named_in_a_warning_and_left_alone():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2))
    x = torch.randn(4, 3)
    ptq = PtqQuantizer(model, INT2_WEIGHTS, _evaluator(model, [x]), bias_correction=True)
    with pytest.warns(UserWarning, match=r"bias_correction: 0 have no bias"):
        ptq.compress()
    assert set(ptq.corrected_biases) == {"1"} and model[0].bias is None


def test_bias_correction_needs_evaluation_data_and_says_so_before_touching_the_model():
    model = nn.Sequential(nn.Linear(3, 2))
    evaluator = TorchEvaluator(lambda *a: None, torch.optim.SGD(model.parameters(), lr=0.1), lambda b, m: m(b).sum())
    for given in (None, evaluator):
        with pytest.raises(ValueError, match="bias_correction measures each layer's output shift on the evaluator's"):
            PtqQuantizer(model, INT2_WEIGHTS, given, bias_correction=True)
        assert type(model[0]) is nn.Linear
    with pytest.raises(TypeError, match="bias_correction must be True or False"):
        PtqQuantizer(model, INT2_WEIGHTS, bias_correction="yes")
    with pytest.raises(TypeError, match="not both"):
        PtqQuantizer(model, INT2_WEIGHTS, bias_correction=True, is_bias_correction=True)
    assert type(model[0]) is nn.Linear


def test_measuring_changes_neither_outputs_nor_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ptq = PtqQuantizer(model, [{"op_types": ["Linear"], "target_names": ["_input_", "weight"], "quant_dtype": "int4"}])
    ptq.track_forward(torch.randn(8, 3))
    ptq.compress()
    x = torch.randn(5, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x)
    measurement = BiasShift(ptq.quantized_modules)
    with measurement:
        during = model(x)
    assert torch.equal(before, during) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert set(measurement.shifts()) == {"0", "2"} and not model[0]._forward_pre_hooks
