"""Odd models and odd uses: shared modules, tuple and dict outputs, the meta device, quantizing again after unwrapping,
copies and pickles, torch.jit.trace and torch.export. Each works with the numbers checked, or is refused clearly.

Semantics pinned here:

* A module called several times per forward has one set of quantizers: every call is one observation of each of its
  targets (in call order, so an EMA range moves once per call, and PTQ's extremes cover all calls), and every call is
  fake-quantized with the scale of the latest observation. ``fuse='auto'`` does not fuse such a module (a fused layer
  applies the whole chain on every call) and says so; explicit ``fuse_names`` refuse it. A module registered under
  two names is one module: it is quantized once, under the name ``named_modules()`` reports (the first).
* ``_output_<i>`` / ``_output_<key>`` quantize one element of a tuple, list, named tuple or dict output; the output
  keeps its type and the other elements pass unchanged.
* A model on ``meta`` can be quantized; ``load_state_dict(..., assign=True)`` or ``to_empty`` then gives it exactly
  the state a model quantized on the CPU has (see ``quantrain.wrapping.meta``).
* A copy (``copy.deepcopy``, pickle) of a quantized model computes what the original computes, but has no quantizer:
  nothing counts its optimizer steps, so its schedule stays where it was copied. To train it on, quantize a float
  model and load the copy's state_dict into it.
* In eval mode, ``torch.jit.trace`` (with its default check) and ``torch.export.export`` (strict or not, dynamic
  batch, saved and loaded) compute exactly what the model computes. ``torch.jit.save`` of a trace does not work yet:
  fake quantization is a ``torch.autograd.Function``, which TorchScript cannot serialize (marked xfail below).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from helpers import IN_W_OUT, QMAX, QMIN, ReferenceTarget
from quantrain import PtqQuantizer, QATQuantizer

AFFINE = {"quant_dtype": "int8", "quant_scheme": "affine"}
CNN_CONFIG = [
    {"op_names": ["0"], "target_names": ["_input_"], "quant_dtype": "uint8", "quant_scheme": "affine"},
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    },
]


def _cnn() -> nn.Module:
    """conv-BN-ReLU (folded), conv-ReLU, linear."""
    layers = [nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(96, 3))


def _quantize_cnn(model: nn.Module, **options) -> QATQuantizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # integer_bias: the Linear's input is not quantized per tensor upstream
        return QATQuantizer(model, CNN_CONFIG, fuse="auto", integer_bias=True, example_inputs=torch.zeros(2, 1, 8, 8), **options)


def _batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    return torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def _train(model: nn.Module, steps: int, first: int = 0) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(first, first + steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key, value in state_a.items():
        assert value.dtype == state_b[key].dtype and torch.equal(value, state_b[key]), key


def _assert_same_calibration(a: QATQuantizer, b: QATQuantizer) -> None:
    config_a, config_b = a.get_calibration_config(), b.get_calibration_config()
    assert config_a.keys() == config_b.keys() and config_a
    for module, targets in config_a.items():
        assert targets.keys() == config_b[module].keys()
        for target, entry in targets.items():
            for key, value in entry.items():
                other = config_b[module][target][key]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (module, target, key)


def _trained_cnn(steps: int = 4) -> tuple[nn.Module, QATQuantizer]:
    torch.manual_seed(7)
    model = _cnn()
    quantizer = _quantize_cnn(model, quant_start_step=1)
    _train(model, steps)
    return model, quantizer


# ---- a module called twice per forward ---------------------------------------------------------------------------


class Twice(nn.Module):
    """One Linear applied twice: ``fc(relu(fc(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc(x)))


def test_a_module_called_twice_observes_each_call_in_order():
    model = Twice()
    weight, bias = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    QATQuantizer(model, IN_W_OUT)
    refs = {name: ReferenceTarget(QMIN, QMAX, symmetric=False) for name in ("in", "w", "out")}

    def reference(x: torch.Tensor, training: bool = True) -> torch.Tensor:
        for _ in range(2):  # one observation of each target per call
            x = refs["out"](F.linear(refs["in"](x, training), refs["w"](weight, training), bias), training)
            x = F.relu(x) if _ == 0 else x
        return x

    for _ in range(3):
        x = torch.randn(6, 4) * 2
        assert torch.equal(model(x), reference(x))
    x = torch.randn(6, 4)
    assert torch.equal(model.eval()(x), reference(x, training=False))


def test_ptq_ranges_of_a_module_called_twice_cover_both_calls():
    model = Twice()
    ptq = PtqQuantizer(model, IN_W_OUT)
    x = torch.randn(16, 4)
    ptq.track_forward(x)
    with torch.no_grad():
        first = F.linear(x, model.fc.weight, model.fc.bias)
        second = F.linear(F.relu(first), model.fc.weight, model.fc.bias)
    _, config = ptq.compress()
    assert torch.equal(config["fc"]["_output_0"]["tracked_min"], torch.minimum(first.min(), second.min()))
    assert torch.equal(config["fc"]["_output_0"]["tracked_max"], torch.maximum(first.max(), second.max()))


class TwoSites(nn.Module):
    """A conv followed by a BatchNorm at one call and used bare at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def test_auto_fusion_leaves_a_layer_called_twice_unfused_and_says_so():
    config = [{"op_types": ["Conv2d"], "target_names": ["weight", "_output_"]}]
    torch.manual_seed(0)
    model, plain = TwoSites(), TwoSites()
    plain.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"not fusing \('conv', 'bn'\) \('conv' is called 2 times\)"):
        quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=torch.zeros(1, 2, 3, 3))
    assert list(quantizer.fusions()) == []
    QATQuantizer(plain, config)
    for _ in range(3):  # the bare call is not batch-normalized: the numbers of the unfused model
        x = torch.randn(4, 2, 3, 3)
        assert torch.equal(model(x), plain(x))
    with pytest.raises(ValueError, match="'conv' is called 2 times in the forward"):
        QATQuantizer(TwoSites(), [{**config[0], "fuse_names": [("conv", "bn")]}], example_inputs=torch.zeros(1, 2, 3, 3))


class SharedReLU(nn.Module):
    """conv-BN-ReLU (fusable), then an unquantized conv whose output goes through the same ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.conv2 = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))


