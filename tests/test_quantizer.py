"""QATQuantizer: wrapping semantics, schedule, state, calibration config."""

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ReferenceTarget, TwoLayer
from quantrain import QATQuantizer
from quantrain.wrapping import is_quantized

LINEAR_ALL = [{"op_types": ["Linear"]}]
AFFINE_INT8 = [{"op_types": ["Linear"], "quant_dtype": "int8", "quant_scheme": "affine"}]


def test_parameters_stay_the_same_objects_and_a_prior_optimizer_trains_them():
    model = TwoLayer()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantizer = QATQuantizer(model, LINEAR_ALL)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    before = model.fc1.weight.detach().clone()
    F.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 3)).backward()
    optimizer.step()
    assert not torch.equal(before, model.fc1.weight)
    assert quantizer.current_step == 1


def test_module_identity_and_isinstance_are_kept():
    model = TwoLayer()
    fc1 = model.fc1
    QATQuantizer(model, LINEAR_ALL)
    assert model.fc1 is fc1
    assert isinstance(model.fc1, nn.Linear) and is_quantized(model.fc1)
    assert type(model.fc1).__name__ == "QuantizedLinear"


def test_matches_an_independent_reference_bit_for_bit():
    """Input, weight, bias and output of a Linear, per-tensor EMA ranges: the reference's numbers exactly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4))
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    QATQuantizer(model, AFFINE_INT8)
    refs = {name: ReferenceTarget(-127, 127, symmetric=False) for name in ("in", "w", "b", "out")}
    for _ in range(4):
        x = torch.randn(6, 5) * 3
        expected = refs["out"](F.linear(refs["in"](x), refs["w"](w), refs["b"](b)))
        assert torch.equal(model(x), expected)
    x = torch.randn(6, 5)
    model.eval()
    expected = refs["out"](F.linear(refs["in"](x, False), refs["w"](w, False), refs["b"](b, False)), False)
    assert torch.equal(model(x), expected)


def test_float_checkpoint_loads_strictly_and_quant_state_is_in_state_dict():
    float_model = TwoLayer()
    float_state = copy.deepcopy(float_model.state_dict())
    model = TwoLayer()
    QATQuantizer(model, LINEAR_ALL)
    keys = set(model.state_dict())
    assert set(float_state) < keys
    assert {"fc1.fake_quant.weight.scale", "fc1.fake_quant._input_0.observer.tracked_min", "quantrain_step"} <= keys
    result = model.load_state_dict(float_state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.fc1.weight, float_model.fc1.weight)


def _train(model, steps, seed, optimizer):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        y = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def test_saving_and_reloading_mid_training_resumes_to_the_same_numbers():
    torch.manual_seed(3)
    template = TwoLayer()
    runs = []
    for interrupted in (False, True):
        model = copy.deepcopy(template)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        quantizer = QATQuantizer(model, AFFINE_INT8, quant_start_step=2)
        _train(model, 3, seed=0, optimizer=optimizer)
        if interrupted:
            saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
            model = copy.deepcopy(template)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            quantizer = QATQuantizer(model, AFFINE_INT8, quant_start_step=2)
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_opt)
            assert quantizer.current_step == 3
        _train(model, 3, seed=1, optimizer=optimizer)
        runs.append((model.state_dict(), quantizer.get_calibration_config(), quantizer.current_step))
    (state_a, config_a, step_a), (state_b, config_b, step_b) = runs
    assert step_a == step_b == 6
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert config_a.keys() == config_b.keys()


def test_unwrap_gives_back_the_float_model():
    model = TwoLayer()
    keys = list(model.state_dict())
    x = torch.randn(5, 4)
    quantizer = QATQuantizer(model, LINEAR_ALL)
    model(x)
    quantized_out = model.eval()(x)
    assert quantizer.unwrap_model() is model
    assert type(model.fc1) is nn.Linear and not hasattr(model.fc1, "fake_quant")
    assert list(model.state_dict()) == keys
    float_out = model(x)
    assert torch.equal(
        float_out, F.linear(F.relu(F.linear(x, model.fc1.weight, model.fc1.bias)), model.fc2.weight, model.fc2.bias)
    )
    assert not torch.equal(float_out, quantized_out)
    with pytest.raises(RuntimeError, match="unwrapped"):
        quantizer.compress(max_steps=1)
    QATQuantizer(model, LINEAR_ALL)  # can be quantized again


def test_eval_mode_freezes_ranges_but_still_quantizes():
    model = nn.Sequential(nn.Linear(4, 4))
    quantizer = QATQuantizer(model, LINEAR_ALL)
    model(torch.randn(8, 4))
    before = quantizer.get_calibration_config()
    model.eval()
    x = torch.randn(8, 4) * 10
    out = model(x)
    after = quantizer.get_calibration_config()
    for target, entry in before["0"].items():
        for key in ("tracked_min", "tracked_max", "scale", "zero_point"):
            assert torch.equal(entry[key], after["0"][target][key]), (target, key)
    scale = after["0"]["_output_0"]["scale"]
    assert torch.equal(torch.round(out / scale) * scale, out)  # on the output grid
    assert out.abs().max() <= scale * 127 * (1 + 1e-6)  # saturated at the trained range


def test_quant_start_step_bypasses_then_quantizes():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    quantizer = QATQuantizer(model, LINEAR_ALL, quant_start_step=2)
    x = torch.randn(8, 4)
    float_out = F.linear(x, model[0].weight, model[0].bias)
    for _ in range(2):
        assert torch.equal(model(x), float_out)  # bypass while ranges are tracked
        optimizer.step()
    assert quantizer.current_step == 2
    assert quantizer.get_calibration_config() == {}  # no scale before QAT begins
    assert "tracked_min" in dict(model[0].fake_quant["weight"].observer.named_buffers())
    quantized = model(x)
    assert not torch.equal(quantized, float_out)
    assert torch.allclose(quantized, float_out, atol=0.05)
    assert set(quantizer.get_calibration_config()["0"]) == {"_input_0", "weight", "bias", "_output_0"}


def test_negative_quant_start_step_is_clamped_like_the_reference():
    quantizer = QATQuantizer(TwoLayer(), LINEAR_ALL, quant_start_step=-5)
    assert quantizer.quant_start_step == 0


def test_steps_count_the_first_optimizer_only_and_manual_step():
    model = TwoLayer()
    first = torch.optim.SGD(model.fc1.parameters(), lr=0.0)
    second = torch.optim.SGD(model.fc2.parameters(), lr=0.0)
    unrelated = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    quantizer = QATQuantizer(model, LINEAR_ALL)
    unrelated.step()
    assert quantizer.current_step == 0
    for _ in range(3):
        first.step()
        second.step()
    assert quantizer.current_step == 3
    quantizer.attach_optimizer(second)
    second.step()
    first.step()
    quantizer.step()
    assert quantizer.current_step == 5
    assert int(model.quantrain_step) == 5


class _ClippingSGD(torch.optim.SGD):
    """An optimizer subclass whose step calls SGD's: PyTorch runs the step hooks for both."""

    def step(self, closure=None):
        for group in self.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        return super().step(closure)


