"""``from_compressor`` chains as NNI 3.0's fusion-compression page and quantizer docs write them.

``QATQuantizer.from_compressor(ptq, config_list, quant_start_step, evaluator)`` after a ``PtqQuantizer`` (calibrate,
then fine-tune with QAT from the calibrated ranges) and QAT -> QAT, with NNI's positional arguments. NNI documents
(``docs/source/compression/fusion_compress.rst``) that the new compressor reuses the existing wrappers and keeps the
preceding compression logic, and that an evaluator passed to ``from_compressor`` is ignored when the earlier
compressor already has one; quantrain uses the evaluator it is given (a deliberate difference, listed in
docs/migrating_from_nni.md), which the test of that says.

One more difference is not marked: given the same config_list, NNI ignores the targets the new quantizer configures
again ("have already configured, the new config will be ignored", nni/compression/base/wrapper.py:209-214), so after
PTQ -> QAT the PTQ logic keeps tracking running extremes during the QAT training; quantrain hands the calibrated
ranges to the QAT quantizer, whose moving average continues from them (its documented ``from_compressor``), which is
what the first test checks.

The fusion example (``examples/compression/fusion/pqd_fuse.py``) then reads the quantizer's calibration_config after
``unwrap_model()`` and simulates the quantization on another model with a new quantizer and
``update_calibration_config``.
"""

from __future__ import annotations

import torch
from nni_style_common import (
    DocTrainingFunc,
    Net,
    check_entry,
    digits_loaders,
    ema,
    make_evaluating_func,
    pretrained,
    training_step,
)

from quantrain import PtqQuantizer, QATQuantizer, TorchEvaluator

CONFIG_LIST = [
    {
        "op_names": ["fc1", "fc2"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
    }
]


def setup(train_size=None, model=None):
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders(train_size)
    model = model if model is not None else Net()
    training_func = DocTrainingFunc(train_dataloader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, evaluating_func=make_evaluating_func(test_dataloader))
    return model, evaluator, training_func, make_evaluating_func(test_dataloader)


def snapshot(calibration_config):
    return {
        (name, target): {key: value.clone() for key, value in entry.items() if isinstance(value, torch.Tensor)}
        for name, targets in calibration_config.items()
        for target, entry in targets.items()
    }


def test_ptq_then_qat_from_compressor_fine_tunes_from_the_calibrated_ranges():
    model, evaluator, training_func, evaluating_model = setup(model=pretrained(Net))
    float_accuracy = evaluating_model(model)
    parameters = {name: id(p) for name, p in model.named_parameters()}
    ptq = PtqQuantizer(model, CONFIG_LIST, evaluator)
    _, ptq_config = ptq.compress(None, 1)
    calibrated = snapshot(ptq_config)

    # NNI's positional arguments: (compressor, new_config_list, quant_start_step, evaluator)
    qat = QATQuantizer.from_compressor(ptq, CONFIG_LIST, 2, None)
    assert qat.evaluator is evaluator  # the earlier quantizer's evaluator
    assert qat.current_step == 0
    assert qat.bound_model is model
    for key, entry in snapshot(qat.get_calibration_config()).items():  # the calibration carries over unchanged
        for name, value in entry.items():
            assert torch.equal(value, calibrated[key][name]), (key, name)

    seen = []
    model.fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().min()) if module.training else None)
    _, qat_config = qat.compress(6, None)

    assert qat.current_step == 6
    assert [call["max_steps"] for call in training_func.calls] == [None, 6]
    assert {name: id(p) for name, p in model.named_parameters()} == parameters
    assert set(qat_config) == {"fc1", "fc2"}
    for targets in qat_config.values():
        assert set(targets) == {"_input_0", "weight", "_output_0"}
        for entry in targets.values():
            check_entry(entry, shape=())
    # the moving average starts from PTQ's calibrated minimum (quantrain's continuation: see the module docstring)
    ptq_min = calibrated[("fc1", "_input_0")]["tracked_min"]
    torch.testing.assert_close(qat_config["fc1"]["_input_0"]["tracked_min"], ema([ptq_min, *seen]))
    assert evaluating_model(model) >= float_accuracy - 0.03