def test_a_fused_relu_module_used_again_elsewhere_still_rectifies_there():
    model = SharedReLU()
    config = [{"op_names": ["conv1"], "target_names": ["weight", "_output_"]}]
    quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=torch.zeros(1, 1, 6, 6))
    assert [fusion.group for fusion in quantizer.fusions()] == [("conv1", "bn1", "relu")]
    calls = []
    model.relu.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    model(torch.randn(4, 1, 6, 6))
    (fused_in, fused_out), (other_in, other_out) = calls
    assert fused_out is fused_in and (fused_in >= 0).all()  # the fused layer's output passes through
    assert (other_in < 0).any() and torch.equal(other_out, F.relu(other_in))  # any other input is rectified


class Alias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def test_a_module_registered_under_two_names_is_quantized_once_under_its_first_name():
    model = Alias()
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"], **AFFINE}])
    assert list(quantizer.quantized_modules) == ["a"] and model.b is model.a
    model(torch.randn(5, 3))
    assert list(quantizer.get_calibration_config()) == ["a"]
    state = model.state_dict()  # both names appear, holding the same tensors
    assert torch.equal(state["a.fake_quant._output_0.scale"], state["b.fake_quant._output_0.scale"])
    copy_model = Alias()
    QATQuantizer(copy_model, [{"op_types": ["Linear"], **AFFINE}])
    copy_model.load_state_dict(state)
    x = torch.randn(5, 3)
    assert torch.equal(copy_model.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="no module named 'b'"):
        QATQuantizer(Alias(), [{"op_names": ["b"]}])


# ---- tuple, list, named tuple and dict outputs -------------------------------------------------------------------


