"""PtqQuantizer: running-extreme calibration, compress(), the evaluator as a data feeder, and the hand-over to QAT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import IN_W_OUT, QMAX, QMIN, reference_fake_quant, reference_qparams
from quantrain import PtqQuantizer, QATQuantizer, TorchEvaluator
from quantrain.wrapping import is_quantized

WEIGHT = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
BIAS = torch.tensor([0.25, -0.5])
# Hand-made batches. With WEIGHT and zero bias the Linear's output rows are [x0 - 2 x1, 0.5 x0 + 3 x1]:
#   batch 0 -> [[1, 0.5], [2, -3]]; batch 1 -> [[-1, -0.5], [-4, 6]]; batch 2 -> [[-0.5, 1.75], [0.25, 0.125]]
BATCHES = [
    torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
    torch.tensor([[-1.0, 0.0], [0.0, 2.0]]),
    torch.tensor([[0.5, 0.5], [0.25, 0.0]]),
]


def _linear(bias=None):
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(WEIGHT)
        model[0].bias.copy_(torch.zeros(2) if bias is None else bias)
    return model


def _calibrated(config=IN_W_OUT, bias=None):
    model = _linear(bias)
    ptq = PtqQuantizer(model, config)
    for x in BATCHES:
        ptq.track_forward(x)
    return model, ptq


def _qstate(fq):
    return [fq.observer.tracked_min.clone(), fq.observer.tracked_max.clone(), fq.scale.clone(), fq.zero_point.clone()]


# ---- ranges -----------------------------------------------------------------------------------------------------


def test_per_tensor_ranges_are_the_running_extremes_not_a_moving_average():
    model, _ = _calibrated()
    fq = model[0].fake_quant
    # input: batch ranges (-1, 1), (-1, 2), (0, 0.5) -> (-1, 2); output: (-3, 2), (-4, 6), (-0.5, 1.75) -> (-4, 6)
    for name, lo, hi in (("_input_0", -1.0, 2.0), ("_output_0", -4.0, 6.0), ("weight", -2.0, 3.0)):
        assert torch.equal(fq[name].observer.tracked_min, torch.tensor(lo)), name
        assert torch.equal(fq[name].observer.tracked_max, torch.tensor(hi)), name


def test_per_channel_ranges_are_the_running_extremes():
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["weight", "_output_"],
            "target_settings": {"weight": {"granularity": "out_channel"}, "_output_": {"granularity": "per_channel"}},
        }
    ]
    model, _ = _calibrated(config)
    weight, output = model[0].fake_quant["weight"].observer, model[0].fake_quant["_output_0"].observer
    assert torch.equal(weight.tracked_min, torch.tensor([[-2.0], [0.5]]))
    assert torch.equal(weight.tracked_max, torch.tensor([[1.0], [3.0]]))
    # output channel 0: 1, 2 | -1, -4 | -0.5, 0.25; channel 1: 0.5, -3 | -0.5, 6 | 1.75, 0.125
    assert torch.equal(output.tracked_min, torch.tensor([[-4.0, -3.0]]))
    assert torch.equal(output.tracked_max, torch.tensor([[2.0, 6.0]]))


# ---- compress ---------------------------------------------------------------------------------------------------


def test_float_before_compress_then_reference_fake_quant_after():
    model, ptq = _calibrated(bias=BIAS)
    x = torch.tensor([[0.3, -0.7], [1.9, 0.05], [-0.9, 0.6]])  # inside the calibrated input range
    for mode in (False, True):
        assert torch.equal(model.train(mode)(x), F.linear(x, WEIGHT, BIAS)), mode
    assert ptq.get_calibration_config() == {}  # no scale before compress
    assert not ptq.is_compressed
    _, config = ptq.compress()
    assert ptq.is_compressed
    fq = model[0].fake_quant
    # with bias [0.25, -0.5] the batch outputs shift per channel: -4 -> -3.75 and 6 -> 5.5
    ranges = {"_input_0": (-1.0, 2.0), "weight": (-2.0, 3.0), "_output_0": (-3.75, 5.5)}
    q = {}
    for name, (lo, hi) in ranges.items():
        assert torch.equal(fq[name].observer.tracked_min, torch.tensor(lo)), name
        assert torch.equal(fq[name].observer.tracked_max, torch.tensor(hi)), name
        scale, zp = reference_qparams(torch.tensor(lo), torch.tensor(hi), QMIN, QMAX, symmetric=False)
        assert torch.equal(fq[name].scale, scale) and torch.equal(fq[name].zero_point, zp), name
        assert torch.equal(config["0"][name]["scale"], scale) and torch.equal(config["0"][name]["zero_point"], zp)
        q[name] = (scale, zp)
    # by hand: the weight's range (-2, 3) gives scale 5/254 and zero point -127 - round(-2 / (5/254)) = -25
    assert q["weight"][1].item() == -25.0 and abs(q["weight"][0].item() - 5 / 254) < 1e-9
    x_hat = reference_fake_quant(x, *q["_input_0"], QMIN, QMAX)
    w_hat = reference_fake_quant(WEIGHT, *q["weight"], QMIN, QMAX)
    expected = reference_fake_quant(F.linear(x_hat, w_hat, BIAS), *q["_output_0"], QMIN, QMAX)
    for mode in (True, False):
        out = model.train(mode)(x)
        assert torch.equal(out, expected), mode
        assert not torch.equal(out, F.linear(x, WEIGHT, BIAS))


def test_symmetric_per_channel_scales_follow_the_reference_formula():
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["weight", "_output_"],
            "quant_dtype": "uint8",
            "target_settings": {
                "weight": {"granularity": "out_channel", "quant_dtype": "int4"},
                "_output_": {"granularity": "per_channel"},
            },
        }
    ]
    _, ptq = _calibrated(config)
    _, config = ptq.compress()
    weight, output = config["0"]["weight"], config["0"]["_output_0"]
    # int4 symmetric per row: max(|lo|, |hi|) / 7 -> [2/7, 3/7]; uint8 symmetric per channel: [4/127.5, 6/127.5]
    assert torch.equal(weight["scale"], torch.tensor([[2.0], [3.0]]) / 7.0)
    assert torch.equal(weight["zero_point"], torch.zeros(2, 1))
    assert torch.equal(output["scale"], torch.tensor([[4.0, 6.0]]) / 127.5)
    assert torch.equal(output["zero_point"], torch.full((1, 2), 128.0))


def test_track_forward_works_in_eval_mode_and_keeps_the_mode():
    model = _linear()
    ptq = PtqQuantizer(model, IN_W_OUT)
    model.eval()
    for x in BATCHES:
        ptq.track_forward(x)
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(model[0].fake_quant["_output_0"].observer.tracked_max, torch.tensor(6.0))
    assert torch.equal(model[0].fake_quant["_input_0"].observer.tracked_min, torch.tensor(-1.0))
    ptq.compress()
    assert not model.training


def test_compress_without_calibration_names_the_uncalibrated_targets():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    ptq = PtqQuantizer(model, [{"op_names": ["0"], "target_names": ["weight", "_output_"]}])
    with pytest.raises(ValueError, match="no calibration data") as error:
        ptq.compress()
    assert "0.weight" in str(error.value) and "0._output_0" in str(error.value)
    assert not ptq.is_compressed
    assert torch.equal(model[0].fake_quant["weight"].fake_quant_enabled, torch.tensor(0, dtype=torch.uint8))


def test_compress_with_a_budget_but_no_evaluator_is_refused():
    model, ptq = _calibrated()
    with pytest.raises(ValueError, match="evaluator"):
        ptq.compress(max_steps=1)
    assert not ptq.is_compressed
    x = torch.tensor([[4.0, -3.0]])
    assert torch.equal(model.eval()(x), F.linear(x, WEIGHT, torch.zeros(2)))  # still float, not quantized


def test_ranges_stay_fixed_after_compress_in_train_and_eval_mode():
    model, ptq = _calibrated()
    ptq.compress()
    fqs = dict(model[0].fake_quant.items())
    before = {name: _qstate(fq) for name, fq in fqs.items()}
    big = torch.tensor([[50.0, -80.0], [-30.0, 20.0]])
    model.train()(big)
    model.eval()(big * 2)
    ptq.track_forward(big * 3)
    for name, fq in fqs.items():
        for old, new in zip(before[name], _qstate(fq), strict=True):
            assert torch.equal(old, new), name
    assert torch.equal(fqs["_input_0"].observer.tracked_max, torch.tensor(2.0))


# ---- compress through an evaluator -----------------------------------------------------------------------------


def _bn_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _user_state(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "fake_quant" not in k and "fusion" not in k and "quantrain_step" not in k
    }


def _compress_through_a_loop(evaluate_in_eval_mode, calibrate_only=True):
    """PTQ on Linear-BN-ReLU-Linear through a TorchEvaluator whose loop really trains (SGD lr=0.5, momentum)."""
    model = _bn_model()
    generator = torch.Generator().manual_seed(4)
    train_batches = [torch.rand(8, 3, generator=generator) * 2 - 1 for _ in range(3)]
    train_batches[1][2, 1] = -5.0  # the smallest input value of all
    train_batches[2][0, 0] = 7.0  # the largest input value while training
    eval_batch = torch.zeros(4, 3)
    eval_batch[3, 2] = 9.0  # larger still: only evaluating_func sees it
    targets = torch.randn(8, 2, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    run = {"train": [], "eval": 0}

    def training_step(batch, model):
        return F.mse_loss(model(batch), targets)

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        run["train"].append((max_steps, max_epochs))
        weight = model[0].weight.detach().clone()
        for batch in train_batches[:max_steps]:
            optimizers.zero_grad()
            training_step(batch, model).backward()
            optimizers.step()
        run["trained"] = not torch.equal(weight, model[0].weight)
        run["bn_batches"] = model[1].num_batches_tracked.item()

    def evaluating_func(model):
        run["eval"] += 1
        if evaluate_in_eval_mode:
            model.eval()
        result = float(model(eval_batch).sum())
        model.train()
        return {"default": result}

    # one real step first, so the optimizer has momentum buffers to preserve
    training_step(train_batches[0], model).backward()
    optimizer.step()
    optimizer.zero_grad()
    evaluator = TorchEvaluator(training_func, optimizer, training_step, evaluating_func=evaluating_func)
    ptq = PtqQuantizer(model, [{"op_types": ["Linear"]}], evaluator, calibrate_only=calibrate_only)
    run["user_before"] = _user_state(model)
    run["optimizer_before"] = copy.deepcopy(optimizer.state_dict())
    assert run["optimizer_before"]["state"]  # momentum buffers exist
    _, run["config"] = ptq.compress(max_steps=3)
    run.update(model=model, ptq=ptq, optimizer=optimizer, user_after=_user_state(model))
    return run


def _assert_user_state_unchanged(run):
    before, after = run["user_before"], run["user_after"]
    assert before.keys() == after.keys() and {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_calibrate_only_runs_the_training_loop_as_a_data_feeder_and_changes_nothing():
    run = _compress_through_a_loop(evaluate_in_eval_mode=True)
    assert run["train"] == [(3, None)] and run["eval"] == 1
    assert run["trained"] and run["bn_batches"] == 1 + 3  # the loop really trained and moved BN
    _assert_user_state_unchanged(run)
    optimizer_before, optimizer_after = run["optimizer_before"], run["optimizer"].state_dict()
    assert optimizer_after["param_groups"] == optimizer_before["param_groups"]
    assert optimizer_after["state"].keys() == optimizer_before["state"].keys()
    for index, state in optimizer_before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, optimizer_after["state"][index][key]), (index, key)
    model, config = run["model"], run["config"]
    assert model.training and model[1].training
    # the input range covers the training batches and the evaluation batch, as running extremes
    entry = config["0"]["_input_0"]
    assert torch.equal(entry["tracked_min"], torch.tensor(-5.0))
    assert torch.equal(entry["tracked_max"], torch.tensor(9.0))
    assert set(config) == {"0", "3"} and set(config["3"]) == {"_input_0", "weight", "bias", "_output_0"}
    assert run["ptq"].is_compressed
    # the weight ranges are those of the restored weights, not of the weights the loop moved through
    for name in ("0", "3"):
        weight = model[int(name)].weight
        assert torch.equal(config[name]["weight"]["tracked_min"], weight.min()), name
        assert torch.equal(config[name]["weight"]["tracked_max"], weight.max()), name


def test_by_default_the_training_loop_trains_as_in_nni_while_ranges_are_tracked():
    run = _compress_through_a_loop(evaluate_in_eval_mode=True, calibrate_only=False)
    assert run["train"] == [(3, None)] and run["eval"] == 1
    assert run["trained"] and run["bn_batches"] == 1 + 3
    before, after = run["user_before"], run["user_after"]
    assert not torch.equal(before["0.weight"], after["0.weight"])  # the user's optimizer really stepped
    assert after["1.num_batches_tracked"].item() == 1 + 3  # and BatchNorm kept its training statistics
    config = run["config"]
    assert torch.equal(config["0"]["_input_0"]["tracked_min"], torch.tensor(-5.0))
    assert torch.equal(config["0"]["_input_0"]["tracked_max"], torch.tensor(9.0))
    # weights are tracked on every forward, as NNI does: the extremes cover the final weights
    weight = run["model"][0].weight
    assert config["0"]["weight"]["tracked_min"] <= weight.min() and config["0"]["weight"]["tracked_max"] >= weight.max()


def test_compress_leaves_batchnorm_statistics_even_if_evaluating_func_runs_in_training_mode():
    run = _compress_through_a_loop(evaluate_in_eval_mode=False)
    assert run["eval"] == 1 and torch.equal(run["config"]["0"]["_input_0"]["tracked_max"], torch.tensor(9.0))
    _assert_user_state_unchanged(run)
    trained = _compress_through_a_loop(evaluate_in_eval_mode=False, calibrate_only=False)
    assert trained["user_after"]["1.num_batches_tracked"].item() == 1 + 3  # the evaluation did not add a batch


# ---- calibration_config -----------------------------------------------------------------------------------------


def test_calibration_config_has_the_reference_shape():
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["weight", "_output_"],
            "quant_scheme": "affine",
            "target_settings": {"weight": {"granularity": "out_channel", "quant_dtype": "uint4"}},
        }
    ]
    _, ptq = _calibrated(config)
    _, calibration = ptq.compress()
    assert set(calibration) == {"0"} and set(calibration["0"]) == {"weight", "_output_0"}
    keys = {"scale", "zero_point", "quant_dtype", "quant_scheme", "quant_bits", "tracked_min", "tracked_max"}
    weight, output = calibration["0"]["weight"], calibration["0"]["_output_0"]
    assert set(weight) == keys and set(output) == keys
    assert (weight["quant_dtype"], weight["quant_bits"], weight["quant_scheme"]) == ("uint4", 4, "affine")
    assert (output["quant_dtype"], output["quant_bits"], output["quant_scheme"]) == ("int8", 8, "affine")
    assert weight["scale"].shape == (2, 1) and output["scale"].dim() == 0
    for entry in (weight, output):
        for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
            assert entry[key].device.type == "cpu" and entry[key].dtype == torch.float32, key
    # uint4 affine rows: (-2, 1) -> scale 3/15, zp 0 - round(-2 / 0.2) = 10; (0, 3) (widened to 0) -> 3/15, 0
    assert torch.equal(weight["scale"], torch.tensor([[3.0], [3.0]]) / 15.0)
    assert torch.equal(weight["zero_point"], torch.tensor([[10.0], [0.0]]))
    assert torch.equal(output["tracked_min"], torch.tensor(-4.0)) and torch.equal(output["tracked_max"], torch.tensor(6.0))


# ---- hand-over to QAT ------------------------------------------------------------------------------------------


def test_from_compressor_carries_the_calibration_and_continues_with_ema():
    model, ptq = _calibrated()
    ptq.compress()
    old_fqs = dict(model[0].fake_quant.items())
    carried = {name: _qstate(fq) for name, fq in old_fqs.items()}
    qat = QATQuantizer.from_compressor(ptq, IN_W_OUT)
    assert qat.quantized_modules == {"0": model[0]}
    new_fqs = dict(model[0].fake_quant.items())
    assert set(new_fqs) == set(old_fqs)
    for name, fq in new_fqs.items():
        assert fq is not old_fqs[name]  # the new quantizer's own
        for old, new in zip(carried[name], _qstate(fq), strict=True):
            assert torch.equal(old, new), name
        assert fq.is_calibrated
    assert ptq.quantized_modules == {}
    with pytest.raises(RuntimeError, match="unwrapped"):
        ptq.compress()
    assert qat.evaluator is None

    x = torch.tensor([[4.0, -3.0], [0.5, 1.0]])  # range (-3, 4)
    model.train()(x)
    observer = new_fqs["_input_0"].observer
    expected_max = torch.tensor(2.0) * 0.99 + (1 - 0.99) * torch.tensor(4.0)  # 2.02
    expected_min = torch.tensor(-1.0) * 0.99 + (1 - 0.99) * torch.tensor(-3.0)  # -1.02
    assert torch.equal(observer.tracked_max, expected_max)
    assert torch.equal(observer.tracked_min, expected_min)
    assert abs(observer.tracked_max.item() - 2.02) < 1e-6
    scale, zp = reference_qparams(expected_min, expected_max, QMIN, QMAX, symmetric=False)
    assert torch.equal(new_fqs["_input_0"].scale, scale) and torch.equal(new_fqs["_input_0"].zero_point, zp)


@pytest.mark.parametrize("override", [None, {"fuse": None}])
def test_from_compressor_keeps_batchnorm_folded_unless_told_otherwise(override):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    config = [{"op_types": ["Conv2d"], "target_names": ["weight", "_output_"], "quant_dtype": "int8"}]
    ptq = PtqQuantizer(model, config, fuse="auto", example_inputs=torch.zeros(1, 1, 6, 6))
    ptq.track_forward(torch.randn(8, 1, 6, 6))
    ptq.compress()
    folded_scale = model[0].fake_quant["weight"].scale.clone()
    qat = QATQuantizer.from_compressor(ptq, config, **(override or {}))
    if override is None:  # still folded: the folded weight's range carries over to the same folded weight
        assert qat.fuse == "auto" and [f.group for f in qat.fusions()] == [("0", "1", "2")]
        assert torch.equal(model[0].fake_quant["weight"].scale, folded_scale)
    else:
        assert qat.fuse is None and list(qat.fusions()) == []


def test_from_compressor_does_not_carry_a_target_whose_settings_changed():
    model, ptq = _calibrated()
    ptq.compress()
    new_config = [
        {"op_types": ["Linear"], "target_names": ["_input_"], "quant_dtype": "int4", "quant_scheme": "affine"},
        {"op_types": ["Linear"], "target_names": ["weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"},
    ]
    QATQuantizer.from_compressor(ptq, new_config)
    fq_in, fq_out = model[0].fake_quant["_input_0"], model[0].fake_quant["_output_0"]
    assert not fq_in.is_calibrated and not fq_in.observer.is_seeded
    assert fq_out.is_calibrated and torch.equal(fq_out.observer.tracked_max, torch.tensor(6.0))
    x = torch.tensor([[4.0, -3.0], [0.5, 1.0]])
    model.train()(x)
    assert torch.equal(fq_in.observer.tracked_min, torch.tensor(-3.0))  # seeded by this batch alone
    assert torch.equal(fq_in.observer.tracked_max, torch.tensor(4.0))
    scale, zp = reference_qparams(torch.tensor(-3.0), torch.tensor(4.0), -7, 7, symmetric=False)
    assert torch.equal(fq_in.scale, scale) and torch.equal(fq_in.zero_point, zp)
    # the output target was carried: a moving average from 6 towards this batch's maximum (about 10), not a reseed
    assert 6.0 < fq_out.observer.tracked_max.item() < 6.1


def _assert_ptq_intact(model, ptq, fqs, calibration):
    assert ptq.quantized_modules == {"0": model[0]} and is_quantized(model[0])
    assert dict(model[0].fake_quant.items()) == fqs
    after = ptq.get_calibration_config()
    assert after.keys() == calibration.keys() and after["0"].keys() == calibration["0"].keys()
    for target, entry in calibration["0"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after["0"][target][key]), (target, key)
            else:
                assert value == after["0"][target][key], (target, key)


@pytest.mark.parametrize(
    "bad_config",
    [
        [{"op_names": ["nope"], "target_names": ["weight"]}],
        [{"op_types": ["Linear"], "quant_dtype": "int9x"}],
        [{"op_types": ["Linear"], "target_names": ["no_such_parameter"]}],
    ],
)
def test_from_compressor_with_a_bad_config_leaves_the_ptq_quantizer_alone(bad_config):
    model, ptq = _calibrated()
    _, calibration = ptq.compress()
    fqs = dict(model[0].fake_quant.items())
    with pytest.raises(ValueError, match=r"config_list\[0\]"):
        QATQuantizer.from_compressor(ptq, bad_config)
    _assert_ptq_intact(model, ptq, fqs, calibration)


def _compressed_linear_bn():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ptq = PtqQuantizer(model, IN_W_OUT)
    for x in BATCHES:
        ptq.track_forward(x)
    _, calibration = ptq.compress()
    return model, ptq, dict(model[0].fake_quant.items()), calibration


def test_from_compressor_with_a_bad_fusion_leaves_the_ptq_quantizer_alone():
    model, ptq, fqs, calibration = _compressed_linear_bn()
    bad_config = [  # '1' is folded into '0' and also quantized on its own
        {"op_names": ["0"], "target_names": ["weight"], "fuse_names": [("0", "1")]},
        {"op_names": ["1"], "target_names": ["weight"]},
    ]
    with pytest.raises(ValueError, match="fuse_names"):
        QATQuantizer.from_compressor(ptq, bad_config)
    _assert_ptq_intact(model, ptq, fqs, calibration)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"weight_range": "median"}, ValueError), ({"freeze_range_step": -1}, ValueError), ({"colour": "red"}, TypeError)],
)
def test_from_compressor_with_bad_options_leaves_the_ptq_quantizer_alone(kwargs, error):
    model, ptq, fqs, calibration = _compressed_linear_bn()
    with pytest.raises(error):
        QATQuantizer.from_compressor(ptq, IN_W_OUT, **kwargs)
    _assert_ptq_intact(model, ptq, fqs, calibration)


def test_from_compressor_defaults_to_the_ptq_evaluator_and_trains_with_it():
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []

    def training_step(batch, model):
        return model(batch).pow(2).mean()

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        for batch in BATCHES[:max_steps]:
            optimizers.zero_grad()
            training_step(batch, model).backward()
            optimizers.step()
            steps.append(max_steps)

    evaluator = TorchEvaluator(training_func, optimizer, training_step)
    ptq = PtqQuantizer(model, IN_W_OUT, evaluator, calibrate_only=True)
    ptq.compress(max_steps=2)
    weight = model[0].weight.detach().clone()
    assert torch.equal(weight, WEIGHT)  # PTQ trained nothing
    qat = QATQuantizer.from_compressor(ptq, IN_W_OUT)
    assert qat.evaluator is evaluator
    qat.compress(max_steps=3)
    assert qat.current_step == 3 and steps == [2, 2, 3, 3, 3]
    assert not torch.equal(model[0].weight, WEIGHT)  # QAT does train

    other_model = _linear()
    other = TorchEvaluator(training_func, torch.optim.SGD(other_model.parameters(), lr=0.1), training_step)
    ptq2 = PtqQuantizer(other_model, IN_W_OUT, evaluator=other)
    ptq2.track_forward(BATCHES[0])
    replacement = TorchEvaluator(training_func, torch.optim.SGD(other_model.parameters(), lr=0.1), training_step)
    assert QATQuantizer.from_compressor(ptq2, IN_W_OUT, evaluator=replacement).evaluator is replacement


def test_a_second_compress_calibrates_further_as_in_nni():
    model, ptq = _calibrated()
    _, first = ptq.compress()
    assert ptq.is_bias_correction is False  # NNI's attribute name
    assert torch.equal(first["0"]["_input_0"]["tracked_max"], torch.tensor(2.0))
    ptq.track_forward(torch.tensor([[5.0, 0.0]]))  # observers are off after compress: nothing changes yet
    assert torch.equal(ptq.get_calibration_config()["0"]["_input_0"]["tracked_max"], torch.tensor(2.0))
    evaluator = TorchEvaluator(
        lambda *args: None,
        torch.optim.SGD(model.parameters(), lr=0.1),
        lambda batch, model: model(batch).sum(),
        evaluating_func=lambda m: float(m(torch.tensor([[4.0, -3.0]])).sum()),
    )
    ptq.evaluator = evaluator
    evaluator.bind_model(model)
    _, second = ptq.compress()  # the evaluation sees a wider input: the extremes grow and the scales follow
    entry = second["0"]["_input_0"]
    assert torch.equal(entry["tracked_min"], torch.tensor(-3.0)) and torch.equal(entry["tracked_max"], torch.tensor(4.0))
    scale, zp = reference_qparams(torch.tensor(-3.0), torch.tensor(4.0), QMIN, QMAX, symmetric=False)
    assert torch.equal(entry["scale"], scale) and torch.equal(entry["zero_point"], zp)
    assert all(fq.fake_quant_enabled.item() and not fq.observer_enabled.item() for fq in ptq.fake_quantizers())


def test_from_compressor_keeps_the_earlier_targets_the_new_config_list_leaves_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    both = [
        {
            "op_types": ["Conv2d"],
            "target_names": ["weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "fuse_names": [("0", "1", "2")],
            "target_settings": {"weight": {"quant_dtype": "int4", "granularity": "out_channel"}},
        },
        {"op_types": ["Linear"], "target_names": ["_input_", "weight"], "quant_dtype": "int8"},
    ]
    ptq = PtqQuantizer(model, both)
    ptq.track_forward(torch.randn(8, 1, 6, 6))
    _, calibration = ptq.compress()
    qat = QATQuantizer.from_compressor(ptq, [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int4"}])
    # the conv, its fold and the Linear's input keep the earlier settings and calibration; the Linear's weight is new
    assert [f.group for f in qat.fusions()] == [("0", "1", "2")]
    conv, linear = model[0].fake_quant, model[4].fake_quant
    assert set(conv) == {"weight", "_output_0"} and set(linear) == {"weight", "_input_0"}
    assert (conv["weight"].settings.dtype.name, conv["weight"].settings.granularity.spec) == ("int4", "out_channel")
    assert linear["weight"].settings.dtype.name == "int4" and linear["_input_0"].settings.dtype.name == "int8"
    for target in ("weight", "_output_0"):
        assert torch.equal(conv[target].scale, calibration["0"][target]["scale"]), target
    assert torch.equal(linear["_input_0"].scale, calibration["4"]["_input_0"]["scale"])
    assert not linear["weight"].is_calibrated
    assert len(qat.config_list) == 1 + 2  # the new entry, then one per module with kept targets