def test_an_optimizer_subclass_calling_super_step_counts_once():
    model = TwoLayer()
    optimizer = _ClippingSGD(model.parameters(), lr=0.1)
    quantizer = QATQuantizer(model, LINEAR_ALL)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    assert quantizer.current_step == 4
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # another optimizer: not counted, nothing left pending
    optimizer.step()
    assert quantizer.current_step == 5


def test_calibration_config_has_the_reference_shape():
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    config = [
        {
            "op_types": ["Conv2d"],
            "target_names": ["weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_dtype": None, "quant_scheme": "symmetric", "granularity": "out_channel"}},
        }
    ]
    quantizer = QATQuantizer(model, config)
    model(torch.randn(2, 2, 5, 5))
    entry = quantizer.get_calibration_config()["0"]
    weight, output = entry["weight"], entry["_output_0"]
    assert weight["quant_dtype"] == "int8" and weight["quant_bits"] == 8 and weight["quant_scheme"] == "symmetric"
    assert weight["scale"].shape == (3, 1, 1, 1) and weight["zero_point"].dtype == torch.float32
    assert torch.equal(weight["zero_point"], torch.zeros(3, 1, 1, 1))
    expected = model[0].weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.equal(weight["scale"], expected)
    assert output["quant_dtype"] == "uint8" and output["scale"].dim() == 0 and output["scale"].device.type == "cpu"
    assert set(output) == {"scale", "zero_point", "quant_dtype", "quant_scheme", "quant_bits", "tracked_min", "tracked_max"}


