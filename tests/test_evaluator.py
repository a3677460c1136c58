"""TorchEvaluator and QATQuantizer.compress with NNI 3.0's calling convention: what training_func receives, what
evaluate() returns, and the checks of the budget and the arguments."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TwoLayer
from quantrain import QATQuantizer, TorchEvaluator

CONFIG = [{"op_types": ["Linear"]}]


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x[i : i + 8], (x[i : i + 8].sum(1) > 0).long() % 3) for i in range(0, n, 8)]


def training_step(batch, model):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def nni_training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
    """Written as NNI's evaluator documentation writes it: one optimizer, one scheduler, used directly."""
    total_epochs = max_epochs if max_epochs else 20
    total_steps = max_steps if max_steps else 1000000
    current_steps = 0
    for _ in range(total_epochs):
        for batch in _data():
            optimizers.zero_grad()
            loss = training_step(batch, model)["loss"]
            loss.backward()
            optimizers.step()
            current_steps += 1
            if current_steps >= total_steps:
                return
        if lr_schedulers is not None:
            lr_schedulers.step()


def recording(calls, body=nni_training_func):
    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        calls.append((model, optimizers, lr_schedulers, max_steps, max_epochs))
        body(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs)

    return training_func


def test_a_single_optimizer_and_scheduler_reach_training_func_as_themselves():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    calls = []
    evaluator = TorchEvaluator(recording(calls), optimizer, training_step, scheduler)
    quantizer = QATQuantizer(model, CONFIG, evaluator, quant_start_step=3)
    returned, config = quantizer.compress(max_steps=5, max_epochs=None)
    assert returned is model
    assert calls == [(model, optimizer, scheduler, 5, None)]
    assert calls[0][1] is optimizer and calls[0][2] is scheduler
    assert quantizer.current_step == 5
    assert set(config) == {"fc1", "fc2"} and set(config["fc1"]) == {"_input_0", "weight", "bias", "_output_0"}
    quantizer.compress(max_steps=None, max_epochs=1)  # 8 batches, then one scheduler step
    assert quantizer.current_step == 13 and scheduler.get_last_lr() == [0.05]


@pytest.mark.parametrize("container", [list, tuple])
def test_a_list_or_tuple_of_optimizers_and_schedulers_reaches_training_func_as_given(container):
    model = TwoLayer()
    first = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    second = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    optimizers = container([first, second])
    schedulers = container([torch.optim.lr_scheduler.StepLR(first, 1), torch.optim.lr_scheduler.StepLR(second, 1)])
    seen = []

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        seen.append((optimizers, lr_schedulers))
        for batch in _data()[:max_steps]:
            for optimizer in optimizers:
                optimizer.zero_grad()
            training_step(batch, model)["loss"].backward()
            for optimizer in optimizers:
                optimizer.step()

    quantizer = QATQuantizer(model, CONFIG, TorchEvaluator(training_func, optimizers, training_step, schedulers))
    quantizer.compress(max_steps=3)
    assert seen == [(optimizers, schedulers)] and seen[0][0] is optimizers and seen[0][1] is schedulers
    assert quantizer.current_step == 3  # the first optimizer's steps


@pytest.mark.parametrize("schedulers", [None, [], ()])
def test_no_scheduler_reaches_training_func_as_none(schedulers):
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    QATQuantizer(model, CONFIG, TorchEvaluator(recording(calls), optimizer, training_step, schedulers)).compress(2, None)
    assert calls[0][1] is optimizer and calls[0][2] is None


def test_nni_accessors_and_the_counted_optimizer():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    dummy = torch.randn(2, 4)
    evaluator = TorchEvaluator(nni_training_func, optimizer, training_step, dummy_input=dummy)
    assert evaluator.get_dummy_input() is dummy
    quantizer = QATQuantizer(model, CONFIG, evaluator)
    F.cross_entropy(model(dummy), torch.tensor([0, 1])).backward()
    other.step()  # another optimizer on the same model: not the evaluator's, so not counted
    assert quantizer.current_step == 0
    optimizer.step()
    assert quantizer.current_step == 1
    evaluator.bind_model(model, {"fc1.weight": "fc1.weight"})  # NNI's param_names_map: accepted, nothing to rename


def test_reduce_lr_on_plateau_is_a_scheduler_too():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    evaluator = TorchEvaluator(nni_training_func, optimizer, training_step, plateau)
    assert evaluator.lr_schedulers == [plateau]


def test_evaluate_returns_what_nni_returns():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    evaluator = TorchEvaluator(nni_training_func, optimizer, training_step, evaluating_func=lambda m: 0.75)
    QATQuantizer(model, CONFIG, evaluator)
    assert evaluator.evaluate() == 0.75  # a float comes back as it is
    evaluator.evaluating_func = lambda m: {"default": 0.5, "loss": 2.0}
    assert evaluator.evaluate() == (0.5, {"default": 0.5, "loss": 2.0})  # a dict: (its 'default', the dict)
    evaluator.evaluating_func = lambda m: {"accuracy": 0.5}
    with pytest.warns(UserWarning, match="without 'default'"):
        assert evaluator.evaluate() == (None, {"accuracy": 0.5})


def test_qat_trains_to_good_accuracy_on_a_separable_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    evaluator = TorchEvaluator(nni_training_func, optimizer, training_step)
    config = [{"op_types": ["Linear"], "quant_dtype": "int4", "quant_scheme": "affine"}]
    QATQuantizer(model, config, evaluator).compress(None, 20)
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in _data(seed=0))
    assert correct / 64 > 0.9