class Pair(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


class Outputs(nn.Module):
    """Returns two tensors in the container ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.tensor([0.5, -1.5, 2.0]))

    def forward(self, x: torch.Tensor):
        low, high = x * self.scale, x * 3 - 1
        if self.kind == "dict":
            return {"low": low, "high": high}
        if self.kind == "named":
            return Pair(low, high)
        return [low, high] if self.kind == "list" else (low, high)


@pytest.mark.parametrize(
    "kind, target", [("tuple", "_output_1"), ("list", "_output_1"), ("named", "_output_1"), ("dict", "_output_high")]
)
def test_one_element_of_a_container_output_is_quantized(kind, target):
    model = nn.Sequential(Outputs(kind))
    float_module = copy.deepcopy(model[0])
    quantizer = QATQuantizer(model, [{"op_names": ["0"], "target_names": [target], **AFFINE}])
    ref = ReferenceTarget(QMIN, QMAX, symmetric=False)
    for _ in range(3):
        x = torch.randn(4, 3)
        out, expected = model(x), float_module(x)
        assert type(out) is type(expected)
        low, high = (out["low"], out["high"]) if kind == "dict" else out
        low_expected, high_expected = (expected["low"], expected["high"]) if kind == "dict" else expected
        assert torch.equal(low, low_expected)  # not a target: unchanged
        assert torch.equal(high, ref(high_expected))
    assert list(quantizer.get_calibration_config()["0"]) == [target]


def test_each_element_of_a_tuple_output_gets_its_own_quantizer():
    model = nn.Sequential(Outputs("tuple"))
    float_module = copy.deepcopy(model[0])
    QATQuantizer(model, [{"op_names": ["0"], "target_names": ["_output_0", "_output_1"], **AFFINE}])
    refs = [ReferenceTarget(QMIN, QMAX, symmetric=False) for _ in range(2)]
    x = torch.randn(4, 3)
    out = model(x)
    for value, expected, ref in zip(out, float_module(x), refs, strict=True):
        assert torch.equal(value, ref(expected))
    assert not torch.equal(model[0].fake_quant["_output_0"].scale, model[0].fake_quant["_output_1"].scale)


class Nested(nn.Module):
    def forward(self, x: torch.Tensor):
        return (x, x + 1), {"a": x}


@pytest.mark.parametrize(
    "target, error, match",
    [
        ("_output_0", TypeError, "0._output_0: expected a tensor to quantize, got tuple"),
        ("_output_5", ValueError, "returns 2 outputs, there is no index 5"),
    ],
)
def test_an_output_that_is_not_a_tensor_is_a_clear_error(target, error, match):
    model = nn.Sequential(Nested())
    QATQuantizer(model, [{"op_names": ["0"], "target_names": [target]}])
    with pytest.raises(error, match=match):
        model(torch.randn(2, 3))


def test_a_missing_dict_key_is_a_clear_error():
    model = nn.Sequential(Outputs("dict"))
    QATQuantizer(model, [{"op_names": ["0"], "target_names": ["_output_mid"]}])
    with pytest.raises(ValueError, match=r"0._output_mid: the module's output has no key 'mid'; keys are \['low', 'high'\]"):
        model(torch.randn(2, 3))


# ---- the meta device ---------------------------------------------------------------------------------------------


def _float_state() -> dict:
    torch.manual_seed(11)
    return _cnn().state_dict()


def _on_cpu(state: dict, quantizer_class=QATQuantizer) -> tuple[nn.Module, QATQuantizer]:
    model = _cnn()
    quantizer = _quantize_cnn(model, quant_start_step=1) if quantizer_class is QATQuantizer else _ptq(model)
    model.load_state_dict(state)
    return model, quantizer


def _on_meta(quantizer_class=QATQuantizer) -> tuple[nn.Module, QATQuantizer]:
    with torch.device("meta"):
        model = _cnn()
    quantizer = _quantize_cnn(model, quant_start_step=1) if quantizer_class is QATQuantizer else _ptq(model)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))  # nothing allocated
    return model, quantizer


def _ptq(model: nn.Module) -> PtqQuantizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PtqQuantizer(model, CNN_CONFIG, fuse="auto", integer_bias=True, example_inputs=torch.zeros(2, 1, 8, 8))


def _materialize(model: nn.Module, state: dict, how: str) -> None:
    if how == "assign":
        model.load_state_dict(state, assign=True)
    elif how == "to_empty+load":
        model.to_empty(device="cpu")
        model.load_state_dict(state)
    else:  # to_empty, then the float tensors copied in by hand: quantrain's state is filled at the next forward
        model.to_empty(device="cpu")
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, tensor in state.items():
                tensors[name].copy_(tensor)


@pytest.mark.parametrize("how", ["assign", "to_empty+load", "to_empty+init"])
def test_a_model_quantized_on_meta_trains_like_one_quantized_on_the_cpu(how):
    state = _float_state()
    reference, reference_quantizer = _on_cpu(state)
    model, quantizer = _on_meta()
    _materialize(model, state, how)
    if how != "to_empty+init":
        _assert_same_state(model, reference)  # quantrain's initial state and the schedule's flags, step 0
    _train(reference, 4)
    _train(model, 4)  # an optimizer on the new Parameters: its steps are counted
    assert quantizer.current_step == reference_quantizer.current_step == 4
    _assert_same_state(model, reference)
    _assert_same_calibration(model.__dict__["_quantrain_quantizer"].quantizer, reference_quantizer)
    x, _ = _batch(99)
    assert torch.equal(model.eval()(x), reference.eval()(x))


def test_a_quantized_checkpoint_loads_into_a_model_quantized_on_meta():
    trained, trained_quantizer = _trained_cnn()
    model, quantizer = _on_meta()
    model.load_state_dict(trained.state_dict(), assign=True)
    assert quantizer.current_step == trained_quantizer.current_step == 4
    _assert_same_state(model, trained)
    x, _ = _batch(98)
    assert torch.equal(model.eval()(x), trained.eval()(x))


def test_ptq_on_meta_calibrates_like_on_the_cpu():
    state = _float_state()
    (reference, reference_ptq), (model, ptq) = _on_cpu(state, PtqQuantizer), _on_meta(PtqQuantizer)
    model.load_state_dict(state, assign=True)
    for step in range(3):
        reference_ptq.track_forward(_batch(step)[0])
        ptq.track_forward(_batch(step)[0])
    reference_ptq.compress()
    ptq.compress()
    _assert_same_calibration(ptq, reference_ptq)
    _assert_same_state(model, reference)


def test_loading_into_a_meta_model_without_assign_or_real_tensors_is_refused_clearly():
    model, _ = _on_meta()
    state = _float_state()
    with pytest.raises(ValueError, match=r"on the meta device.*assign=True.*to_empty"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match=r"on the meta device.*assign=True.*to_empty"):
        model.load_state_dict({key: value.to("meta") for key, value in state.items()}, assign=True)
    model.load_state_dict(state, assign=True)  # nothing changed: the right load still works
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


# ---- quantize, unwrap, quantize again ----------------------------------------------------------------------------


def _quantrain_leftovers(model: nn.Module) -> list[str]:
    found = [f"{name}: {type(m).__name__}" for name, m in model.named_modules() if type(m).__module__.startswith("quantrain")]
    for name, module in model.named_modules():
        found += [f"{name}.{key}" for key in vars(module) if "quant" in key or key in ("_fused_into", "_bias_scales")]
    hooks = (model._forward_pre_hooks, model._load_state_dict_pre_hooks, model._load_state_dict_post_hooks)
    return found + [f"hook {hook}" for hooks_of in hooks for hook in hooks_of.values()]


def test_quantize_unwrap_quantize_gives_the_numbers_of_a_first_quantization():
    torch.manual_seed(5)
    model = _cnn()
    float_state = copy.deepcopy(model.state_dict())
    first = _quantize_cnn(model, quant_start_step=1, freeze_bn_step=3)
    _train(model, 4)
    first_state, first_config = copy.deepcopy(model.state_dict()), first.get_calibration_config()
    first.unwrap_model()
    assert _quantrain_leftovers(model) == []
    assert list(model.state_dict()) == list(float_state)
    model.load_state_dict(float_state)  # back to the float weights and statistics it started from

    second = _quantize_cnn(model, quant_start_step=1, freeze_bn_step=3)
    _train(model, 4)
    assert second.current_step == 4
    assert list(model.state_dict()) == list(first_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, first_state[key]), key
    assert second.get_calibration_config().keys() == first_config.keys()


def test_ptq_then_unwrap_then_qat_on_the_same_model():
    torch.manual_seed(5)
    model = _cnn()
    ptq = _ptq(model)
    ptq.track_forward(_batch(0)[0])
    ptq.compress()
    ptq.unwrap_model()
    assert _quantrain_leftovers(model) == []
    fresh = _cnn()
    fresh.load_state_dict(model.state_dict())
    quantizers = [_quantize_cnn(m, quant_start_step=1) for m in (model, fresh)]
    _train(model, 3)
    _train(fresh, 3)
    _assert_same_calibration(*quantizers)


# ---- copies and pickles ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_computes_what_the_original_computes_in_both_modes(clone):
    model, _ = _trained_cnn()
    duplicate = clone(model)
    for step in range(2):  # training mode: ranges tracked and BatchNorm statistics updated alike
        x, _ = _batch(50 + step)
        assert torch.equal(duplicate(x), model(x))
    _assert_same_state(duplicate, model)
    x, _ = _batch(60)
    assert torch.equal(duplicate.eval()(x), model.eval()(x))


def test_a_copy_has_no_quantizer_so_its_schedule_stays_where_it_was_copied():
    torch.manual_seed(2)
    model = _cnn()
    quantizer = _quantize_cnn(model, quant_start_step=2)
    duplicate = copy.deepcopy(model)
    _train(duplicate, 3)  # its own optimizer: counted by no quantizer
    assert quantizer.current_step == 0 and int(duplicate.quantrain_step) == 0
    assert all(int(fq.fake_quant_enabled) == 0 for fq in duplicate.modules() if hasattr(fq, "fake_quant_enabled"))
    with pytest.raises(ValueError, match=r"already quantized by quantrain.*a copy or an unpickled quantized model"):
        QATQuantizer(duplicate, CNN_CONFIG)
    with pytest.raises(ValueError, match=r"call unwrap_model\(\) on its quantizer first"):
        QATQuantizer(model, CNN_CONFIG)


def test_a_copy_trains_on_once_its_state_dict_is_loaded_into_a_quantized_model():
    model, quantizer = _trained_cnn(steps=3)
    duplicate = pickle.loads(pickle.dumps(model))
    successor = _cnn()
    successor_quantizer = _quantize_cnn(successor, quant_start_step=1)
    successor.load_state_dict(duplicate.state_dict())
    assert successor_quantizer.current_step == 3
    _train(model, 2, first=3)
    _train(successor, 2, first=3)
    _assert_same_state(successor, model)
    _assert_same_calibration(successor_quantizer, quantizer)


# ---- torch.jit.trace and torch.export (eval mode) ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated in favour of torch.export
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_in_eval_mode_gives_the_same_outputs(grad):
    model, _ = _trained_cnn()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x, _ = _batch(70)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)  # with its default check: a second trace must give the same graph
    for size in (8, 3):
        x, _ = _batch(71, size)
        assert torch.equal(traced(x), model(x))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # eval: nothing tracked


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.xfail(
    raises=RuntimeError, strict=False, reason="fake quantization runs as a torch.autograd.Function, which TorchScript cannot save"
)
def test_a_traced_model_can_be_saved_with_torchscript():
    model, _ = _trained_cnn()
    model.eval()
    x, _ = _batch(72)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(x), model(x))


@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects")  # a fused layer notes its output
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_in_eval_mode_gives_the_same_outputs_for_any_batch_size(strict):
    model, _ = _trained_cnn()
    model.eval()
    x, _ = _batch(80)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},), strict=strict)
    assert program.graph_signature.buffers_to_mutate == {}  # eval mode: ranges are not tracked
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for size in (8, 5):
        x, _ = _batch(81, size)
        assert torch.equal(program.module()(x), model(x))
        assert torch.equal(loaded(x), model(x))
