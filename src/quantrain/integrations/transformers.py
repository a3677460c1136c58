"""Hugging Face Transformers: train a quantized model with a ``transformers.Trainer``.

Two ways in, both counting the quantizer's steps as the Trainer's optimizer steps (``state.global_step``):

* :class:`TransformersEvaluator` (NNI 3.0's calling convention): the quantizer drives the Trainer::

      trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
      quantizer = QATQuantizer(model, config_list, evaluator=TransformersEvaluator(trainer))
      model, calibration_config = quantizer.compress(max_steps=1000)
      metric, metrics = quantizer.evaluator.evaluate()  # NNI's (metric, {"eval_loss": ..., ...})

* :class:`QuantizationTrainerCallback`: keep calling ``trainer.train()`` yourself::

      quantizer = QATQuantizer(model, config_list)
      trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[QuantizationTrainerCallback(quantizer)])
      trainer.train()

``transformers`` (and ``accelerate``, which its Trainer needs) are imported only when one of these is used: install
them with ``pip install 'quantrain[transformers]'``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch
from torch import nn

from quantrain.base import LINK_ATTRIBUTE, Quantizer
from quantrain.evaluator import Evaluator, nni_metric

__all__ = ["QuantizationTrainerCallback", "TransformersEvaluator"]  # noqa: F822 (the callback is built on first use)

INSTALL_HINT = "pip install 'quantrain[transformers]'"


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(f"the Transformers integration needs transformers and accelerate: {INSTALL_HINT}") from error


def _underlying_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` that really steps: accelerate's (and DeepSpeed's) wrappers keep it in ``.optimizer``.

    The wrappers' own ``step`` does not run torch's optimizer hooks, so only the wrapped optimizer's steps can be counted.
    """
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _contains(outer: Any, model: nn.Module) -> bool:
    return isinstance(outer, nn.Module) and any(module is model for module in outer.modules())


def _quantizer_of(model: nn.Module) -> Quantizer | None:
    """The live quantizer that quantizes ``model`` (None if it is not quantized, or its quantizer is gone)."""
    link = model.__dict__.get(LINK_ATTRIBUTE)
    return getattr(link, "quantizer", None)