def test_keyword_inputs_tuple_and_dict_outputs_of_custom_modules():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.0, -2.0]))

        def forward(self, x, y=None):
            return {"sum": x * self.scale + y, "x": x}

    model = nn.Sequential()
    model.add_module("pair", Pair())
    config = [{"op_names": ["pair"], "target_names": ["_input_y", "scale", "_output_sum"], "quant_dtype": "int4"}]
    quantizer = QATQuantizer(model, config)
    x, y = torch.tensor([[0.3, 0.6]]), torch.tensor([[1.0, -7.0]])
    out = model.pair(x, y=y)
    assert torch.equal(out["x"], x)  # not a target
    y_hat = torch.round(y / (7 / 7)) * 1.0  # int4 symmetric: scale = 7 / 7 = 1
    scale_hat = torch.round(model.pair.scale.detach() / (2 / 7)) * (2 / 7)
    raw = x * scale_hat + y_hat
    step = raw.abs().max() / 7
    assert torch.allclose(out["sum"], torch.round(raw / step) * step)
    assert set(quantizer.get_calibration_config()["pair"]) == {"_input_y", "scale", "_output_sum"}


def test_tuple_output_index_and_missing_output_errors():
    model = nn.Sequential(nn.LSTM(3, 4, batch_first=True))
    QATQuantizer(model, [{"op_types": ["LSTM"], "target_names": ["_output_0"]}])
    out, (hidden, _) = model(torch.randn(2, 5, 3))
    scale = model[0].fake_quant["_output_0"].scale
    assert torch.allclose(torch.round(out / scale) * scale, out, atol=1e-6)
    assert not torch.allclose(torch.round(hidden / scale) * scale, hidden, atol=1e-6)  # only output 0
    bad = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="single tensor"):  # known before any forward for torch.nn layers
        QATQuantizer(bad, [{"op_types": ["Linear"], "target_names": ["_output_2"]}])
    assert not hasattr(bad, "quantrain_step")


@pytest.mark.parametrize(
    "module, target, x",
    [
        (nn.Embedding(10, 4), "weight", torch.tensor([1, 2, 3])),
        (nn.LayerNorm(4), "weight", torch.randn(2, 4)),
        (nn.GroupNorm(2, 4), "weight", torch.randn(2, 4, 3)),
        (nn.PReLU(4), "weight", torch.randn(2, 4)),  # no registered forward: generic substitution
    ],
)
def test_parameters_of_any_module_type_are_quantized(module, target, x):
    with torch.no_grad():
        module._parameters[target].copy_(torch.randn_like(module._parameters[target]))
    float_module = copy.deepcopy(module)
    model = nn.Sequential(module)
    QATQuantizer(model, [{"op_types": [type(module).__name__], "target_names": [target], "quant_dtype": "int2"}])
    out = model(x)
    weight = float_module._parameters[target].detach()
    step = weight.abs().max()  # int2 symmetric: levels -1, 0, 1
    quantized = torch.round(torch.clamp(weight / step, -1, 1)) * step
    with torch.no_grad():
        float_module._parameters[target].copy_(quantized)
    assert torch.allclose(out, float_module(x), atol=1e-6)
    assert model[0]._parameters[target] is module._parameters[target]  # restored after the generic path
    assert isinstance(model[0]._parameters[target], nn.Parameter)


def test_gradients_reach_the_same_parameters_through_the_ste():
    model = nn.Sequential(nn.Linear(3, 2))
    QATQuantizer(model, LINEAR_ALL)
    model(torch.randn(4, 3)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_track_forward_sizes_per_channel_buffers_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
    config = [{"op_types": ["ReLU"], "target_names": ["_output_"], "granularity": "per_channel", "quant_dtype": "uint8"}]
    quantizer = QATQuantizer(model, config)
    model.eval()
    fq = model[1].fake_quant["_output_0"]
    assert fq.scale.shape == (0,)
    quantizer.track_forward(torch.randn(2, 1, 4, 4))
    assert fq.scale.shape == (1, 3, 1, 1) and fq.observer.tracked_max.shape == (1, 3, 1, 1)
    assert not fq.training and not model.training


def test_pickle_and_deepcopy_of_a_prepared_model():
    model = TwoLayer()
    QATQuantizer(model, LINEAR_ALL)
    x = torch.randn(3, 4)
    model(x)
    model.eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.fc1) is type(model.fc1)
        assert torch.equal(clone(x), model(x))


