"""TorchEvaluator as NNI 3.0's evaluator page (``docs/source/compression/evaluator.rst``) and its docstring use it.

``TorchEvaluator(training_func, optimizer, training_step, lr_scheduler, dummy_input=..., evaluating_func=...)`` with the
arguments in NNI's positions; ``training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs)``
written as the page writes it (a total step count from ``max_steps`` or ``max_epochs * len(train_dataloader)``, an
epoch-wise scheduler) and as the PTQ example writes it for a list of optimizers; ``evaluate()`` returning NNI's shapes
(a float as it is, a dict as ``(dict['default'], dict)``, ``(None, dict)`` without ``'default'``).
"""

from __future__ import annotations

import pytest
import torch
from nni_style_common import DocTrainingFunc, Net, check_entry, digits_loaders, make_evaluating_func, training_step
from torch.optim import Optimizer

from quantrain import PtqQuantizer, QATQuantizer, TorchEvaluator

CONFIG_LIST = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
    }
]
BATCHES = 4


def evaluator_page_training_func(train_dataloader, calls):
    """The evaluator page's ``training_func``: a total step budget, then as many epochs as it needs."""

    def training_func(model, optimizer, training_step, lr_scheduler, max_steps, max_epochs):
        calls.append((optimizer, lr_scheduler, max_steps, max_epochs))
        assert max_steps is not None or max_epochs is not None
        total_steps = max_steps if max_steps else max_epochs * len(train_dataloader)
        total_epochs = total_steps // len(train_dataloader) + (0 if total_steps % len(train_dataloader) == 0 else 1)

        current_step = 0
        model.train()
        for _ in range(total_epochs):
            for batch in train_dataloader:
                optimizer.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizer.step()
                current_step = current_step + 1
                if current_step >= total_steps:
                    return
            lr_scheduler.step()

    return training_func


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "steps", "scheduler_steps"), [(None, 2, 8, 1), (6, None, 6, 1), (3, 5, 3, 0)]
)
def test_the_evaluator_page_loop_with_its_lambda_scheduler(max_steps, max_epochs, steps, scheduler_steps):
    torch.manual_seed(0)
    train_dataloader, test_dataloader = digits_loaders(train_size=64 * BATCHES)
    model = Net()
    calls = []
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: 1 / (epoch + 1))
    dummy_input = torch.rand(8, 1, 8, 8)
    evaluator = TorchEvaluator(
        evaluator_page_training_func(train_dataloader, calls),
        optimizer,
        training_step,
        lr_scheduler,
        dummy_input=dummy_input,
        evaluating_func=make_evaluating_func(test_dataloader),
    )
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator)
    quantizer.track_forward(evaluator.dummy_input)  # NNI's docs: a forward on the dummy input before training
    _, calibration_config = quantizer.compress(max_steps, max_epochs)

    # what training_func got is what the evaluator was given: no re-created optimizer or scheduler
    assert calls == [(optimizer, lr_scheduler, max_steps, max_epochs)]
    assert quantizer.current_step == steps
    # the loop returns before the scheduler step of its last epoch
    assert lr_scheduler.last_epoch == scheduler_steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 / (scheduler_steps + 1))
    assert optimizer.state_dict()["state"][0]["step"].item() == steps  # Adam's own count: the user's optimizer stepped
    assert set(calibration_config) == {"conv1", "conv2", "fc1", "fc2"}
    for targets in calibration_config.values():
        for entry in targets.values():
            check_entry(entry, shape=())


def ptq_example_training_func(train_dataloader, calls):
    """The PTQ example's loop: a single optimizer or a list of them, a scheduler (or a list) stepped every batch."""

    def training_model(model, optimizer, training_step, scheduler=None, max_steps=None, max_epochs=None):
        calls.append((optimizer, scheduler, max_steps, max_epochs))
        model.train()
        max_epochs = max_epochs if max_epochs else 10 if max_steps is None else 100
        current_steps = 0
        for _ in range(max_epochs):
            for batch in train_dataloader:
                if isinstance(optimizer, Optimizer):
                    optimizer.zero_grad()
                elif isinstance(optimizer, list) and all(isinstance(_, Optimizer) for _ in optimizer):
                    for opt in optimizer:
                        opt.zero_grad()
                loss = training_step(batch, model)
                assert isinstance(loss, torch.Tensor)
                loss.backward()
                if isinstance(optimizer, Optimizer):
                    optimizer.step()
                elif isinstance(optimizer, list) and all(isinstance(_, Optimizer) for _ in optimizer):
                    for opt in optimizer:
                        opt.step()
                if isinstance(scheduler, list):
                    for sch in scheduler:
                        sch.step()
                elif scheduler is not None:
                    scheduler.step()
                current_steps += 1
                if max_steps and current_steps == max_steps:
                    return

    return training_model


def test_a_list_of_optimizers_reaches_training_func_as_that_list():
    torch.manual_seed(0)
    train_dataloader, _ = digits_loaders(train_size=64 * BATCHES)
    model = Net()
    conv_params = [p for name, p in model.named_parameters() if name.startswith("conv")]
    fc_params = [p for name, p in model.named_parameters() if name.startswith("fc")]
    optimizers = [torch.optim.SGD(conv_params, lr=0.05), torch.optim.SGD(fc_params, lr=0.05)]
    schedulers = [torch.optim.lr_scheduler.StepLR(optimizers[0], 1, 0.9)]
    calls = []
    evaluator = TorchEvaluator(ptq_example_training_func(train_dataloader, calls), optimizers, training_step, schedulers)
    quantizer = PtqQuantizer(model, CONFIG_LIST, evaluator)
    _, calibration_config = quantizer.compress(5, None)

    assert len(calls) == 1
    assert calls[0][0] is optimizers
    assert calls[0][1] is schedulers
    assert calls[0][2:] == (5, None)
    assert schedulers[0].last_epoch == 5
    assert set(calibration_config) == {"conv1", "conv2", "fc1", "fc2"}


def test_without_a_scheduler_training_func_gets_none():
    torch.manual_seed(0)
    train_dataloader, _ = digits_loaders(train_size=64 * BATCHES)
    model = Net()
    training_func = DocTrainingFunc(train_dataloader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    quantizer = QATQuantizer(model, CONFIG_LIST, TorchEvaluator(training_func, optimizer, training_step))
    quantizer.compress(None, 1)
    assert training_func.calls[0]["lr_schedulers"] is None
    assert training_func.calls[0]["training_step"] is training_step
    assert training_func.calls[0]["model"] is model
    assert quantizer.current_step == BATCHES


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (0.75, 0.75),
        ({"default": 0.5, "loss": 1.25}, (0.5, {"default": 0.5, "loss": 1.25})),
        ({"loss": 1.25}, (None, {"loss": 1.25})),
    ],
    ids=["float", "dict-with-default", "dict-without-default"],
)
def test_evaluate_returns_what_nni_returns(metric, expected, recwarn):
    model = Net()
    evaluated = []

    def evaluating_func(model):
        evaluated.append(model)
        return metric

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    evaluator = TorchEvaluator(DocTrainingFunc([]), optimizer, training_step, evaluating_func=evaluating_func)
    QATQuantizer(model, CONFIG_LIST, evaluator)
    assert evaluator.evaluate() == expected
    assert evaluated == [model]
    warned = [str(w.message) for w in recwarn.list if "default" in str(w.message)]
    assert len(warned) == (1 if isinstance(expected, tuple) and expected[0] is None else 0)
