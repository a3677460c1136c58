"""QATQuantizer: quantization-aware training with NNI 3.0's API and semantics.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
>>> quantizer = QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight", "_output_"],
...                                   "quant_dtype": "int8", "quant_scheme": "affine"}])
>>> _ = model(torch.randn(8, 4))          # a training-mode forward tracks ranges and fake-quantizes
>>> sorted(quantizer.get_calibration_config()["0"])
['_output_0', 'weight']
>>> quantizer.unwrap_model() is model
True
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from quantrain.calibration import CalibrationConfig
from quantrain.config.parse import parse_config_list
from quantrain.config.resolve import resolve
from quantrain.evaluator import Evaluator
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.wrapping.quantized_module import CHILD_NAME, attach, build_fake_quantizers, detach, is_quantized

__all__ = ["QATQuantizer"]

STEP_BUFFER = "quantrain_step"


class QATQuantizer:
    """Quantization-aware training (Jacob et al., CVPR 2018) as NNI 3.0's ``QATQuantizer`` defines it.

    The selected modules are quantized in place: their Parameters stay the same objects (an optimizer built
    before keeps training them), their state_dict keys stay, and the quantization state (tracked ranges, scales,
    zero points, step) joins the model's state_dict. In training mode every forward tracks each target's range
    (EMA, decay 0.99); from ``quant_start_step`` optimizer steps on, it also recomputes scale and zero point
    and fake-quantizes. In eval mode ranges are frozen and fake quantization still applies.

    Steps are counted from the first optimizer that steps on the model's parameters (or the evaluator's first
    optimizer, or the one given to :meth:`attach_optimizer`); :meth:`step` counts one by hand.

    Args:
        model: the float model; quantized in place.
        config_list: which modules and targets to quantize, and how (NNI's schema, see the docs).
        evaluator: drives training for :meth:`compress`; not needed when you train in your own loop.
        quant_start_step: optimizer steps of float training (ranges still tracked) before QAT begins.
    """

    def __init__(
        self, model: nn.Module, config_list: list[dict[str, Any]], evaluator: Evaluator | None = None, quant_start_step: int = 0
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(quant_start_step, int) or isinstance(quant_start_step, bool):
            raise TypeError(f"quant_start_step must be an int, got {type(quant_start_step).__name__}")
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator must be a quantrain Evaluator such as TorchEvaluator, got {type(evaluator).__name__}")
        _check_not_quantized(model)
        plans = resolve(model, parse_config_list(config_list))
        _check_free_names(model, [p.name for p in plans])
        if evaluator is not None:
            evaluator.bind_model(model)
        self.bound_model = model
        self.evaluator = evaluator
        self.quant_start_step = max(quant_start_step, 0)
        self._current_step = 0
        device = _device_of(model)
        modules = dict(model.named_modules())
        built = [(modules[p.name], p, build_fake_quantizers(p.name, modules[p.name], p, device)) for p in plans]
        try:
            for module, plan, fake_quant in built:
                attach(module, plan, fake_quant)
        except BaseException:
            for module, _, _ in built:
                detach(module)
            raise
        self._modules = {plan.name: module for module, plan, _ in built}
        model.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.int64, device=device))
        self._param_ids = frozenset(id(p) for p in model.parameters())
        self._optimizer: weakref.ref | None = None
        ref = weakref.ref(self)
        # The step hook goes with the quantizer; the load hook stays with the model for as long as it is quantized.
        self._hooks = [register_optimizer_step_post_hook(functools.partial(_on_optimizer_step, ref))]
        weakref.finalize(self, _remove_hooks, list(self._hooks))
        self._hooks.append(model.register_load_state_dict_post_hook(_AfterLoad(ref)))
        self._apply_schedule()

    # ---- training schedule -------------------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """Optimizer steps counted so far."""
        return self._current_step

    def step(self) -> None:
        """Count one optimizer step (done automatically for the tracked optimizer)."""
        self._current_step += 1
        self.bound_model.get_buffer(STEP_BUFFER).fill_(self._current_step)
        if self._current_step == self.quant_start_step:
            self._apply_schedule()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the steps of ``optimizer`` (instead of the first optimizer seen stepping on the model)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = weakref.ref(optimizer)

    def _apply_schedule(self) -> None:
        active = self._current_step >= self.quant_start_step
        for fq in self.fake_quantizers():
            fq.enable_fake_quant(active)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        bound = self._optimizer() if self._optimizer is not None else None
        if bound is None:
            if not any(id(p) in self._param_ids for group in optimizer.param_groups for p in group["params"]):
                return
            self._optimizer = weakref.ref(optimizer)
            bound = optimizer
        if optimizer is bound:
            self.step()

    # ---- training through the evaluator ----------------------------------------------------------------

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None) -> tuple[nn.Module, CalibrationConfig]:
        """Train through the evaluator for ``max_steps`` steps and/or ``max_epochs`` epochs.

        Returns ``(model, calibration_config)``; the model stays quantized.
        """
        self._check_wrapped()
        if self.evaluator is None:
            raise ValueError(
                "compress() trains through an evaluator: pass evaluator=TorchEvaluator(...) to the "
                "quantizer, or train the model in your own loop and call get_calibration_config()"
            )
        if max_steps is None and max_epochs is None:
            raise ValueError("compress() needs max_steps or max_epochs (or both)")
        for name, value in (("max_steps", max_steps), ("max_epochs", max_epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"compress(): {name} must be a positive int or None, got {value!r}")
        if self.evaluator.first_optimizer is not None:
            self.attach_optimizer(self.evaluator.first_optimizer)
        self.evaluator.train(max_steps, max_epochs)
        return self.bound_model, self.get_calibration_config()

    def track_forward(self, *args: Any, **kwargs: Any) -> None:
        """Run one no-grad forward that tracks ranges, whatever the model's mode, so every buffer has its shape
        (call it before wrapping the model in DistributedDataParallel)."""
        self._check_wrapped()
        quantizers = list(self.fake_quantizers())
        modes = [fq.training for fq in quantizers]
        try:
            for fq in quantizers:
                fq.train(True)
            with torch.no_grad():
                self.bound_model(*args, **kwargs)
        finally:
            for fq, mode in zip(quantizers, modes, strict=True):
                fq.train(mode)

    # ---- results ---------------------------------------------------------------------------------------

    def fake_quantizers(self) -> Iterator[FakeQuantizer]:
        for module in self._modules.values():
            yield from module.fake_quant.values()

    @property
    def quantized_modules(self) -> dict[str, nn.Module]:
        """The quantized modules by name."""
        return dict(self._modules)

    def get_calibration_config(self) -> CalibrationConfig:
        """``{module: {target: {scale, zero_point, quant_dtype, quant_scheme, quant_bits, tracked_min, tracked_max}}}``
        for every target that has a scale (CPU tensors; zero_point as float)."""
        config: CalibrationConfig = {}
        for name, module in self._modules.items():
            for target, fq in module.fake_quant.items():
                if not fq.is_calibrated:
                    continue
                s = fq.settings
                config.setdefault(name, {})[target] = {
                    "scale": _cpu(fq.scale),
                    "zero_point": _cpu(fq.zero_point),
                    "quant_dtype": s.dtype.name,
                    "quant_scheme": s.scheme.value,
                    "quant_bits": s.dtype.bits,
                    "tracked_min": _cpu(fq.observer.tracked_min),
                    "tracked_max": _cpu(fq.observer.tracked_max),
                }
        return config

    def unwrap_model(self) -> nn.Module:
        """Remove every quantizer: the model is its float self again, with the trained weights."""
        self._check_wrapped()
        for module in self._modules.values():
            detach(module)
        del self.bound_model._buffers[STEP_BUFFER]
        _remove_hooks(self._hooks)
        self._modules = {}
        self._unwrapped = True
        return self.bound_model

    def _check_wrapped(self) -> None:
        if getattr(self, "_unwrapped", False):
            raise RuntimeError("this quantizer's model was unwrapped; create a new QATQuantizer to quantize it again")

    def _loaded(self) -> None:
        self._current_step = int(self.bound_model.get_buffer(STEP_BUFFER).item())


def _is_quantrain_key(key: str) -> bool:
    return key == STEP_BUFFER or key.startswith(f"{CHILD_NAME}.") or f".{CHILD_NAME}." in key


def _check_not_quantized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_quantized(module):
            raise ValueError(
                f"module {name or type(model).__name__!r} is already quantized by quantrain; call "
                "unwrap_model() on its quantizer first"
            )


def _check_free_names(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if hasattr(modules[name], CHILD_NAME):
            raise ValueError(f"module {name!r} already has an attribute {CHILD_NAME!r}, which quantrain needs")
    if hasattr(model, STEP_BUFFER):
        raise ValueError(f"the model already has an attribute {STEP_BUFFER!r}, which quantrain needs")


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _on_optimizer_step(ref: weakref.ref, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    quantizer = ref()
    if quantizer is not None:
        quantizer._on_step(optimizer)


class _AfterLoad:
    """load_state_dict post hook on the model: accept float checkpoints, and resync the quantizer's step.

    It refers to the quantizer weakly and drops that reference when the model is copied or pickled (a copy has
    no quantizer of its own).
    """

    def __init__(self, ref: weakref.ref | None) -> None:
        self.ref = ref

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        # A float checkpoint has no quantization state: keep the model's own rather than failing a strict load.
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_quantrain_key(k)]
        quantizer = self.ref() if self.ref is not None else None
        if quantizer is not None:
            quantizer._loaded()

    def __reduce__(self):
        return _AfterLoad, (None,)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