def test_wrapping_twice_is_refused_and_leaves_the_model_alone():
    model = TwoLayer()
    QATQuantizer(model, LINEAR_ALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already quantized"):
        QATQuantizer(model, LINEAR_ALL)
    assert state.keys() == model.state_dict().keys()


def test_conflicting_attribute_is_refused_before_anything_changes():
    model = TwoLayer()
    model.fc2.fake_quant = 1
    with pytest.raises(ValueError, match="fake_quant"):
        QATQuantizer(model, LINEAR_ALL)
    assert type(model.fc1) is nn.Linear and not hasattr(model, "quantrain_step")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model": "not a model"}, TypeError),
        ({"quant_start_step": 1.5}, TypeError),
        ({"evaluator": object()}, TypeError),
        ({"config_list": {"op_types": ["Linear"]}}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    arguments = {"model": TwoLayer(), "config_list": LINEAR_ALL, **kwargs}
    with pytest.raises(error):
        QATQuantizer(**arguments)


def test_batchnorm_default_targets_quantize_its_affine_parameters():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model = nn.Sequential(bn)
    quantizer = QATQuantizer(model, [{"op_types": ["BatchNorm1d"], "target_names": ["weight"], "quant_dtype": "int2"}])
    x = torch.randn(16, 3)
    out = model(x)
    # int2 symmetric: scale = 2 / 1; w / scale = [0.25, -0.5, 1.0] rounds half-to-even to [0, 0, 1]
    expected = F.batch_norm(x, None, None, torch.tensor([0.0, 0.0, 2.0]), bn.bias, training=True)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(quantizer.get_calibration_config()["0"]["weight"]["scale"], torch.tensor(2.0))
    assert bn.num_batches_tracked.item() == 1  # the module's own forward ran (running statistics updated)


def test_the_schedule_runs_even_when_the_quantizer_object_is_dropped():
    model = nn.Sequential(nn.Linear(4, 3))
    QATQuantizer(model, LINEAR_ALL, quant_start_step=2)  # no reference kept
    gc.collect()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 4)
    float_out = F.linear(x, model[0].weight, model[0].bias)
    for _ in range(2):
        assert torch.equal(model(x), float_out)
        optimizer.step()
    assert int(model.quantrain_step) == 2
    assert not torch.equal(model(x), float_out)  # quantization started at step 2


def test_a_dropped_model_and_quantizer_are_collected():
    model = nn.Sequential(nn.Linear(4, 3))
    QATQuantizer(model, LINEAR_ALL)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_model_whose_config_selected_nothing_cannot_be_quantized_twice_either():
    model = nn.Sequential(nn.ReLU())
    with pytest.warns(UserWarning, match="selects no module"):
        QATQuantizer(model, [{"op_types": ["Linear"]}])
    with pytest.raises(ValueError, match="already quantized"):
        QATQuantizer(model, [{"op_types": ["ReLU"]}])
    assert type(model[0]) is nn.ReLU


# ---- NNI's accessors ---------------------------------------------------------------------------------------------


def test_assigning_current_step_moves_the_schedule_as_nni_users_resume():
    model = TwoLayer()
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}], quant_start_step=10)
    fqs = list(quantizer.fake_quantizers())
    assert not any(fq.fake_quant_enabled.item() for fq in fqs)
    quantizer.current_step = 12
    assert quantizer.current_step == 12 and model.get_buffer("quantrain_step").item() == 12
    assert all(fq.fake_quant_enabled.item() for fq in fqs)
    quantizer.current_step = 3
    assert not any(fq.fake_quant_enabled.item() for fq in fqs)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="current_step must be a non-negative int"):
            quantizer.current_step = bad
    assert quantizer.current_step == 3


def test_update_calibration_config_is_nni_name_for_set_calibration_config():
    source, target = TwoLayer(), TwoLayer()
    first = QATQuantizer(source, [{"op_types": ["Linear"]}])
    source(torch.randn(8, 4))
    second = QATQuantizer(target, [{"op_types": ["Linear"]}])
    calibration = first.get_calibration_config()
    assert second.update_calibration_config(calibration) is None
    assert torch.equal(second.get_calibration_config()["fc1"]["weight"]["scale"], calibration["fc1"]["weight"]["scale"])
    with pytest.raises(ValueError, match=r"calibration_config\['nope'\]"):
        second.update_calibration_config({"nope": {"weight": calibration["fc1"]["weight"]}})


def test_wrap_model_and_results_after_unwrapping_say_what_to_do():
    model = TwoLayer()
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}])
    assert quantizer.config_list == [{"op_types": ["Linear"]}]
    with pytest.raises(RuntimeError, match="already wrapped"):
        quantizer.wrap_model()
    model(torch.randn(8, 4))
    before = quantizer.get_calibration_config()
    quantizer.unwrap_model()
    with pytest.raises(RuntimeError, match="unwrap_model\\(\\) is final"):
        quantizer.wrap_model()
    after = quantizer.get_calibration_config()  # as NNI: what the quantizer held when it was unwrapped
    assert after.keys() == before.keys() and torch.equal(after["fc1"]["weight"]["scale"], before["fc1"]["weight"]["scale"])
    after["fc1"]["weight"]["scale"].zero_()  # a copy each time
    assert torch.equal(quantizer.get_calibration_config()["fc1"]["weight"]["scale"], before["fc1"]["weight"]["scale"])
