"""PtqQuantizer as NNI 3.0's PTQ example (``examples/compression/quantization/ptq_example.py``) and PTQ test use it.

An untrained model, a ``TorchEvaluator`` whose loop trains and whose ``evaluating_func`` evaluates, the example's
config_list (``conv1`` input/weight/output, ``conv2`` input/weight, the ``relu1``/``relu2``/``max_pool2`` outputs) and
``model, calibration_config = quantizer.compress(None, epochs)``. With NNI the loop really trains the float model while
every target's range is tracked as running extremes over every forward (training and evaluation alike), then the
evaluation runs, then scales are computed; so the accuracy after PTQ is that of a trained model. ``calibrate_only=True``
(a quantrain option) puts the weights back; ``is_bias_correction=True`` (NNI's spelling) corrects the biases.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from nni_style_common import (
    DocTrainingFunc,
    Mnist,
    Net,
    check_entry,
    digits_loaders,
    fake_quantize,
    make_evaluating_func,
    pretrained,
    training_step,
)

from quantrain import PtqQuantizer, TorchEvaluator

PTQ_EXAMPLE_CONFIG = [
    {
        "target_names": ["_input_", "weight"],
        "op_names": ["conv2"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
    {
        "op_names": ["relu1", "relu2"],
        "target_names": ["_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
    {
        "op_names": ["max_pool2"],
        "target_names": ["_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
    {
        "target_names": ["_input_", "weight", "_output_"],
        "op_names": ["conv1"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
]
EXPECTED_TARGETS = {
    "conv1": {"_input_0", "weight", "_output_0"},
    "conv2": {"_input_0", "weight"},
    "relu1": {"_output_0"},
    "relu2": {"_output_0"},
    "max_pool2": {"_output_0"},
}


def counted(evaluating_func, counter):
    def wrapped(model):
        counter.append(model.training)
        return evaluating_func(model)

    return wrapped


def record_conv2(model, seen):
    """Record the input and weight extremes of every conv2 forward, whatever the mode."""

    def hook(module, args):
        seen.append((args[0].detach().min(), args[0].detach().max(), module.weight.detach().min(), module.weight.detach().max()))

    return model.conv2.register_forward_pre_hook(hook)


def ptq_example_setup(**options):
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders()
    model = Mnist()
    training_func = DocTrainingFunc(train_dataloader)
    evaluations = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    evaluator = TorchEvaluator(
        training_func, optimizer, training_step, evaluating_func=counted(make_evaluating_func(test_dataloader), evaluations)
    )
    quantizer = PtqQuantizer(model, PTQ_EXAMPLE_CONFIG, evaluator, **options)
    return model, quantizer, training_func, optimizer, evaluations, make_evaluating_func(test_dataloader), train_dataloader


def test_ptq_example_trains_the_untrained_model_while_tracking_running_extremes():
    model, quantizer, training_func, optimizer, evaluations, evaluating_model, train_dataloader = ptq_example_setup()
    untrained_accuracy = evaluating_model(model)
    seen = []
    record_conv2(model, seen)

    model_after, calibration_config = quantizer.compress(None, 3)

    assert model_after is model
    assert [(c["optimizers"], c["max_steps"], c["max_epochs"], c["steps"]) for c in training_func.calls] == [
        (optimizer, None, 3, 3 * len(train_dataloader))
    ]
    assert len(evaluations) == 1  # NNI evaluates once after the loop (ptq_quantizer.py:113): calibration data too
    assert len(seen) > 3 * len(train_dataloader)  # the evaluation's forwards were tracked too
    assert {name: set(targets) for name, targets in calibration_config.items()} == EXPECTED_TARGETS
    for targets in calibration_config.values():
        for entry in targets.values():
            check_entry(entry, shape=())
    # running extremes over every forward, not a moving average
    conv2 = calibration_config["conv2"]
    assert torch.equal(conv2["_input_0"]["tracked_min"], torch.stack([s[0] for s in seen]).min())
    assert torch.equal(conv2["_input_0"]["tracked_max"], torch.stack([s[1] for s in seen]).max())
    assert torch.equal(conv2["weight"]["tracked_min"], torch.stack([s[2] for s in seen]).min())
    assert torch.equal(conv2["weight"]["tracked_max"], torch.stack([s[3] for s in seen]).max())
    # the loop trained the float model, as in NNI: the quantized model is accurate
    assert untrained_accuracy < 0.3
    assert evaluating_model(model) > 0.85
    assert quantizer.evaluator.evaluate() == evaluating_model(model)


def test_calibrate_only_puts_the_weights_and_the_optimizer_state_back():
    model, quantizer, training_func, optimizer, _, evaluating_model, _ = ptq_example_setup(calibrate_only=True)

    def float_state():  # the model's own parameters and BatchNorm statistics (not quantrain's buffers)
        return {**dict(model.named_parameters()), **dict(model.batchnorm1.named_buffers(prefix="batchnorm1"))}

    before = {key: value.detach().clone() for key, value in float_state().items()}
    untrained_accuracy = evaluating_model(model)
    _, calibration_config = quantizer.compress(None, 1)

    assert training_func.calls[0]["steps"] > 0
    assert set(float_state()) == set(before)
    for key, value in float_state().items():
        assert torch.equal(value, before[key]), key
    assert optimizer.state_dict()["state"] == {}  # no momentum buffer survived the loop
    conv2_weight = calibration_config["conv2"]["weight"]
    assert torch.equal(conv2_weight["tracked_min"], model.conv2.weight.detach().min())
    assert torch.equal(conv2_weight["tracked_max"], model.conv2.weight.detach().max())
    check_entry(conv2_weight, shape=())
    assert abs(evaluating_model(model) - untrained_accuracy) < 0.1


@functools.cache
def linear_ptq(**options):
    """A pre-trained Net, PTQ of its Linear layers through one training epoch (a run is deterministic; the tests
    below only read the results, so each variant runs once)."""
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders()
    model = pretrained(Net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    evaluating_func = make_evaluating_func(test_dataloader)
    evaluator = TorchEvaluator(DocTrainingFunc(train_dataloader), optimizer, training_step, evaluating_func=evaluating_func)
    config_list = [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight", "_output_"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
        }
    ]
    quantizer = PtqQuantizer(model, config_list, evaluator, **options)
    _, calibration_config = quantizer.compress(None, 1)
    return model, calibration_config, evaluating_func


def test_is_bias_correction_moves_the_biases_and_recalibrates():
    plain, plain_config, evaluating_func = linear_ptq()
    corrected, corrected_config, _ = linear_ptq(is_bias_correction=True)
    spelled, _, _ = linear_ptq(bias_correction=True)

    for name in ("fc1", "fc2"):
        plain_layer, corrected_layer = getattr(plain, name), getattr(corrected, name)
        assert torch.equal(plain_layer.weight, corrected_layer.weight)  # the same training
        shift = corrected_layer.bias.detach() - plain_layer.bias.detach()
        assert 0 < shift.abs().max() < 0.05, name
        assert torch.equal(getattr(spelled, name).bias, corrected_layer.bias)  # both spellings do the same
        # evaluated once more after the correction: the ranges only widened, and the scales follow them
        for target_name in ("_input_0", "weight", "_output_0"):
            before, after = plain_config[name][target_name], corrected_config[name][target_name]
            assert torch.all(after["tracked_min"] <= before["tracked_min"]), (name, target_name)
            assert torch.all(after["tracked_max"] >= before["tracked_max"]), (name, target_name)
            check_entry(after, shape=())
    assert evaluating_func(corrected) >= evaluating_func(plain) - 0.01


def test_the_bias_shift_is_the_mean_output_shift_of_the_weight_rounding():
    """NNI takes the mean of float minus quantized output, its output quantizer included (its wrapper.py:404-441);
    quantrain corrects what the bias can absorb, the shift of the weight rounding alone (docs/migrating_from_nni.md)."""
    plain, plain_config, evaluating_func = linear_ptq()
    corrected, _, _ = linear_ptq(is_bias_correction=True)
    seen = []
    handle = plain.fc2.register_forward_hook(lambda module, args, output: seen.append((args[0].detach(), output.detach())))
    evaluating_func(plain)  # the quantized model before correction, on the evaluation data
    handle.remove()
    x = torch.cat([s[0] for s in seen])
    entries = plain_config["fc2"]
    weight = plain.fc2.weight.detach()
    weight_shift = F.linear(fake_quantize(x, entries["_input_0"]), weight - fake_quantize(weight, entries["weight"])).mean(0)
    assert weight_shift.abs().max() > 1e-3
    torch.testing.assert_close(corrected.fc2.bias.detach() - plain.fc2.bias.detach(), weight_shift, rtol=0, atol=2e-6)


def test_without_evaluating_func_the_training_forwards_calibrate():
    torch.manual_seed(0)
    train_dataloader, _ = digits_loaders(train_size=256)
    model = Net()
    training_func = DocTrainingFunc(train_dataloader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    evaluator = TorchEvaluator(training_func, optimizer, training_step)
    config_list = [{"op_names": ["fc1"], "target_names": ["_input_", "weight"], "quant_dtype": "uint8", "quant_scheme": "affine"}]
    _, calibration_config = PtqQuantizer(model, config_list, evaluator).compress(5, None)

    assert [(c["max_steps"], c["max_epochs"], c["steps"]) for c in training_func.calls] == [(5, None, 5)]
    assert list(calibration_config) == ["fc1"]
    for entry in calibration_config["fc1"].values():
        check_entry(entry, "uint8", "affine", ())
    assert calibration_config["fc1"]["_input_0"]["tracked_min"].item() == 0.0  # fc1 reads ReLU outputs