class TransformersEvaluator(Evaluator):
    """Drive a ``transformers.Trainer`` for :meth:`QATQuantizer.compress` (NNI 3.0's ``TransformersEvaluator``).

    Build the Trainer on the float model first (its ``model`` must be the model given to the quantizer, or contain
    it), then give the evaluator to the quantizer.

    Steps, by NNI's rule: ``compress(max_steps, max_epochs)`` runs ``trainer.train()`` once with
    ``args.max_steps = max_steps`` where given and ``args.num_train_epochs = max_epochs`` where given; a limit not
    given leaves the argument's own value in force, and the Trainer's meaning applies (a positive ``max_steps``
    overrides ``num_train_epochs``), so ``TrainingArguments(max_steps=3)`` with ``compress(None, 1)`` trains 3
    steps, as NNI does. The user's ``max_steps`` and ``num_train_epochs`` are restored afterwards. One quantizer
    step is counted per optimizer step of the Trainer, which is one ``state.global_step``: with
    ``gradient_accumulation_steps=k`` that is one step per ``k`` micro-batches. An optimizer step that mixed
    precision skips (inf/NaN gradients) still counts, as it does for the Trainer.

    Repeated ``compress()`` calls continue training: the quantizer's step count (and its schedule) carries on from
    where it stopped, as do the weights and the Trainer's optimizer with its state (e.g. Adam's moments). Each call is
    a new ``trainer.train()`` run, though: ``trainer.state.global_step`` restarts at 0, the data restart from epoch 0,
    and a learning-rate scheduler the Trainer created itself is created again over the new budget (warmup and decay
    restart). To keep one schedule across calls, pass your own ``optimizers=(optimizer, scheduler)`` to the Trainer.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) whose ``model`` is the model to quantize.
        dummy_input: an example input, for :meth:`QATQuantizer.track_forward` callers and exporters.
    """

    def __init__(self, trainer: Any, dummy_input: Any = None) -> None:
        transformers = _import_transformers()
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"TransformersEvaluator: trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if not isinstance(trainer.model, nn.Module):
            raise ValueError(
                f"TransformersEvaluator: trainer.model must be a torch.nn.Module, got {type(trainer.model).__name__} "
                "(a Trainer built with model_init creates its model in train(); build it with model=... instead)"
            )
        self.trainer = trainer
        self.dummy_input = dummy_input

    def bind_model(self, model: nn.Module, param_names_map: dict[str, str] | None = None) -> None:
        if not _contains(self.trainer.model, model):
            raise ValueError(
                "TransformersEvaluator: trainer.model is not the model being quantized (nor contains it); "
                "build the Trainer on the same model object you give the quantizer"
            )
        super().bind_model(model)

    @property
    def first_optimizer(self) -> torch.optim.Optimizer | None:
        """The Trainer's optimizer (unwrapped from accelerate), or None before the Trainer has created it.

        In the latter case the optimizer the Trainer creates in ``train()`` is attached when training begins.
        """
        optimizer = _underlying_optimizer(self.trainer.optimizer)
        return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """One ``trainer.train()`` with NNI's budget: ``args.max_steps = max_steps`` and/or ``args.num_train_epochs =
        max_epochs`` where given, the arguments' own values otherwise (restored afterwards)."""
        if self.model is None:
            raise RuntimeError("TransformersEvaluator: no model bound; pass the evaluator to a quantizer first")
        _check_budget(max_steps, max_epochs)
        callbacks = self._callbacks()
        args = self.trainer.args
        saved = args.max_steps, args.num_train_epochs
        if max_steps is not None:
            args.max_steps = max_steps
        if max_epochs is not None:
            args.num_train_epochs = max_epochs
        for callback in callbacks:
            self.trainer.add_callback(callback)
        try:
            self.trainer.train()
        finally:
            args.max_steps, args.num_train_epochs = saved
            for callback in callbacks:
                self.trainer.remove_callback(callback)

    def _callbacks(self) -> list:
        quantizer = _quantizer_of(self.model)
        installed = self.trainer.callback_handler.callbacks
        if quantizer is not None and not any(getattr(cb, "quantizer", None) is quantizer for cb in installed):
            return [_callback_class()(quantizer)]
        return []

    @property
    def can_evaluate(self) -> bool:
        return self.trainer.eval_dataset is not None

    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        """Run ``trainer.evaluate()`` and return NNI's ``(metric, metrics)``.

        ``metric`` is the one the evaluation reports as ``'default'`` (the Trainer prefixes it: ``'eval_default'``),
        else the one ``args.metric_for_best_model`` names; ``None`` (with a warning, as in NNI) when neither exists.
        """
        if self.model is None:
            raise RuntimeError("TransformersEvaluator: no model bound; pass the evaluator to a quantizer first")
        if self.trainer.eval_dataset is None:
            raise ValueError("TransformersEvaluator: evaluate() needs the trainer to have an eval_dataset")
        metrics = dict(self.trainer.evaluate())
        return nni_metric(
            _default_metric(metrics, self.trainer.args.metric_for_best_model),
            metrics,
            "TransformersEvaluator: trainer.evaluate() reported no 'default' (or 'eval_default') metric and "
            "args.metric_for_best_model is not set",
        )


def _check_budget(max_steps: Any, max_epochs: Any) -> None:
    if max_steps is None and max_epochs is None:
        raise ValueError("TransformersEvaluator: train() needs max_steps or max_epochs (or both)")
    for name, value in (("max_steps", max_steps), ("max_epochs", max_epochs)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"TransformersEvaluator: {name} must be a positive int or None, got {value!r}")