# ---- the budget ------------------------------------------------------------------------------------------------


def _compress_with(body, max_steps=3, max_epochs=None):
    model = TwoLayer()
    evaluator = TorchEvaluator(body, torch.optim.SGD(model.parameters(), lr=0.1), training_step)
    quantizer = QATQuantizer(model, CONFIG, evaluator)
    quantizer.compress(max_steps, max_epochs)
    return quantizer


def test_a_training_func_that_ignores_max_steps_is_named_in_a_warning_and_its_training_kept():
    def ignores_budget(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        for batch in _data():  # a whole epoch of 8 batches, whatever max_steps says
            optimizers.zero_grad()
            training_step(batch, model)["loss"].backward()
            optimizers.step()

    with pytest.warns(RuntimeWarning, match=r"training_func made 8 optimizer steps with optimizers, more than max_steps=3"):
        quantizer = _compress_with(ignores_budget)
    assert quantizer.current_step == 8  # nothing trained is lost


def test_a_training_func_that_makes_no_step_is_named_in_a_warning():
    def never_steps(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        training_step(_data()[0], model)

    with pytest.warns(RuntimeWarning, match="training_func made no optimizer step"):
        _compress_with(never_steps)


def test_a_training_func_that_keeps_to_its_budget_raises_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compress_with(nni_training_func).current_step == 3


def test_a_subclass_step_calling_super_counts_once_for_the_budget():
    class Stepping(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    model = TwoLayer()
    evaluator = TorchEvaluator(nni_training_func, Stepping(model.parameters(), lr=0.1), training_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QATQuantizer(model, CONFIG, evaluator).compress(4, None)


def test_an_error_inside_training_func_carries_the_budget_it_was_given():
    def epochs_only(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        for _ in range(max_epochs):  # max_epochs is None: compress() gave only max_steps
            pass

    with pytest.raises(TypeError) as raised:
        _compress_with(epochs_only, max_steps=3)
    notes = "".join(getattr(raised.value, "__notes__", []))
    if hasattr(raised.value, "add_note"):
        assert "max_steps=3, max_epochs=None" in notes


# ---- bad arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"training_func": None}, TypeError, "training_func must be callable"),
        ({"training_step": 3}, TypeError, "training_step must be callable"),
        ({"optimizers": None}, ValueError, "optimizers is empty"),
        ({"optimizers": []}, ValueError, "optimizers is empty"),
        ({"optimizers": ["sgd"]}, TypeError, r"optimizers\[0\] must be a torch.optim.Optimizer, got str"),
        ({"optimizers": "sgd"}, TypeError, "optimizers must be a torch.optim.Optimizer or a list of them, got str"),
        ({"lr_schedulers": 1}, TypeError, "lr_schedulers must be a torch.optim.lr_scheduler scheduler"),
        ({"lr_schedulers": [None]}, TypeError, r"lr_schedulers\[0\] must be"),
        ({"evaluating_func": "f"}, TypeError, "evaluating_func must be callable"),
    ],
)
def test_bad_evaluator_arguments(kwargs, error, match):
    model = TwoLayer()
    arguments = {
        "training_func": nni_training_func,
        "optimizers": torch.optim.SGD(model.parameters(), lr=0.1),
        "training_step": training_step,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        TorchEvaluator(**arguments)


def test_a_scheduler_of_another_optimizer_is_refused_naming_it():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stranger = torch.optim.SGD(TwoLayer().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"lr_schedulers \(StepLR\) schedules an optimizer that is not among optimizers"):
        TorchEvaluator(nni_training_func, optimizer, training_step, torch.optim.lr_scheduler.StepLR(stranger, 1))
    own = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    with pytest.raises(ValueError, match=r"lr_schedulers\[1\] \(ExponentialLR\)"):
        TorchEvaluator(nni_training_func, optimizer, training_step, [own, torch.optim.lr_scheduler.ExponentialLR(stranger, 0.9)])


def test_optimizer_of_another_model_is_refused_before_wrapping():
    model = TwoLayer()
    evaluator = TorchEvaluator(nni_training_func, torch.optim.SGD(TwoLayer().parameters(), lr=0.1), training_step)
    with pytest.raises(ValueError, match="optimizers updates none of the model's parameters"):
        QATQuantizer(model, CONFIG, evaluator)
    assert type(model.fc1) is nn.Linear
    evaluator = TorchEvaluator(nni_training_func, [torch.optim.SGD(TwoLayer().parameters(), lr=0.1)], training_step)
    with pytest.raises(ValueError, match=r"optimizers\[0\] updates none"):
        QATQuantizer(model, CONFIG, evaluator)
    assert type(model.fc1) is nn.Linear


def test_compress_argument_errors():
    model = TwoLayer()
    with pytest.raises(ValueError, match="evaluator"):
        QATQuantizer(model, CONFIG).compress(max_steps=1)
    model = TwoLayer()
    evaluator = TorchEvaluator(nni_training_func, torch.optim.SGD(model.parameters(), lr=0.1), training_step)
    quantizer = QATQuantizer(model, CONFIG, evaluator)
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        quantizer.compress()
    with pytest.raises(ValueError, match="max_steps"):
        quantizer.compress(max_steps=0)
    with pytest.warns(UserWarning, match="no evaluating_func was given, so evaluate\\(\\) returns None"):
        assert evaluator.evaluate() is None  # as NNI
