"""The QAT schedule: Schedule's phases and validation, and QATQuantizer's schedule controls on trained models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import IN_W_OUT, QMAX, QMIN, ReferenceTarget, TwoLayer, reference_fake_quant, reference_qparams
from quantrain import QATQuantizer, Schedule
from quantrain.schedule import Phase


def _batch(generator, n_in=4, n_out=3, scale=1.0):
    return torch.randn(8, n_in, generator=generator) * scale, torch.randn(8, n_out, generator=generator)


def _snapshot(fq):
    return {
        "tracked_min": fq.observer.tracked_min.clone(),
        "tracked_max": fq.observer.tracked_max.clone(),
        "scale": fq.scale.clone(),
        "zero_point": fq.zero_point.clone(),
    }


# ---- Schedule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, Phase(weights=False, activations=False, observers=True, bn_frozen=False)),
        (1, Phase(weights=False, activations=False, observers=True, bn_frozen=False)),
        (2, Phase(weights=True, activations=False, observers=True, bn_frozen=False)),
        (3, Phase(weights=True, activations=False, observers=True, bn_frozen=False)),
        (4, Phase(weights=True, activations=True, observers=True, bn_frozen=False)),
        (5, Phase(weights=True, activations=True, observers=True, bn_frozen=True)),
        (6, Phase(weights=True, activations=True, observers=False, bn_frozen=True)),
        (100, Phase(weights=True, activations=True, observers=False, bn_frozen=True)),
    ],
)
def test_phase_switches_exactly_at_each_boundary(step, expected):
    schedule = Schedule(quant_start_step=2, activation_start_step=4, freeze_bn_step=5, freeze_range_step=6)
    assert schedule.phase(step) == expected


def test_activation_start_defaults_to_quant_start_and_nothing_freezes_by_default():
    schedule = Schedule(quant_start_step=3)
    assert schedule.activation_start == 3
    assert schedule.phase(2) == Phase(weights=False, activations=False, observers=True, bn_frozen=False)
    assert schedule.phase(3) == Phase(weights=True, activations=True, observers=True, bn_frozen=False)
    assert schedule.phase(10**6) == Phase(weights=True, activations=True, observers=True, bn_frozen=False)
    assert Schedule().phase(0) == Phase(weights=True, activations=True, observers=True, bn_frozen=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_start_step": -1},
        {"activation_start_step": -1},
        {"freeze_bn_step": -2},
        {"freeze_range_step": -3},
    ],
)
def test_negative_steps_are_value_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        Schedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_start_step": 1.5},
        {"quant_start_step": None},
        {"quant_start_step": True},
        {"activation_start_step": "3"},
        {"freeze_bn_step": 2.0},
        {"freeze_range_step": False},
    ],
)
def test_non_int_steps_are_type_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=name):
        Schedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_start_step": 3, "freeze_range_step": 3},
        {"quant_start_step": 3, "freeze_range_step": 2},
        {"quant_start_step": 0, "activation_start_step": 4, "freeze_range_step": 4},
        {"quant_start_step": 5, "activation_start_step": 1, "freeze_range_step": 5},
        {"freeze_range_step": 0},
    ],
)
def test_freeze_range_step_must_come_after_quantization_starts(kwargs):
    with pytest.raises(ValueError, match="freeze_range_step"):
        Schedule(**kwargs)


def test_freeze_range_step_right_after_the_last_start_is_accepted():
    schedule = Schedule(quant_start_step=0, activation_start_step=4, freeze_range_step=5)
    assert schedule.phase(4).observers and not schedule.phase(5).observers


def test_quantizer_rejects_a_bad_schedule_before_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="freeze_range_step"):
        QATQuantizer(model, IN_W_OUT, quant_start_step=2, freeze_range_step=2)
    with pytest.raises(ValueError, match="activation_start_step"):
        QATQuantizer(model, IN_W_OUT, activation_start_step=-1)
    assert type(model[0]) is nn.Linear and not hasattr(model, "quantrain_step")


# ---- activation_start_step -------------------------------------------------------------------------------------


def test_activation_start_step_quantizes_weights_first_then_activations():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantizer = QATQuantizer(model, IN_W_OUT, quant_start_step=0, activation_start_step=3)
    fq = model[0].fake_quant
    refs = {name: ReferenceTarget(QMIN, QMAX, symmetric=False) for name in ("in", "w", "out")}
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        assert quantizer.current_step == step
        x, y = _batch(generator, scale=step + 1.0)
        w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
        out = model(x)
        w_hat = refs["w"](w)
        # the weight is on its grid from step 0 (max(|w|) > 0, so quantization changes some entries)
        assert not torch.equal(w_hat, w)
        x_hat = refs["in"](x)  # the input's range is tracked on every batch, quantized or not
        if step < 3:
            expected = F.linear(x, w_hat, b)
            refs["out"](expected)  # tracked while bypassed
            assert torch.equal(out, expected)
            assert not fq["_input_0"].is_calibrated and not fq["_output_0"].is_calibrated
        else:
            float_activations = F.linear(x, w_hat, b)
            expected = refs["out"](F.linear(x_hat, w_hat, b))
            assert torch.equal(out, expected)
            assert not torch.equal(out, float_activations)
            assert fq["_input_0"].is_calibrated and fq["_output_0"].is_calibrated
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
    assert not torch.equal(model[0].weight.detach(), w)  # the optimizer really trained


# ---- freeze_range_step -----------------------------------------------------------------------------------------


def test_freeze_range_step_stops_ranges_scales_and_zero_points():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"], "quant_scheme": "affine"}], freeze_range_step=2)
    fqs = dict(model[0].fake_quant.items())
    assert set(fqs) == {"_input_0", "weight", "bias", "_output_0"}
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        assert quantizer.current_step == step
        x, y = _batch(generator, scale=2.0**step)
        before = {name: _snapshot(fq) for name, fq in fqs.items()}
        out = model(x)
        after = {name: _snapshot(fq) for name, fq in fqs.items()}
        for name in fqs:
            if 0 < step < 2:  # EMA of a new batch / of the stepped weights: the range and scale move
                moved = {key: not torch.equal(before[name][key], after[name][key]) for key in before[name]}
                assert moved["tracked_min"] or moved["tracked_max"], (step, name)
                assert moved["scale"], (step, name)
            elif step >= 2:
                for key in before[name]:
                    assert torch.equal(before[name][key], after[name][key]), (step, name, key)
        if step >= 2:  # still quantized, with the frozen parameters, while the weights keep changing
            q = {name: (fq.scale, fq.zero_point) for name, fq in fqs.items()}
            w_hat = reference_fake_quant(model[0].weight.detach(), *q["weight"], QMIN, QMAX)
            b_hat = reference_fake_quant(model[0].bias.detach(), *q["bias"], QMIN, QMAX)
            x_hat = reference_fake_quant(x, *q["_input_0"], QMIN, QMAX)
            expected = reference_fake_quant(F.linear(x_hat, w_hat, b_hat), *q["_output_0"], QMIN, QMAX)
            assert torch.equal(out, expected)
        weight_before = model[0].weight.detach().clone()
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
        assert not torch.equal(weight_before, model[0].weight)


# ---- weight_range ----------------------------------------------------------------------------------------------


def test_minmax_weight_range_is_the_current_weights_range_after_every_step():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    QATQuantizer(model, IN_W_OUT, weight_range="minmax")
    fq_w, fq_in = model[0].fake_quant["weight"], model[0].fake_quant["_input_0"]
    generator = torch.Generator().manual_seed(2)
    ranges = []
    x_max = []
    for _ in range(4):
        x, y = _batch(generator)
        out = model(x)
        w = model[0].weight.detach()
        assert torch.equal(fq_w.observer.tracked_min, w.amin())
        assert torch.equal(fq_w.observer.tracked_max, w.amax())
        scale, zp = reference_qparams(w.amin(), w.amax(), QMIN, QMAX, symmetric=False)
        assert torch.equal(fq_w.scale, scale) and torch.equal(fq_w.zero_point, zp)
        ranges.append((w.amin().clone(), w.amax().clone()))
        x_max.append(x.amax())
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
    assert len({(lo.item(), hi.item()) for lo, hi in ranges}) == 4  # the weights' range did move
    # activations keep the moving average
    expected = x_max[0]
    for value in x_max[1:]:
        expected = expected * 0.99 + (1 - 0.99) * value
    assert torch.equal(fq_in.observer.tracked_max, expected)


@pytest.mark.parametrize("weight_range", ["ema", "minmax"])
def test_weight_range_after_a_hand_made_optimizer_step(weight_range):
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    quantizer = QATQuantizer(model, IN_W_OUT, weight_range=weight_range)
    observer = model[0].fake_quant["weight"].observer
    model(torch.ones(1, 2))
    assert observer.tracked_max.item() == 3.0 and observer.tracked_min.item() == -2.0
    model[0].weight.grad = torch.tensor([[0.0, 0.0], [0.0, -2.0]])  # w <- w - grad: max 3 -> 5
    model[0].bias.grad = torch.zeros(2)
    optimizer.step()
    assert quantizer.current_step == 1
    assert model[0].weight[1, 1].item() == 5.0
    model(torch.ones(1, 2))
    if weight_range == "minmax":
        assert observer.tracked_max.item() == 5.0
        assert observer.tracked_min.item() == -2.0
    else:
        expected = torch.tensor(3.0) * 0.99 + (1 - 0.99) * torch.tensor(5.0)  # 2.97 + 0.05
        assert torch.equal(observer.tracked_max, expected)
        assert abs(observer.tracked_max.item() - 3.02) < 1e-6


def test_bad_weight_range_is_rejected_before_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="weight_range"):
        QATQuantizer(model, IN_W_OUT, weight_range="max")
    assert type(model[0]) is nn.Linear and not hasattr(model, "quantrain_step")


# ---- freeze_bn_step --------------------------------------------------------------------------------------------


def test_freeze_bn_step_flips_the_fusion_flag_at_that_step():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    config = [{"op_names": ["0"], "target_names": ["weight"], "fuse_names": [("0", "1")]}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    quantizer = QATQuantizer(model, config, freeze_bn_step=2)
    fusions = list(quantizer.fusions())
    assert len(fusions) == 1
    generator = torch.Generator().manual_seed(3)
    frozen = []
    for _ in range(4):
        frozen.append(fusions[0].is_bn_frozen)
        optimizer.zero_grad()
        model(torch.randn(4, 1, 5, 5, generator=generator)).pow(2).mean().backward()
        optimizer.step()
    frozen.append(fusions[0].is_bn_frozen)
    assert frozen == [False, False, True, True, True]
    assert quantizer.current_step == 4


# ---- resuming mid-schedule -------------------------------------------------------------------------------------


def _train_steps(model, optimizer, quantizer, steps):
    outputs = []
    for _ in range(steps):
        generator = torch.Generator().manual_seed(100 + quantizer.current_step)
        x = torch.randn(8, 4, generator=generator)
        y = torch.randn(8, 3, generator=generator)
        out = model(x)
        outputs.append((out.detach().clone(), model.fc2.fake_quant["_output_0"].is_calibrated))
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
    return outputs


def test_reloading_mid_schedule_resumes_with_the_same_phase_transitions():
    template = TwoLayer()

    def fresh():
        model = copy.deepcopy(template)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        quantizer = QATQuantizer(model, IN_W_OUT, quant_start_step=0, activation_start_step=3)
        return model, optimizer, quantizer

    model, optimizer, quantizer = fresh()
    uninterrupted = _train_steps(model, optimizer, quantizer, 5)
    assert [calibrated for _, calibrated in uninterrupted] == [False, False, False, True, True]

    model, optimizer, quantizer = fresh()
    resumed = _train_steps(model, optimizer, quantizer, 2)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    model, optimizer, quantizer = fresh()
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    assert quantizer.current_step == 2
    resumed += _train_steps(model, optimizer, quantizer, 3)
    assert quantizer.current_step == 5

    assert [calibrated for _, calibrated in resumed] == [False, False, False, True, True]
    for step, ((a, _), (b, _)) in enumerate(zip(uninterrupted, resumed, strict=True)):
        assert torch.equal(a, b), step