def _default_metric(metrics: dict[str, Any], metric_for_best_model: str | None) -> float | None:
    for key in ("default", "eval_default"):
        if key in metrics:
            return float(metrics[key])
    if metric_for_best_model:
        key = metric_for_best_model if metric_for_best_model.startswith("eval_") else f"eval_{metric_for_best_model}"
        if key in metrics:
            return float(metrics[key])
        warnings.warn(
            f"TransformersEvaluator: metric_for_best_model {key!r} is not among the metrics {sorted(metrics)}", stacklevel=3
        )
    return None


class _QuantizationCallbackMixin:
    """A ``transformers.TrainerCallback`` that keeps a quantizer in step with a Trainer you drive yourself.

    At ``on_train_begin`` it checks that the Trainer's model is the quantizer's model (or contains it) and attaches
    the Trainer's optimizer (the ``torch.optim.Optimizer`` inside accelerate's wrapper) to the quantizer, so its steps
    are the ones counted. The quantizer then counts one step per optimizer step, i.e. per ``state.global_step``
    (``gradient_accumulation_steps`` micro-batches make one step). At every ``on_step_end`` it checks the count:
    steps the Trainer made without stepping the optimizer (mixed precision skips one on inf/NaN gradients) are
    counted too, so the quantizer's schedule follows ``state.global_step``; more steps than the Trainer made (the
    optimizer stepped outside the Trainer's loop) only warn.

    The quantizer's count is cumulative over ``train()`` calls (``global_step`` restarts at 0 in each; resuming from
    a checkpoint restores both the Trainer's ``global_step`` and the quantizer's step from the model's state).

    Args:
        quantizer: the quantrain quantizer (e.g. :class:`~quantrain.QATQuantizer`) of the Trainer's model.
    """

    def __init__(self, quantizer: Quantizer) -> None:
        if not isinstance(quantizer, Quantizer):
            kind = type(quantizer).__name__
            raise TypeError(f"QuantizationTrainerCallback: quantizer must be a quantrain quantizer, got {kind}")
        self.quantizer = quantizer
        self._offset: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.quantizer._check_wrapped()
        if not _contains(kwargs.get("model"), self.quantizer.bound_model):
            raise ValueError(
                "QuantizationTrainerCallback: the Trainer's model is not the quantizer's model (nor contains it); "
                "build the Trainer on the model you gave the quantizer"
            )
        inner = _underlying_optimizer(kwargs.get("optimizer"))
        if isinstance(inner, torch.optim.Optimizer):
            self.quantizer.attach_optimizer(inner)
        self._offset = self.quantizer.current_step - state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._offset is None:
            return
        expected = self._offset + state.global_step
        while self.quantizer.current_step < expected:
            self.quantizer.step()
        if self.quantizer.current_step > expected:
            warnings.warn(
                f"QuantizationTrainerCallback: the quantizer counted {self.quantizer.current_step - expected} more "
                "optimizer steps than the Trainer made; was the optimizer stepped outside trainer.train()?",
                stacklevel=2,
            )
            self._offset = self.quantizer.current_step - state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._offset = None


_CLASSES: dict[str, type] = {}


def _with_trainer_callback(name: str, mixin: type) -> type:
    """``mixin`` made a real ``transformers.TrainerCallback`` subclass, created once, on first use."""
    if name not in _CLASSES:
        base = _import_transformers().TrainerCallback
        namespace = {"__module__": __name__, "__doc__": mixin.__doc__, "__qualname__": name}
        _CLASSES[name] = type(name, (mixin, base), namespace)
    return _CLASSES[name]


def _callback_class() -> type:
    return _with_trainer_callback("QuantizationTrainerCallback", _QuantizationCallbackMixin)


def __getattr__(name: str) -> Any:
    # QuantizationTrainerCallback subclasses transformers.TrainerCallback: build it only when asked for, so importing
    # this module does not import transformers.
    if name == "QuantizationTrainerCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
