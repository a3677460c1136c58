"""NNI 3.0's quantization quick start (``docs/source/tutorials/quantization_quick_start.py``), step by step.

The tutorial's ``Mnist`` model (ReLU6 and max-pooling modules, ``batchnorm1`` after ``conv1``), scaled to scikit-learn's
8x8 digits: pre-train in float with its ``training_model``, then build a ``TorchEvaluator`` from a new SGD optimizer,
write its two-entry config_list (conv/fc input, weight and output; the ReLU6 outputs), create
``QATQuantizer(model, config_list, evaluator, len(train_dataloader))``, call ``track_forward`` on a real batch, run
``compress(None, max_epochs=...)``, read the calibration_config and evaluate. The module-fusion page's variant
(``fuse_names=[("conv1", "batchnorm1")]``) runs the same way.
"""

from __future__ import annotations

import torch
from nni_style_common import (
    Mnist,
    check_entry,
    digits_loaders,
    example_training_model,
    make_evaluating_func,
    pretrained,
    quant_range,
    training_step,
)
from torch.optim import SGD

from quantrain import QATQuantizer, TorchEvaluator

CONFIG_LIST = [
    {
        "op_names": ["conv1", "conv2", "fc1", "fc2"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
    {
        "op_names": ["relu1", "relu2", "relu3"],
        "target_names": ["_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
]


def on_grid(values: torch.Tensor, entry: dict) -> bool:
    """Whether ``values`` are exactly representable with the entry's scale and zero point (fake-quantized values)."""
    qmin, qmax = quant_range(entry["quant_dtype"])
    levels = values / entry["scale"] + entry["zero_point"]
    in_range = (levels >= qmin - 1e-3) & (levels <= qmax + 1e-3)
    return bool(torch.allclose(levels, levels.round(), atol=1e-3)) and bool(in_range.all())


def test_quick_start_tutorial_on_digits():
    train_dataloader, test_dataloader = digits_loaders()
    evaluating_model = make_evaluating_func(test_dataloader)
    model = pretrained(Mnist)  # the tutorial's "pre-train and evaluate the model" section
    float_accuracy = evaluating_model(model)
    assert float_accuracy > 0.9

    calls = []
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    evaluator = TorchEvaluator(example_training_model(train_dataloader, calls), optimizer, training_step)
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator, len(train_dataloader))
    real_input = next(iter(train_dataloader))[0]
    quantizer.track_forward(real_input)
    _, calibration_config = quantizer.compress(None, max_epochs=2)

    assert calls == [(optimizer, None, None, 2)]
    assert quantizer.current_step == 2 * len(train_dataloader)
    # the tutorial prints calibration_config: {module: {target: {'scale': ..., 'zero_point': ..., ...}}}
    lines = []
    for module_name, targets in calibration_config.items():
        for target_name, info in targets.items():
            scale, zero_point = info["scale"].item(), info["zero_point"].item()
            lines.append(f"{module_name}.{target_name}: scale={scale:.6f} zero_point={zero_point:.0f}")
    assert len(lines) == 4 * 3 + 3
    assert set(calibration_config) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}  # no batchnorm1
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert set(calibration_config[name]) == {"_input_0", "weight", "_output_0"}
    for name in ("relu1", "relu2", "relu3"):
        assert set(calibration_config[name]) == {"_output_0"}
        relu = calibration_config[name]["_output_0"]
        assert relu["tracked_min"].item() == 0.0  # ReLU6 outputs: every batch has zeros
        assert 0.0 < relu["tracked_max"].item() <= 6.0
    for targets in calibration_config.values():
        for entry in targets.values():
            check_entry(entry, shape=())
    # the pixels are in [0, 1]: the tracked input range of conv1 is within it
    conv1_input = calibration_config["conv1"]["_input_0"]
    assert conv1_input["tracked_min"].item() >= 0.0
    assert conv1_input["tracked_max"].item() <= 1.0

    # the tutorial's "quantization evaluating": the eval-mode model is really fake-quantized, and as accurate
    outputs = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda module, args, output, name=name: outputs.setdefault(name, output))
        for name in ("fc2", "relu3")
    ]
    accuracy = evaluating_model(model)
    for handle in handles:
        handle.remove()
    assert on_grid(outputs["fc2"], calibration_config["fc2"]["_output_0"])
    assert on_grid(outputs["relu3"], calibration_config["relu3"]["_output_0"])
    assert accuracy >= float_accuracy - 0.03


def test_module_fusion_page_config_folds_batchnorm1_into_conv1():
    train_dataloader, test_dataloader = digits_loaders()
    evaluating_model = make_evaluating_func(test_dataloader)
    model = pretrained(Mnist)
    float_accuracy = evaluating_model(model)
    calls = []
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    evaluator = TorchEvaluator(example_training_model(train_dataloader, calls), optimizer, training_step)
    config_list = [
        {
            "target_names": ["_input_", "weight", "_output_"],
            "op_names": ["conv1"],
            "quant_dtype": "int8",
            "quant_scheme": "affine",
            "granularity": "default",
            "fuse_names": [("conv1", "batchnorm1")],
        }
    ]
    bn_weight = model.batchnorm1.weight
    quantizer = QATQuantizer(model, config_list, evaluator, len(train_dataloader))
    quantizer.track_forward(next(iter(train_dataloader))[0])
    _, calibration_config = quantizer.compress(None, max_epochs=2)

    assert quantizer.current_step == 2 * len(train_dataloader)
    assert list(calibration_config) == ["conv1"]
    assert set(calibration_config["conv1"]) == {"_input_0", "weight", "_output_0"}
    for entry in calibration_config["conv1"].values():
        check_entry(entry, shape=())
    assert model.batchnorm1.weight is bn_weight  # the BatchNorm's Parameters are still there (and trained)
    assert evaluating_model(model) >= float_accuracy - 0.03
