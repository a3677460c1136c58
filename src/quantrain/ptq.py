"""PtqQuantizer: post-training quantization with NNI 3.0's interface and semantics.

Ranges are the smallest minimum and largest maximum seen over every forward while calibrating (per tensor, channel
or block), tracked whatever the module's mode, with fake quantization off; scales and zero points are then
computed once with the same formulas as QAT, and fake quantization is switched on.

Calibration data come from :meth:`PtqQuantizer.track_forward` (one batch per call), or from the evaluator in
:meth:`PtqQuantizer.compress`: as in NNI, its training loop runs for the budget given (the user's optimizer really
steps, so the model trains in float while its ranges are tracked), then its evaluation; ``calibrate_only=True``
instead puts every parameter, buffer and optimizer state back after the loop, so it only feeds data.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 2))
>>> ptq = PtqQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight", "_output_"]}])
>>> for _ in range(3):
...     ptq.track_forward(torch.randn(16, 4))
>>> _, calibration_config = ptq.compress()
>>> sorted(calibration_config["0"])
['_output_0', 'weight']
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from quantrain.base import Quantizer, check_budget, is_quantrain_key
from quantrain.calibration import CalibrationConfig
from quantrain.config.resolve import TargetKind
from quantrain.evaluator import Evaluator
from quantrain.observer import RangeTracking
from quantrain.wrapping.bias_correction import BiasShift, correct_bias
from quantrain.wrapping.fusion import fold_parameters
from quantrain.wrapping.quantized_module import FUSION_NAME

__all__ = ["PtqQuantizer"]


class PtqQuantizer(Quantizer):
    """Post-training quantization (NNI 3.0's ``PtqQuantizer``): calibrate ranges on data, then quantize.

    :meth:`compress` with an evaluator runs, as NNI does, the evaluator's training loop for the budget given (the
    model trains in float: its optimizer steps, BatchNorm statistics update, folded BatchNorms included) while
    every target's range is tracked as running extremes, then its evaluation (``evaluating_func``, or the
    trainer's test/validation), then computes scales and zero points and switches fake quantization on.
    ``QATQuantizer.from_compressor(ptq, config_list)`` continues from the result.

    Args:
        model: the float model; quantized in place.
        config_list: as for :class:`~quantrain.QATQuantizer`.
        evaluator: the data source for :meth:`compress` (or calibrate with :meth:`track_forward`).
        bias_correction: after computing the scales, correct each quantized Linear/convolution's bias by the mean
            output shift its weight quantization causes, measured on the evaluator's evaluation data (see
            :mod:`quantrain.wrapping.bias_correction`), then evaluate once more to widen the ranges for the new
            biases and recompute the scales, as NNI does. Needs an evaluator that can evaluate. NNI's spelling,
            ``is_bias_correction``, is accepted too.
        calibrate_only: run the evaluator's loop only to feed data: afterwards parameters, buffers (BatchNorm
            statistics included) and optimizer states are exactly as before, the weight ranges are those of these
            restored weights, and folded BatchNorms use their running statistics throughout. The activation ranges
            are the extremes over the loop's forwards (whose weights moved while it ran) and the evaluation's.
        fuse: ``None`` or ``'auto'``, as for :class:`~quantrain.QATQuantizer`.
        integer_bias, example_inputs: as for :class:`~quantrain.QATQuantizer`.
        sync_ranges, process_group: as for :class:`~quantrain.QATQuantizer`: under DistributedDataParallel each
            calibration batch's extremes are reduced across ranks, so the ranges are those of the global data.
    """

    _OPTIONS = ("bias_correction", "is_bias_correction", "calibrate_only")

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator | None = None,
        *,
        bias_correction: bool = False,
        is_bias_correction: bool | None = None,
        calibrate_only: bool = False,
        fuse: str | None = None,
        integer_bias: bool = False,
        example_inputs: Any = None,
        sync_ranges: bool = True,
        process_group: Any = None,
    ) -> None:
        self.bias_correction, self.calibrate_only = self._check_options(
            bias_correction=bias_correction, is_bias_correction=is_bias_correction, calibrate_only=calibrate_only
        )
        if self.bias_correction and not (isinstance(evaluator, Evaluator) and evaluator.can_evaluate):
            raise ValueError(
                "PtqQuantizer: bias_correction measures each layer's output shift on the evaluator's evaluation data; "
                "give the quantizer an evaluator that evaluates (a TorchEvaluator with an evaluating_func, a "
                "LightningEvaluator, or a TransformersEvaluator whose trainer has an eval_dataset)"
            )
        super().__init__(
            model,
            config_list,
            evaluator,
            fuse=fuse,
            integer_bias=integer_bias,
            example_inputs=example_inputs,
            sync_ranges=sync_ranges,
            process_group=process_group,
        )
        self.is_compressed = False
        self.corrected_biases: dict[str, torch.Tensor] = {}
        for fusion in self.fusions():
            fusion.freeze_bn(True)

    @staticmethod
    def _check_options(
        bias_correction: Any = False, is_bias_correction: Any = None, calibrate_only: Any = False
    ) -> tuple[bool, bool]:
        if is_bias_correction is not None:
            if bias_correction:
                raise TypeError("PtqQuantizer: give bias_correction or NNI's is_bias_correction, not both")
            bias_correction = is_bias_correction
        for name, value in (("bias_correction", bias_correction), ("calibrate_only", calibrate_only)):
            if not isinstance(value, bool):
                raise TypeError(f"PtqQuantizer: {name} must be True or False, got {value!r}")
        return bias_correction, calibrate_only

    @classmethod
    def from_compressor(
        cls, compressor: Quantizer, new_config_list: list[dict[str, Any]], evaluator: Evaluator | None = None, **kwargs: Any
    ) -> PtqQuantizer:
        """Continue from another quantizer on the same model (NNI's ``from_compressor``): targets that keep their
        settings carry their ranges over (the extremes then widen from there); ``evaluator`` and the shared options
        default to the earlier quantizer's, and ``bias_correction``/``calibrate_only`` may be given."""
        return cls._continue_from(compressor, new_config_list, evaluator, (), kwargs)

    @property
    def is_bias_correction(self) -> bool:
        """NNI's name for :attr:`bias_correction`."""
        return self.bias_correction

    def _options(self) -> str:
        return f"{super()._options()}, bias_correction={self.bias_correction}, calibrate_only={self.calibrate_only}"

    def _tracking(self, kind: TargetKind) -> RangeTracking:
        return RangeTracking.RUNNING_EXTREMES

    def _state_materialized(self) -> None:
        super()._state_materialized()
        for fusion in self.fusions():  # frozen while the model was on meta: again, now that the flag has memory
            fusion.freeze_bn(True)

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None) -> tuple[nn.Module, CalibrationConfig]:
        """Calibrate through the evaluator (if given), then compute scales and zero points and quantize.

        With ``max_steps``/``max_epochs`` the evaluator's training loop runs for that budget (see the class
        docstring); without them only its evaluation runs, after any :meth:`track_forward` calls. A later
        ``compress`` calibrates further, as in NNI: the ranges widen from where they are and the scales are computed
        again. Returns ``(model, calibration_config)``.
        """
        self._check_wrapped()
        check_budget(max_steps, max_epochs, required=False)
        trains = max_steps is not None or max_epochs is not None
        if trains and self.evaluator is None:
            raise ValueError(
                "compress(max_steps, max_epochs) calibrates through an evaluator; pass evaluator=... or "
                "calibrate with track_forward() and call compress() without arguments"
            )
        if self.is_compressed:  # calibrate further, in float, from the ranges tracked so far
            for fq in self.fake_quantizers():
                fq.enable_observer(True)
                fq.enable_fake_quant(False)
        evaluator = self.evaluator
        if evaluator is not None:
            with self._calibrating():
                if trains and self.calibrate_only:
                    with _nothing_trained(self.bound_model, evaluator):
                        evaluator.train(max_steps, max_epochs)
                    self._observe_weights_again()
                elif trains:
                    with self._live_batch_norm():
                        evaluator.train(max_steps, max_epochs)
                if evaluator.can_evaluate:
                    self._evaluate()
        uncalibrated = [fq.label for fq in self.fake_quantizers() if not fq.observer.is_seeded]
        if uncalibrated:
            raise ValueError(
                f"no calibration data reached {uncalibrated}; run track_forward() on some batches "
                "(or give the evaluator a training or evaluating function that calls the model) first"
            )
        self._quantize()
        if self.bias_correction:
            self._correct_biases()
        self.is_compressed = True
        return self.bound_model, self.get_calibration_config()

    def _quantize(self) -> None:
        for fq in self.fake_quantizers():
            fq.update_qparams()
            fq.enable_observer(False)
            fq.enable_fake_quant(True)

    def _evaluate(self) -> None:
        """Run the evaluator's evaluation as calibration data; the model's parameters and buffers stay as they are
        (an evaluating_func that leaves the model in training mode does not move BatchNorm statistics)."""
        with _nothing_trained(self.bound_model, None), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*evaluate\\(\\) returns None as the metric")  # the metric is not used
            self.evaluator.evaluate()

    def _correct_biases(self) -> None:
        """NNI's bias correction: measure each layer's mean output shift on the evaluation data, move its bias by
        it, then evaluate once more with the observers on (ranges widen to the new biases) and requantize."""
        measurement = BiasShift(self._modules)
        with measurement:
            self._evaluate()
        shifts = measurement.shifts()
        if not shifts:
            raise ValueError(
                "PtqQuantizer: bias_correction found no quantized Linear or convolution with a quantized weight that "
                "the evaluation ran"
            )
        without_bias = [name for name, shift in shifts.items() if not correct_bias(self._modules[name], shift)]
        self.corrected_biases = {name: shift for name, shift in shifts.items() if name not in without_bias}
        if without_bias:
            warnings.warn(
                f"bias_correction: {', '.join(without_bias)} have no bias (nor a folded BatchNorm beta) to correct; "
                "left as they are",
                stacklevel=3,
            )
        for fq in self.fake_quantizers():
            fq.enable_observer(True)
        with self._calibrating():
            self._evaluate()
        self._quantize()

    @contextlib.contextmanager
    def _live_batch_norm(self) -> Iterator[None]:
        """Folded BatchNorms train as the float model's would (batch statistics, running statistics updating)."""
        fusions = list(self.fusions())
        for fusion in fusions:
            fusion.freeze_bn(False)
        try:
            yield
        finally:
            for fusion in fusions:
                fusion.freeze_bn(True)

    @torch.no_grad()
    def _observe_weights_again(self) -> None:
        """Weight ranges from the current (restored) weights alone, as the layer computes with them (folded)."""
        for module in self._modules.values():
            for name, fq in module.fake_quant.items():
                if fq.activation:
                    continue
                fq.observer.reset()
                fq.observe(_parameter_value(module, name))


def _parameter_value(module: nn.Module, name: str) -> torch.Tensor:
    """The value a parameter quantizer sees: the parameter, or under a folded BatchNorm the folded weight/bias."""
    fusion = module._modules.get(FUSION_NAME)
    if fusion is None or fusion.bn is None or name not in ("weight", "bias"):
        return module._parameters[name]
    weight, bias = fold_parameters(module.weight, module.bias, fusion.bn)
    return weight if name == "weight" else bias


@contextlib.contextmanager
def _nothing_trained(model: nn.Module, evaluator: Evaluator | None) -> Iterator[None]:
    """Let a training loop or evaluation run as a data feeder: afterwards the model's parameters and buffers (BatchNorm
    statistics included), training modes and the optimizers' states are exactly as before; quantrain's range state
    is kept."""
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_quantrain_key(k)}
    optimizers = list(getattr(evaluator, "optimizers", ()))
    saved_optimizers = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers]
    training = {name: module.training for name, module in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            current = model.state_dict()
            for key, value in saved_model.items():
                current[key].copy_(value)
        for optimizer, state in zip(optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(state)
        for name, module in model.named_modules():
            module.training = training.get(name, module.training)
