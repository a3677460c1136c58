"""Evaluators: how a quantizer drives the user's training, with the reference's calling convention.

``TorchEvaluator`` wraps a plain PyTorch loop. The user writes::

    def training_step(batch, model):                 # returns the loss (or (loss, ...) or {"loss": loss})
        x, y = batch
        return F.cross_entropy(model(x), y)

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        ...  # the usual loop; it must stop after max_steps optimizer steps / max_epochs epochs

and the quantizer calls ``training_func`` once per ``compress``. Optimizers are plain ``torch.optim`` objects built
on the model's parameters (they stay the same Parameter objects after quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Evaluator", "TorchEvaluator"]


class Evaluator:
    """Base class: something that can train and evaluate a bound model."""

    model: nn.Module | None = None

    def bind_model(self, model: nn.Module) -> None:
        self.model = model

    @property
    def first_optimizer(self) -> torch.optim.Optimizer | None:
        return None

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError


class TorchEvaluator(Evaluator):
    """Drive a plain PyTorch training loop.

    Args:
        training_func: ``training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs)``.
        optimizers: one optimizer or a list of them; the first one's steps are counted as training steps.
        training_step: ``training_step(batch, model)`` returning the loss, a tuple starting with it, or a dict
            with key ``'loss'``; passed through to ``training_func``.
        lr_schedulers: one scheduler, a list, or ``None``.
        dummy_input: an example input, used by :meth:`QATQuantizer.track_forward` callers and exporters.
        evaluating_func: ``evaluating_func(model)`` returning a float or a dict with key ``'default'``.
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
        self.optimizers = _as_list("optimizers", optimizers, torch.optim.Optimizer, allow_empty=False)
        self.lr_schedulers = _as_list("lr_schedulers", lr_schedulers, torch.optim.lr_scheduler.LRScheduler, allow_empty=True)
        self.dummy_input = dummy_input

    def bind_model(self, model: nn.Module) -> None:
        owned = {id(p) for p in model.parameters()}
        optimized = {id(p) for group in self.optimizers[0].param_groups for p in group["params"]}
        if not owned & optimized:
            raise ValueError(
                "TorchEvaluator: optimizers[0] updates none of the model's parameters; build it on "
                "model.parameters() of the model being quantized"
            )
        super().bind_model(model)

    @property
    def first_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        if self.model is None:
            raise RuntimeError("TorchEvaluator: no model bound; pass the evaluator to a quantizer first")
        schedulers = self.lr_schedulers or None
        self.training_func(self.model, self.optimizers, self.training_step, schedulers, max_steps, max_epochs)

    def evaluate(self) -> Any:
        if self.evaluating_func is None:
            raise ValueError("TorchEvaluator: no evaluating_func was given")
        if self.model is None:
            raise RuntimeError("TorchEvaluator: no model bound; pass the evaluator to a quantizer first")
        return self.evaluating_func(self.model)


def _check_callable(name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"TorchEvaluator: {name} must be callable, got {type(value).__name__}")


def _as_list(name: str, value: Any, kind: type, *, allow_empty: bool) -> list:
    if value is None:
        items: list = []
    elif isinstance(value, kind):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"TorchEvaluator: {name} must be a {kind.__name__} or a list of them, got {type(value).__name__}")
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"TorchEvaluator: {name} must contain only {kind.__name__} objects, got {type(item).__name__}")
    if not items and not allow_empty:
        raise ValueError(f"TorchEvaluator: {name} must not be empty")
    return items