def test_qat_then_qat_from_compressor_continues_training():
    model, evaluator, training_func, _ = setup(train_size=256)
    first = QATQuantizer(model, CONFIG_LIST, evaluator)
    _, first_config = first.compress(4, None)
    carried = snapshot(first_config)

    second = QATQuantizer.from_compressor(first, CONFIG_LIST, 0, None)
    for key, entry in snapshot(second.get_calibration_config()).items():
        for name, value in entry.items():
            assert torch.equal(value, carried[key][name]), (key, name)
    _, second_config = second.compress(None, 1)

    assert second.current_step == 4  # one epoch of 4 batches, counted by the new quantizer from 0
    assert [(call["max_steps"], call["max_epochs"], call["steps"]) for call in training_func.calls] == [
        (4, None, 4),
        (None, 1, 4),
    ]
    assert set(second_config) == {"fc1", "fc2"}
    for targets in second_config.values():
        for entry in targets.values():
            check_entry(entry, shape=())


def test_an_evaluator_passed_to_from_compressor_is_used():
    """NNI keeps the earlier compressor's evaluator and ignores this one with a warning (its compressor.py:85-87);
    quantrain uses the evaluator the call names, as the migration guide says."""
    model, evaluator, training_func, _ = setup(train_size=256)
    ptq = PtqQuantizer(model, CONFIG_LIST, evaluator)
    ptq.compress(2, None)
    other_func = DocTrainingFunc(digits_loaders(256)[0])
    other = TorchEvaluator(other_func, torch.optim.SGD(model.parameters(), lr=0.01), training_step)

    qat = QATQuantizer.from_compressor(ptq, CONFIG_LIST, 0, other)
    qat.compress(3, None)
    assert qat.evaluator is other
    assert [call["max_steps"] for call in training_func.calls] == [2]
    assert [call["max_steps"] for call in other_func.calls] == [3]


def test_targets_of_the_earlier_quantizer_stay_quantized_after_from_compressor():
    model, evaluator, _, _ = setup(train_size=256)
    ptq = PtqQuantizer(model, CONFIG_LIST, evaluator)
    _, ptq_config = ptq.compress(2, None)
    qat = QATQuantizer.from_compressor(ptq, [{**CONFIG_LIST[0], "op_names": ["fc1"]}])
    _, calibration_config = qat.compress(3, None)
    assert set(calibration_config) == {"fc1", "fc2"}
    assert set(calibration_config["fc2"]) == set(ptq_config["fc2"])
    for entry in calibration_config["fc2"].values():
        check_entry(entry, shape=())


def test_update_calibration_config_simulates_the_quantization_on_another_model():
    model, evaluator, _, evaluating_model = setup(train_size=256)
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator)
    _, calibration_config = quantizer.compress(5, None)

    other = Net()
    other.load_state_dict(dict(model.named_parameters()))  # the trained float weights (Net has no buffers)
    sim_quantizer = QATQuantizer(other, CONFIG_LIST)
    sim_quantizer.update_calibration_config(calibration_config)

    x = digits_loaders()[1].dataset.tensors[0][:100]
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    assert evaluating_model(other) == evaluating_model(model)
    for key, entry in snapshot(sim_quantizer.get_calibration_config()).items():
        for name in ("scale", "zero_point"):
            assert torch.equal(entry[name], calibration_config[key[0]][key[1]][name]), (key, name)


def test_the_calibration_config_can_be_read_after_unwrap_model():
    model, evaluator, _, _ = setup(train_size=256)
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator)
    _, calibration_config = quantizer.compress(3, None)
    quantizer.unwrap_model()
    after = quantizer.get_calibration_config()
    assert snapshot(after).keys() == snapshot(calibration_config).keys()
    for key, entry in snapshot(after).items():
        assert torch.equal(entry["scale"], calibration_config[key[0]][key[1]]["scale"]), key
