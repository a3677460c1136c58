"""QATQuantizer as NNI 3.0's QAT test and QAT example use it.

Mirrors ``test/algo/compression/quantization/qat_test.py`` (the SimpleTorchModel config: ``in_channel`` weights of the
Linear layers, Conv2d+BatchNorm2d ``fuse_names``, an evaluator with an ExponentialLR scheduler whose loop stops after
50 steps when no step budget is given) and ``examples/compression/quantization/qat_example.py`` (pre-train in float,
then ``QATQuantizer(model, config_list, evaluator, len(train_dataloader))``, ``track_forward`` on a real batch,
``compress(None, max_epochs)``), on scikit-learn's digits, plus NNI's step budgets, ``quant_start_step`` and range
tracking: an exponential moving average (decay 0.99) over training-mode forwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nni_style_common import (
    DocTrainingFunc,
    Net,
    check_entry,
    digits,
    digits_loaders,
    ema,
    example_training_model,
    fake_quantize,
    make_evaluating_func,
    pretrained,
    training_step,
)
from torch import nn

from quantrain import QATQuantizer, TorchEvaluator

LAYERS = ("conv1", "conv2", "fc1", "fc2")
IN_W_OUT = ("_input_0", "weight", "_output_0")


def test_qat_example_flow_keeps_accuracy_on_digits():
    train_dataloader, test_dataloader = digits_loaders()
    evaluating_model = make_evaluating_func(test_dataloader)
    model = pretrained(Net)
    float_accuracy = evaluating_model(model)
    assert float_accuracy > 0.85

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    evaluator = TorchEvaluator(example_training_model(train_dataloader), optimizer, training_step)
    config_list = [
        {
            "op_names": list(LAYERS),
            "target_names": ["_input_", "weight", "_output_"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
            "granularity": "default",
        }
    ]
    parameters = dict(model.named_parameters())

    quantizer = QATQuantizer(model, config_list, evaluator, len(train_dataloader))
    real_input = next(iter(train_dataloader))[0]
    quantizer.track_forward(real_input)
    quantized_model, calibration_config = quantizer.compress(None, max_epochs=3)

    assert quantized_model is model
    assert quantizer.current_step == 3 * len(train_dataloader)
    assert set(calibration_config) == set(LAYERS)
    for module_name in LAYERS:
        assert set(calibration_config[module_name]) == set(IN_W_OUT)
        for target_name in IN_W_OUT:
            check_entry(calibration_config[module_name][target_name], shape=())
    # quantized in place: the same Parameter objects under the same names (the optimizer built before keeps training them)
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in parameters.items()}
    assert evaluating_model(model) >= float_accuracy - 0.03


class SimpleTorchModel(nn.Module):
    """NNI's test asset SimpleTorchModel (three Conv2d+BatchNorm2d, a grouped conv, two Linear), for 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(8, 16, 3)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x)) + self.bn3(self.conv3(x))
        x = self.fc2(self.fc1(x.reshape(x.shape[0], -1)))
        return F.log_softmax(x, -1)


