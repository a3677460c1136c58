"""Evaluators: how a quantizer drives the user's training, with NNI 3.0's calling convention.

``TorchEvaluator`` wraps a plain PyTorch loop written the way NNI's documentation writes it::

    def training_step(batch, model):                 # returns the loss (or (loss, ...) or {"loss": loss})
        x, y = batch
        return F.cross_entropy(model(x), y)

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        for epoch in range(max_epochs or 10):
            for step, batch in enumerate(loader):
                if max_steps is not None and step >= max_steps:   # the loop must honour the budget it is given
                    return
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()
            if lr_schedulers is not None:
                lr_schedulers.step()

``training_func`` receives the optimizers and schedulers as they were given to the evaluator: one optimizer
stays that optimizer object, a list (or tuple) stays that list; no scheduler, or an empty list, arrives as
``None``. The quantizer calls ``training_func`` once per ``compress``. Optimizers are plain ``torch.optim``
objects built on the model's parameters (they stay the same Parameter objects after quantization), so nothing has
to be traced or re-created.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
...     for _ in range(max_steps):
...         optimizers.zero_grad(); training_step(torch.ones(4, 2), model).backward(); optimizers.step()
>>> evaluator = TorchEvaluator(training_func, optimizer, lambda batch, model: model(batch).sum(),
...                            evaluating_func=lambda model: {"default": 0.5, "loss": 1.0})
>>> evaluator.bind_model(model)
>>> evaluator.train(max_steps=3)
>>> evaluator.evaluate()
(0.5, {'default': 0.5, 'loss': 1.0})
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Evaluator", "TorchEvaluator", "nni_metric"]

SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


class Evaluator:
    """Base class: something that can train and evaluate a bound model."""

    model: nn.Module | None = None
    dummy_input: Any = None

    def bind_model(self, model: nn.Module, param_names_map: dict[str, str] | None = None) -> None:
        """Bind the model to train and evaluate (``param_names_map`` is NNI's, for wrapped parameter names; quantrain
        never renames parameters, so it is accepted and ignored)."""
        self.model = model

    def get_dummy_input(self) -> Any:
        """The example input given as ``dummy_input`` (NNI's accessor)."""
        return self.dummy_input

    @property
    def first_optimizer(self) -> torch.optim.Optimizer | None:
        return None

    @property
    def can_evaluate(self) -> bool:
        """Whether :meth:`evaluate` has evaluation data to run (what bias correction measures on)."""
        return True

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError


class TorchEvaluator(Evaluator):
    """Drive a plain PyTorch training loop (NNI 3.0's ``TorchEvaluator``, without ``nni.trace``).

    Args:
        training_func: ``training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs)``;
            it must stop after ``max_steps`` optimizer steps and/or ``max_epochs`` epochs (either may be ``None``).
        optimizers: one ``torch.optim.Optimizer`` or a list/tuple of them, built on the model's parameters. The
            first one's steps are the quantizer's steps. ``training_func`` receives exactly this object.
        training_step: ``training_step(batch, model)`` returning the loss, a tuple starting with it, or a dict
            with key ``'loss'``; passed through to ``training_func``.
        lr_schedulers: one scheduler, a list/tuple of them, or ``None``; each must schedule one of ``optimizers``.
            ``training_func`` receives this object (``None`` for an empty list).
        dummy_input: an example input, for :meth:`~quantrain.QATQuantizer.track_forward` callers and exporters.
        evaluating_func: ``evaluating_func(model)`` returning a float, or a dict with the metric under ``'default'``.

    After a ``training_func`` returns, the evaluator checks the budget: a ``RuntimeWarning`` names
    ``training_func`` when it made more optimizer steps than ``max_steps``, or none at all. An exception raised
    inside it gets a note with the budget it was called with.
    """

    def __init__(
        self,
        training_func: Callable[..., Any],
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        training_step: Callable[..., Any],
        lr_schedulers: Any = None,
        dummy_input: Any = None,
        evaluating_func: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        _check_callable("training_func", training_func)
        _check_callable("training_step", training_step)
        if evaluating_func is not None:
            _check_callable("evaluating_func", evaluating_func)
        self.training_func = training_func
        self.training_step = training_step
        self.evaluating_func = evaluating_func
        self.optimizers = _as_list("optimizers", optimizers, (torch.optim.Optimizer,), "a torch.optim.Optimizer")
        if not self.optimizers:
            raise ValueError(
                "TorchEvaluator: optimizers is empty; give the optimizer that trains the model (its steps are the "
                "quantizer's steps)"
            )
        self.lr_schedulers = _as_list("lr_schedulers", lr_schedulers, SCHEDULER_TYPES, "a torch.optim.lr_scheduler scheduler")
        for index, scheduler in enumerate(self.lr_schedulers):
            if not any(scheduler.optimizer is optimizer for optimizer in self.optimizers):
                where = "lr_schedulers" if isinstance(lr_schedulers, SCHEDULER_TYPES) else f"lr_schedulers[{index}]"
                raise ValueError(
                    f"TorchEvaluator: {where} ({type(scheduler).__name__}) schedules an optimizer that is not among "
                    "optimizers; build it on one of the optimizers given to the evaluator"
                )
        # training_func gets what the user gave, as NNI hands it over (an empty scheduler list becomes None).
        self._given_optimizers = optimizers
        self._given_schedulers = lr_schedulers if self.lr_schedulers else None
        self.dummy_input = dummy_input

    def bind_model(self, model: nn.Module, param_names_map: dict[str, str] | None = None) -> None:
        owned = {id(p) for p in model.parameters()}
        optimized = {id(p) for group in self.optimizers[0].param_groups for p in group["params"]}
        if not owned & optimized:
            first = "optimizers" if isinstance(self._given_optimizers, torch.optim.Optimizer) else "optimizers[0]"
            raise ValueError(
                f"TorchEvaluator: {first} updates none of the model's parameters; build it on "
                "model.parameters() of the model being quantized"
            )
        super().bind_model(model)

    @property
    def first_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    @property
    def can_evaluate(self) -> bool:
        return self.evaluating_func is not None

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """Call ``training_func`` once with the given budget, then check that it kept to ``max_steps``."""
        model = self._bound_model()
        steps = _StepCounter(self.optimizers[0])
        try:
            self.training_func(model, self._given_optimizers, self.training_step, self._given_schedulers, max_steps, max_epochs)
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(
                    f"(raised inside training_func, which compress() called with max_steps={max_steps!r}, "
                    f"max_epochs={max_epochs!r}: either may be None)"
                )
            raise
        finally:
            steps.remove()
        _check_steps_taken(steps.count, max_steps, self._given_optimizers)

    def evaluate(self) -> Any:
        """Run ``evaluating_func(model)``. As in NNI: a dict metric comes back as ``(metric['default'], metric)``,
        anything else as it is; without an ``evaluating_func``, ``None`` with a warning."""
        if self.evaluating_func is None:
            warnings.warn("TorchEvaluator: no evaluating_func was given, so evaluate() returns None", stacklevel=2)
            return None
        metric = self.evaluating_func(self._bound_model())
        if isinstance(metric, dict):
            return nni_metric(metric.get("default"), metric, "evaluating_func returned a dict without 'default'")
        return metric

    def _bound_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("TorchEvaluator: no model bound; pass the evaluator to a quantizer first")
        return self.model


def nni_metric(value: Any, metrics: Any, missing: str) -> tuple[Any, Any]:
    """NNI's evaluate() result ``(value, metrics)``; a missing ``value`` is ``None`` with a warning, as in NNI."""
    if value is None:
        warnings.warn(f"{missing}: evaluate() returns None as the metric, with the metrics beside it", stacklevel=3)
    return value, metrics


class _StepCounter:
    """Counts an optimizer's steps while it is attached (a subclass whose ``step`` calls ``super().step()`` runs the
    hooks once per class: only the outermost step counts)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        self._depth = 0
        self._handles = [optimizer.register_step_pre_hook(self._enter), optimizer.register_step_post_hook(self._exit)]

    def _enter(self, *_: Any) -> None:
        self._depth += 1

    def _exit(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth <= 0:
            self._depth = 0
            self.count += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_steps_taken(steps: int, max_steps: int | None, optimizers: Any) -> None:
    first = "optimizers" if isinstance(optimizers, torch.optim.Optimizer) else "optimizers[0]"
    if max_steps is not None and steps > max_steps:
        warnings.warn(
            f"TorchEvaluator: training_func made {steps} optimizer steps with {first}, more than max_steps={max_steps}; "
            "a training_func must stop after max_steps steps (the quantizer counted all of them)",
            RuntimeWarning,
            stacklevel=4,
        )
    elif steps == 0:
        warnings.warn(
            f"TorchEvaluator: training_func made no optimizer step with {first}, so the quantizer counted none; "
            "it should call step() on the optimizers it is given",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_callable(name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"TorchEvaluator: {name} must be callable, got {type(value).__name__}")


def _as_list(name: str, value: Any, kinds: tuple[type, ...], kind_name: str) -> list:
    if value is None:
        return []
    if isinstance(value, kinds):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"TorchEvaluator: {name} must be {kind_name} or a list of them, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, kinds):
            raise TypeError(f"TorchEvaluator: {name}[{index}] must be {kind_name}, got {type(item).__name__}")
    return list(value)
