"""TorchEvaluator and QATQuantizer.compress with the reference's calling convention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TwoLayer
from quantrain import QATQuantizer, TorchEvaluator


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x[i : i + 8], (x[i : i + 8].sum(1) > 0).long() % 3) for i in range(0, n, 8)]


def training_step(batch, model):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def make_training_func(calls):
    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        calls.append((model, optimizers, lr_schedulers, max_steps, max_epochs))
        steps = 0
        for _ in range(max_epochs or 100):
            for batch in _data():
                if max_steps is not None and steps >= max_steps:
                    return
                optimizers[0].zero_grad()
                training_step(batch, model)["loss"].backward()
                optimizers[0].step()
                steps += 1
            for scheduler in lr_schedulers or ():
                scheduler.step()

    return training_func


def test_compress_runs_the_training_func_with_the_reference_arguments():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    calls = []
    evaluator = TorchEvaluator(
        make_training_func(calls), optimizer, training_step, scheduler, evaluating_func=lambda m: {"default": 1.0}
    )
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}], evaluator, quant_start_step=3)
    returned, config = quantizer.compress(max_steps=5)
    assert returned is model
    assert calls == [(model, [optimizer], [scheduler], 5, None)]
    assert quantizer.current_step == 5
    assert set(config) == {"fc1", "fc2"} and set(config["fc1"]) == {"_input_0", "weight", "bias", "_output_0"}
    assert evaluator.evaluate() == {"default": 1.0}
    quantizer.compress(max_epochs=1)
    assert quantizer.current_step == 13 and scheduler.get_last_lr() == [0.05]


def test_qat_trains_to_good_accuracy_on_a_separable_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    evaluator = TorchEvaluator(make_training_func([]), optimizer, training_step)
    config = [{"op_types": ["Linear"], "quant_dtype": "int4", "quant_scheme": "affine"}]
    QATQuantizer(model, config, evaluator).compress(max_epochs=20)
    model.eval()
    batches = _data(seed=0)
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    assert correct / 64 > 0.9


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"training_func": None}, TypeError, "training_func"),
        ({"training_step": 3}, TypeError, "training_step"),
        ({"optimizers": []}, ValueError, "optimizers"),
        ({"optimizers": ["sgd"]}, TypeError, "optimizers"),
        ({"lr_schedulers": 1}, TypeError, "lr_schedulers"),
        ({"evaluating_func": "f"}, TypeError, "evaluating_func"),
    ],
)
def test_bad_evaluator_arguments(kwargs, error, match):
    model = TwoLayer()
    arguments = {
        "training_func": make_training_func([]),
        "optimizers": torch.optim.SGD(model.parameters(), lr=0.1),
        "training_step": training_step,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        TorchEvaluator(**arguments)


def test_optimizer_of_another_model_is_refused_before_wrapping():
    model = TwoLayer()
    evaluator = TorchEvaluator(make_training_func([]), torch.optim.SGD(TwoLayer().parameters(), lr=0.1), training_step)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        QATQuantizer(model, [{"op_types": ["Linear"]}], evaluator)
    assert type(model.fc1) is nn.Linear


def test_compress_argument_errors():
    model = TwoLayer()
    with pytest.raises(ValueError, match="evaluator"):
        QATQuantizer(model, [{"op_types": ["Linear"]}]).compress(max_steps=1)
    model = TwoLayer()
    evaluator = TorchEvaluator(make_training_func([]), torch.optim.SGD(model.parameters(), lr=0.1), training_step)
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}], evaluator)
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        quantizer.compress()
    with pytest.raises(ValueError, match="max_steps"):
        quantizer.compress(max_steps=0)
    with pytest.raises(ValueError, match="evaluating_func"):
        evaluator.evaluate()