def test_qat_test_config_with_in_channel_weights_and_fused_batchnorms():
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders(train_size=640)  # 10 batches an epoch
    model = SimpleTorchModel()
    calls = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1)
    evaluator = TorchEvaluator(
        example_training_model(train_dataloader, calls, default_epochs=1, default_steps=50),
        optimizer,
        training_step,
        lr_scheduler,
        dummy_input=torch.rand(8, 1, 8, 8),
        evaluating_func=make_evaluating_func(test_dataloader),
    )
    configure_list = [
        {
            "target_names": ["weight"],
            "op_names": ["fc1", "fc2"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
            "granularity": "in_channel",
        },
        {
            "target_names": ["_input_", "weight", "_output_"],
            "op_names": ["conv1", "conv2", "conv3"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
            "granularity": "default",
            "fuse_names": [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")],
        },
    ]
    quantizer = QATQuantizer(model, configure_list, evaluator)
    _, calibration_config = quantizer.compress(None, 20)

    # the loop's own step limit (50) ends the 20 epochs after 5 of them; the scheduler stepped after each full epoch
    assert calls == [(optimizer, lr_scheduler, None, 20)]
    assert quantizer.current_step == 50
    assert lr_scheduler.last_epoch == 4
    assert set(calibration_config) == {"conv1", "conv2", "conv3", "fc1", "fc2"}  # the folded BatchNorms are not targets
    for name in ("conv1", "conv2", "conv3"):
        assert set(calibration_config[name]) == set(IN_W_OUT)
        for target_name in IN_W_OUT:
            check_entry(calibration_config[name][target_name], shape=())
    # in_channel: one scale per input column of the Linear weight
    assert set(calibration_config["fc1"]) == set(calibration_config["fc2"]) == {"weight"}
    check_entry(calibration_config["fc1"]["weight"], shape=(1, 16 * 4 * 4))
    check_entry(calibration_config["fc2"]["weight"], shape=(1, 24))
    accuracy = quantizer.evaluator.evaluate()
    assert isinstance(accuracy, float)
    assert accuracy > 0.6  # 50 steps on 640 images from scratch, with every target quantized (about 0.8)


def tiny_setup(quant_start_step=0, config_list=None, batches=4):
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders(train_size=64 * batches)
    model = Net()
    training_func = DocTrainingFunc(train_dataloader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, evaluating_func=make_evaluating_func(test_dataloader))
    config_list = config_list or [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight", "_output_"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
        }
    ]
    quantizer = QATQuantizer(model, config_list, evaluator, quant_start_step)
    return model, quantizer, training_func, optimizer


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "expected_steps"),
    [(7, None, 7), (None, 2, 8), (5, 2, 5), (40, 1, 4)],
    ids=["steps-only", "epochs-only", "steps-first", "epochs-first"],
)
def test_compress_budget_reaches_training_func_and_counts_its_steps(max_steps, max_epochs, expected_steps):
    model, quantizer, training_func, optimizer = tiny_setup()  # 4 batches an epoch
    result = quantizer.compress(max_steps, max_epochs)

    assert isinstance(result, tuple) and len(result) == 2
    assert result[0] is model
    assert [(call["max_steps"], call["max_epochs"]) for call in training_func.calls] == [(max_steps, max_epochs)]
    assert training_func.calls[0]["optimizers"] is optimizer
    assert training_func.calls[0]["steps"] == expected_steps
    assert quantizer.current_step == expected_steps
    assert set(result[1]) == {"fc1", "fc2"}


def test_repeated_compress_continues_counting():
    _, quantizer, training_func, _ = tiny_setup()
    quantizer.compress(3, None)
    assert quantizer.current_step == 3
    quantizer.compress(None, 1)
    assert quantizer.current_step == 7
    _, calibration_config = quantizer.compress(2, 3)
    assert quantizer.current_step == 9
    assert [call["steps"] for call in training_func.calls] == [3, 4, 2]
    for targets in calibration_config.values():
        for entry in targets.values():
            check_entry(entry)


def test_quant_start_step_tracks_ranges_from_the_start_and_quantizes_from_that_step():
    config_list = [
        {"op_names": ["fc1"], "target_names": ["_input_", "weight"], "quant_dtype": "int8", "quant_scheme": "affine"},
        {"op_names": ["fc2"], "target_names": ["_output_"], "quant_dtype": "int8", "quant_scheme": "affine"},
    ]
    model, quantizer, _, _ = tiny_setup(quant_start_step=5, config_list=config_list)
    seen = []  # (input min, input max, weight min, weight max) of every training-mode forward of fc1

    def record(module, args):
        if module.training:
            x = args[0].detach()
            seen.append((x.min(), x.max(), module.weight.detach().min(), module.weight.detach().max()))

    model.fc1.register_forward_pre_hook(record)
    fc2_calls = []
    model.fc2.register_forward_hook(lambda module, args, output: fc2_calls.append((args[0].detach(), output.detach())))

    quantizer.track_forward(digits()[0][:64])  # a training-mode forward: its batch seeds the moving averages
    _, calibration_config = quantizer.compress(3, None)
    assert quantizer.current_step == 3
    assert calibration_config == {}  # quantrain lists only targets with a scale; NNI lists them with scale None
    model.eval()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))
    x, output = fc2_calls[-1]
    assert torch.equal(output, F.linear(x, model.fc2.weight, model.fc2.bias))  # before quant_start_step: float

    _, calibration_config = quantizer.compress(4, None)
    assert quantizer.current_step == 7
    assert set(calibration_config) == {"fc1", "fc2"}
    assert set(calibration_config["fc1"]) == {"_input_0", "weight"}
    assert set(calibration_config["fc2"]) == {"_output_0"}
    assert len(seen) == 1 + 7
    fc1 = calibration_config["fc1"]
    torch.testing.assert_close(fc1["_input_0"]["tracked_min"], ema([s[0] for s in seen]))
    torch.testing.assert_close(fc1["_input_0"]["tracked_max"], ema([s[1] for s in seen]))
    torch.testing.assert_close(fc1["weight"]["tracked_min"], ema([s[2] for s in seen]))
    torch.testing.assert_close(fc1["weight"]["tracked_max"], ema([s[3] for s in seen]))
    for targets in calibration_config.values():
        for entry in targets.values():
            check_entry(entry)

    # eval-mode forwards are fake-quantized with the frozen scales, and leave the ranges alone
    quantizer.evaluator.evaluate()
    x, output = fc2_calls[-1]
    expected = fake_quantize(F.linear(x, model.fc2.weight, model.fc2.bias), calibration_config["fc2"]["_output_0"])
    torch.testing.assert_close(output, expected)
    after = quantizer.get_calibration_config()
    for name, targets in calibration_config.items():
        for target_name, entry in targets.items():
            for key in ("tracked_min", "tracked_max", "scale", "zero_point"):
                assert torch.equal(after[name][target_name][key], entry[key]), (name, target_name, key)


