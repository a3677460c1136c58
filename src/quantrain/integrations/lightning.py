"""PyTorch Lightning: train a quantized ``LightningModule`` with Lightning's ``Trainer``.

Two ways in. :class:`LightningEvaluator` follows NNI 3.0's calling convention: the quantizer drives the training
through ``compress``::

    import lightning.pytorch as pl
    from quantrain import QATQuantizer
    from quantrain.integrations.lightning import LightningEvaluator

    trainer = pl.Trainer(accelerator="cpu", logger=False)
    evaluator = LightningEvaluator(trainer, data_module)    # data_module: a LightningDataModule
    quantizer = QATQuantizer(model, config_list, evaluator, quant_start_step=100)  # model: a LightningModule
    model, calibration_config = quantizer.compress(max_steps=1000)
    model, calibration_config = quantizer.compress(max_steps=500)  # continues: 1500 optimizer steps in all
    score, results = evaluator.evaluate()                    # the mean of what the model logs as 'default'

:class:`QuantizationCallback` is for a ``Trainer`` you drive yourself::

    from quantrain.integrations.lightning import QuantizationCallback

    quantizer = QATQuantizer(model, config_list, quant_start_step=100)   # before fit (and before any DDP wrapping)
    trainer = pl.Trainer(max_steps=1000, callbacks=[QuantizationCallback(quantizer)])
    trainer.fit(model, datamodule=data_module)
    calibration_config = quantizer.get_calibration_config()

Either way, quantrain's steps are the first optimizer's steps, as Lightning's ``trainer.global_step`` counts them
(with ``accumulate_grad_batches=k``, one step per ``k`` batches). Lightning is imported only when one of these
is used (``pip install 'quantrain[lightning]'``); both ``lightning.pytorch`` and the standalone
``pytorch_lightning`` package are accepted.

Launch multi-process training with ``strategy="ddp"``: each process runs your script, quantizes its model before the
fit and counts its own steps (quantrain keeps the ranks' ranges identical). ``ddp_spawn`` pickles the trainer and
the model into new processes, and a pickled model has no quantizer, so :class:`QuantizationCallback` stops it with
an error there; the fork-based ``ddp_fork``/``ddp_notebook`` work, for one fit per ``Trainer`` (Lightning's rule).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from quantrain.base import LINK_ATTRIBUTE, Quantizer
from quantrain.evaluator import Evaluator, nni_metric

__all__ = ["LightningEvaluator", "QuantizationCallback"]  # noqa: F822 (QuantizationCallback comes from __getattr__)

INSTALL_HINT = "the PyTorch Lightning integration needs lightning: pip install 'quantrain[lightning]'"
PACKAGES = ("lightning.pytorch", "pytorch_lightning")
STEP_METRIC = "quantrain/step"
DEFAULT_METRIC = "default"


# ---- finding Lightning ---------------------------------------------------------------------------------------


def _import_lightning() -> ModuleType:
    """``lightning.pytorch``, or the standalone ``pytorch_lightning`` when only that is installed."""
    for name in PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(INSTALL_HINT)


def _package_of(obj: object, class_name: str) -> ModuleType | None:
    """The Lightning package whose ``class_name`` ``obj`` is an instance of (only packages already imported can be)."""
    for name in PACKAGES:
        package = sys.modules.get(name)
        if package is not None and isinstance(obj, getattr(package, class_name)):
            return package
    return None


def _describe(value: object) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside Lightning's ``LightningOptimizer`` wrapper (or the optimizer itself)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _linked_quantizer(model: nn.Module) -> Quantizer | None:
    """The quantizer that quantizes ``model`` in this process (``None`` for a copy or a pickle of it)."""
    link = model.__dict__.get(LINK_ATTRIBUTE)
    return None if link is None else link.quantizer


# ---- the callback ----------------------------------------------------------------------------------------------


class _QuantizationHooks:
    """Count a quantizer's steps from the optimizer a Lightning ``Trainer`` builds for the model.

    Steps are counted from optimizer steps (quantrain's global optimizer step hook), so they follow
    ``trainer.global_step``: with ``accumulate_grad_batches=k`` one step per ``k`` batches, and a resumed fit
    continues from the step saved with the model's state_dict. At ``on_fit_start`` the callback checks that the
    model being fit is (or contains) ``quantizer.bound_model`` and attaches the trainer's first optimizer (the one
    inside Lightning's ``LightningOptimizer``), so every fit counts the optimizer it has just built. Create the
    quantizer before fitting: strategies such as DDP wrap the model when the fit starts.

    Args:
        quantizer: a quantrain quantizer (e.g. :class:`~quantrain.QATQuantizer`) whose model is being fit.
        log_step: log the quantizer's step as ``'quantrain/step'`` after every training batch.
    """

    def __init__(self, quantizer: Quantizer, *, log_step: bool = True) -> None:
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(
                f"QuantizationCallback: quantizer must be a quantrain quantizer such as QATQuantizer, got {_describe(quantizer)}"
            )
        if not isinstance(log_step, bool):
            raise TypeError(f"QuantizationCallback: log_step must be True or False, got {log_step!r}")
        self.quantizer: Quantizer | None = quantizer
        self.log_step = log_step
        self._start: tuple[int, int] | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._check_model(pl_module)
        if trainer.optimizers:
            self.quantizer.attach_optimizer(_torch_optimizer(trainer.optimizers[0]))

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # After the checkpoint (if any) is restored: both counts are what this fit starts from.
        self._start = (self.quantizer.current_step, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.log_step:
            pl_module.log(STEP_METRIC, float(self.quantizer.current_step), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._start is None:
            return
        counted = self.quantizer.current_step - self._start[0]
        taken = trainer.global_step - self._start[1]
        if taken > 0 and counted == 0:
            warnings.warn(
                f"QuantizationCallback: the trainer took {taken} optimizer steps but the quantizer counted none; "
                "its quantization schedule did not advance (does the first optimizer train the quantized model?)",
                stacklevel=2,
            )

    def _check_model(self, pl_module: nn.Module) -> None:
        if self.quantizer is None:
            raise RuntimeError(
                "QuantizationCallback: the callback was pickled into this process, and a pickled model has no "
                "quantizer (strategy 'ddp_spawn' pickles the trainer and the model into its workers); use "
                "strategy='ddp', which runs your script in every process (or the fork-based 'ddp_fork')"
            )
        self.quantizer._check_wrapped()
        bound = self.quantizer.bound_model
        if not any(module is bound for module in pl_module.modules()):
            raise ValueError(
                f"QuantizationCallback: the model being fit ({type(pl_module).__name__}) is not, and does not contain, "
                f"the quantizer's model ({type(bound).__name__}); quantize the model you pass to trainer.fit"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # A quantizer does not survive pickling (its model's copy has none): the copy of the callback refuses to run.
        return _callback_without_quantizer, (type(self).lightning_package, self.log_step)


def _callback_without_quantizer(package_name: str, log_step: bool) -> _QuantizationHooks:
    cls = _callback_class(importlib.import_module(package_name))
    callback = cls.__new__(cls)
    callback.__dict__.update(quantizer=None, log_step=log_step, _start=None)
    return callback


_CALLBACK_CLASSES: dict[str, type] = {}


def _callback_class(package: ModuleType) -> type:
    """``QuantizationCallback`` for one Lightning package (its ``Callback`` base class is imported on first use)."""
    cls = _CALLBACK_CLASSES.get(package.__name__)
    if cls is None:
        namespace = {
            "__doc__": _QuantizationHooks.__doc__,
            "__module__": __name__,
            "__qualname__": "QuantizationCallback",
            "lightning_package": package.__name__,
        }
        cls = type("QuantizationCallback", (_QuantizationHooks, package.Callback), namespace)
        _CALLBACK_CLASSES[package.__name__] = cls
    return cls


def __getattr__(name: str) -> Any:
    # QuantizationCallback subclasses Lightning's Callback, so it is built when first asked for.
    if name == "QuantizationCallback":
        return _callback_class(_import_lightning())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the evaluator ---------------------------------------------------------------------------------------------


class LightningEvaluator(Evaluator):
    """Drive a Lightning ``Trainer`` for :meth:`QATQuantizer.compress <quantrain.QATQuantizer.compress>` (NNI 3.0's
    ``LightningEvaluator``).

    The quantizer's model must be the ``LightningModule`` itself. Each ``compress(max_steps, max_epochs)`` calls
    ``trainer.fit(model, datamodule=data_module)`` once, with NNI's budget rule: a limit given to ``compress``
    replaces the trainer's, and a limit not given leaves the trainer's own in force, so ``Trainer(max_steps=5)``
    with ``compress(None, 1)`` trains 5 steps (at most one epoch), as NNI does. Both limits count from where the
    trainer stands: repeated calls continue the training, each for its own budget, as NNI's fresh trainer per
    call would (:func:`fit_budget` gives the numbers). The trainer's own ``max_steps``/``max_epochs`` are
    restored afterwards, and no sanity validation runs before the fit (NNI sets ``num_sanity_val_steps=0``).
    Steps are counted as :class:`QuantizationCallback` counts them (it is added for the fit): the first
    optimizer's steps, which follow ``trainer.global_step``. Every fit builds its optimizers anew from
    ``configure_optimizers`` (their state, e.g. Adam's moments, starts over), as with NNI.

    Args:
        trainer: a ``lightning.pytorch.Trainer`` (or ``pytorch_lightning.Trainer``).
        data_module: the ``LightningDataModule`` to fit, validate and test with.
        dummy_input: an example input, for :meth:`~quantrain.QATQuantizer.track_forward` and exporters.
    """

    def __init__(self, trainer: Any, data_module: Any, dummy_input: Any = None) -> None:
        _import_lightning()
        package = _package_of(trainer, "Trainer")
        if package is None:
            raise TypeError(f"LightningEvaluator: trainer must be a lightning.pytorch.Trainer, got {_describe(trainer)}")
        if not isinstance(data_module, package.LightningDataModule):
            raise TypeError(
                f"LightningEvaluator: data_module must be a {package.__name__}.LightningDataModule, got {_describe(data_module)}"
            )
        self._package_name = package.__name__  # a name, so the evaluator pickles with the trainer
        self.trainer = trainer
        self.data_module = data_module
        self.dummy_input = dummy_input

    @property
    def _package(self) -> ModuleType:
        return importlib.import_module(self._package_name)

    def bind_model(self, model: nn.Module, param_names_map: dict[str, str] | None = None) -> None:
        if not isinstance(model, self._package.LightningModule):
            raise TypeError(
                f"LightningEvaluator: model must be a {self._package.__name__}.LightningModule (quantize the "
                f"LightningModule itself), got {_describe(model)}"
            )
        super().bind_model(model)

    @property
    def first_optimizer(self) -> torch.optim.Optimizer | None:
        """The trainer's first optimizer (``None`` before the first fit builds it)."""
        optimizers = self.trainer.optimizers
        return _torch_optimizer(optimizers[0]) if optimizers else None

    def train(self, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """One ``trainer.fit`` for ``max_steps`` steps and/or ``max_epochs`` epochs; a limit not given is the
        trainer's own (NNI's rule), and both count from where the trainer stands (see the class docstring)."""
        model = self._bound_model()
        quantizer = _linked_quantizer(model)
        callbacks = [] if quantizer is None else [_callback_class(self._package)(quantizer, log_step=False)]
        trainer = self.trainer
        loop = trainer.fit_loop
        saved = loop.epoch_loop.max_steps, loop.max_epochs, trainer.num_sanity_val_steps
        steps, epochs = fit_budget(max_steps, max_epochs, saved[0], saved[1])
        loop.epoch_loop.max_steps = -1 if steps == -1 else trainer.global_step + steps
        loop.max_epochs = -1 if epochs == -1 else trainer.current_epoch + epochs
        trainer.num_sanity_val_steps = 0  # as NNI: no validation batches before training (they would feed PTQ ranges)
        trainer.callbacks.extend(callbacks)
        try:
            trainer.fit(model, datamodule=self.data_module)
        finally:
            loop.epoch_loop.max_steps, loop.max_epochs, trainer.num_sanity_val_steps = saved
            trainer.callbacks[:] = [c for c in trainer.callbacks if all(c is not added for added in callbacks)]

    def evaluate(self) -> tuple[float | None, list[dict[str, float]]]:
        """Run ``trainer.test`` (as NNI does), or ``trainer.validate`` when the model has no ``test_step``.

        Returns NNI's ``(metric, results)``: ``results`` is the list of metric dicts the trainer returned, one per
        dataloader, and ``metric`` the mean of their ``'default'`` values (``None``, with a warning, when the model
        logs no ``'default'``).
        """
        model = self._bound_model()
        defines_test = type(model).test_step is not self._package.LightningModule.test_step
        run = self.trainer.test if defines_test else self.trainer.validate
        results = run(model, datamodule=self.data_module, verbose=False)
        source = "trainer.test" if defines_test else "trainer.validate"
        return nni_metric(_default_metric(results), results, f"LightningEvaluator: {source} logged no {DEFAULT_METRIC!r} metric")

    def get_dummy_input(self) -> Any:
        """``dummy_input``, or else the first batch of the data module's training data (as NNI does)."""
        if self.dummy_input is not None:
            return self.dummy_input
        return next(iter(self.data_module.train_dataloader()))

    @property
    def can_evaluate(self) -> bool:
        model = self.model
        if model is None:
            return True
        base = self._package.LightningModule
        return type(model).test_step is not base.test_step or type(model).validation_step is not base.validation_step

    def _bound_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("LightningEvaluator: no model bound; pass the evaluator to a quantizer first")
        return self.model


def fit_budget(max_steps: int | None, max_epochs: int | None, own_steps: int, own_epochs: int | None) -> tuple[int, int]:
    """The steps and epochs one ``compress`` trains (-1: no limit), by NNI's rule: a limit given to ``compress``
    replaces the trainer's, one not given leaves the trainer's own in force, and an epoch limit set nowhere is
    Lightning's default (1000 epochs when no step limit is set either, else none).

    >>> fit_budget(None, 1, own_steps=5, own_epochs=None)     # Trainer(max_steps=5), compress(None, 1)
    (5, 1)
    >>> fit_budget(50, None, own_steps=-1, own_epochs=None)   # Trainer(), compress(50, None)
    (50, -1)
    >>> fit_budget(None, 2, own_steps=-1, own_epochs=None)
    (-1, 2)
    """
    steps = own_steps if max_steps is None else max_steps
    epochs = own_epochs if max_epochs is None else max_epochs
    if epochs is None:
        epochs = 1000 if steps == -1 else -1
    return steps, epochs


def _default_metric(results: list[dict[str, Any]]) -> float | None:
    """The mean of the ``'default'`` metrics (``default/dataloader_idx_N`` with several dataloaders)."""
    values = [
        float(value)
        for result in results
        for key, value in result.items()
        if key == DEFAULT_METRIC or key.startswith(f"{DEFAULT_METRIC}/dataloader_idx_")
    ]
    return sum(values) / len(values) if values else None