@pytest.mark.parametrize(
    ("entry", "module_name", "target_name", "shape", "zero_point"),
    [
        ({"quant_dtype": "int8", "quant_scheme": "symmetric"}, "fc1", "weight", (), 0.0),
        ({"quant_dtype": "uint8", "quant_scheme": "affine"}, "fc1", "_input_0", (), None),
        (
            {"quant_dtype": "uint8", "quant_scheme": "symmetric", "granularity": "per_channel"},
            "conv1",
            "_output_0",
            (1, 8, 1, 1),
            128.0,
        ),
        (
            {"quant_dtype": "int4", "quant_scheme": "symmetric", "granularity": "out_channel"},
            "conv2",
            "weight",
            (16, 1, 1, 1),
            0.0,
        ),
        ({"quant_dtype": "int8", "quant_scheme": "affine", "granularity": "out_channel"}, "fc2", "weight", (10, 1), None),
        ({"quant_dtype": "int8", "quant_scheme": "affine", "granularity": "in_channel"}, "conv2", "weight", (1, 8, 1, 1), None),
        ({"quant_dtype": "uint4", "quant_scheme": "affine", "granularity": [4, 8]}, "fc1", "weight", (8, 8), None),
    ],
    ids=[
        "int8-symmetric",
        "uint8-affine",
        "uint8-symmetric-per-channel",
        "int4-out-channel",
        "int8-affine-out-channel",
        "int8-in-channel-conv",
        "uint4-blocks",
    ],
)
def test_scales_follow_nni_formulas(entry, module_name, target_name, shape, zero_point):
    config_list = [{"op_names": [module_name], "target_names": [target_name.rstrip("0")], **entry}]
    _, quantizer, _, _ = tiny_setup(config_list=config_list, batches=2)
    _, calibration_config = quantizer.compress(3, None)

    assert list(calibration_config) == [module_name]
    assert list(calibration_config[module_name]) == [target_name]
    result = calibration_config[module_name][target_name]
    check_entry(result, entry["quant_dtype"], entry["quant_scheme"], shape)
    if zero_point is not None:
        assert torch.all(result["zero_point"] == zero_point)


def test_a_quant_scheme_left_out_is_reported_as_the_symmetric_scheme_it_computes():
    """NNI reports the scheme as given, None (its compressor.py:337), while computing a symmetric scale; quantrain
    reports the scheme it computed (docs/migrating_from_nni.md)."""
    config_list = [{"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": "int8"}]
    _, quantizer, _, _ = tiny_setup(config_list=config_list, batches=1)
    _, calibration_config = quantizer.compress(2, None)
    entry = calibration_config["fc1"]["weight"]
    assert torch.all(entry["zero_point"] == 0)  # symmetric, in both
    assert entry["quant_scheme"] == "symmetric"
