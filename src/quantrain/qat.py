"""QATQuantizer: quantization-aware training with NNI 3.0's API and semantics, plus the paper's schedule controls.

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

from typing import Any

from torch import nn

from quantrain.base import Quantizer, check_budget
from quantrain.calibration import CalibrationConfig
from quantrain.config.resolve import TargetKind
from quantrain.evaluator import Evaluator
from quantrain.observer import RangeTracking
from quantrain.schedule import Phase, Schedule

__all__ = ["QATQuantizer"]

WEIGHT_RANGES = {"ema": RangeTracking.MOVING_AVERAGE, "minmax": RangeTracking.CURRENT}


class QATQuantizer(Quantizer):
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
        activation_start_step: step from which inputs/outputs are fake-quantized (default: quant_start_step).
        freeze_bn_step: step from which folded BatchNorms use frozen running statistics (default: never).
        freeze_range_step: step from which ranges, scales and zero points stop changing (default: never).
        weight_range: ``'ema'`` (the reference: moving average of weight ranges) or ``'minmax'`` (the paper:
            the current weights' min and max).
        fuse: ``None`` folds only what ``fuse_names`` names (the reference); ``'auto'`` also finds
            Conv/Linear -> BatchNorm (-> ReLU/ReLU6) chains in the model's graph (see ``example_inputs``).
        integer_bias: round each quantized layer's bias (the folded one too) to the int32 grid of integer
            inference, ``S_in * S_w`` (the paper's section 2.4), while its input and weight are fake-quantized.
            ``S_in`` is the scale of the per-tensor activation quantizer feeding the layer: its own ``_input_``
            or, found in the model's graph, the ``_output_`` of the module upstream (through max pooling, ReLU,
            reshapes and dropout). The model then computes what ONNX Runtime's integer kernels compute, so the
            exported int8 model agrees with it far more closely. Off by default (the reference keeps biases float).
        example_inputs: a batch as the forward takes it (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs such as a Hugging Face batch), from which quantrain captures the model's graph with
            ``torch.export`` (see :mod:`quantrain.graph`), when ``fuse='auto'``, ``integer_bias`` or ``fuse_names``
            read it. Default: the evaluator's ``dummy_input``. Only shapes and dtypes matter; the model is not run
            on it for real (no range is tracked, no statistic moves). Where the graph is needed and there is no
            example, or the forward cannot be captured, the constructor raises ``ValueError`` saying so and leaves
            the model as it was.
        sync_ranges: under a ``torch.distributed`` process group of several ranks (DistributedDataParallel),
            reduce each activation's batch range across ranks before the moving average, so every rank holds the
            same ranges, scales and zero points, those of a single process seeing the global batch (see
            :mod:`quantrain.distributed`). Every rank must then run its training forwards together. ``False``
            keeps each rank's ranges to itself.
        process_group: the group to reduce over (default: the default group).
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator | None = None,
        quant_start_step: int = 0,
        *,
        activation_start_step: int | None = None,
        freeze_bn_step: int | None = None,
        freeze_range_step: int | None = None,
        weight_range: str = "ema",
        fuse: str | None = None,
        integer_bias: bool = False,
        example_inputs: Any = None,
        sync_ranges: bool = True,
        process_group: Any = None,
    ) -> None:
        self.schedule, self.weight_range = self._check_options(
            quant_start_step, activation_start_step, freeze_bn_step, freeze_range_step, weight_range
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
        self._phase: Phase | None = None
        self._apply_schedule()

    @staticmethod
    def _check_options(
        quant_start_step: Any = 0,
        activation_start_step: Any = None,
        freeze_bn_step: Any = None,
        freeze_range_step: Any = None,
        weight_range: Any = "ema",
    ) -> tuple[Schedule, str]:
        if isinstance(quant_start_step, int) and not isinstance(quant_start_step, bool):
            quant_start_step = max(quant_start_step, 0)  # the reference clamps negative starts
        schedule = Schedule(
            quant_start_step=quant_start_step,
            activation_start_step=activation_start_step,
            freeze_bn_step=freeze_bn_step,
            freeze_range_step=freeze_range_step,
        )
        if weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be 'ema' or 'minmax', got {weight_range!r}")
        return schedule, weight_range

    @property
    def quant_start_step(self) -> int:
        return self.schedule.quant_start_step

    @classmethod
    def from_compressor(
        cls,
        compressor: Quantizer,
        new_config_list: list[dict[str, Any]],
        quant_start_step: int = 0,
        evaluator: Evaluator | None = None,
        **kwargs: Any,
    ) -> QATQuantizer:
        """Continue from another quantizer (e.g. a :class:`~quantrain.PtqQuantizer`) on the same model.

        Targets that keep the same settings carry their tracked ranges, scales and zero points over; the earlier
        quantizer is unwrapped. ``evaluator``, ``fuse``, ``integer_bias``, ``sync_ranges`` and ``process_group``
        default to the earlier quantizer's (so a BatchNorm folded during calibration stays folded, and the folded
        weights' ranges carry over to the same folded weights). The schedule options of the constructor
        (``activation_start_step``, ``freeze_bn_step``, ``freeze_range_step``, ``weight_range``) are accepted too.
        """
        return cls._continue_from(compressor, new_config_list, evaluator, (quant_start_step,), kwargs)

    _OPTIONS = ("activation_start_step", "freeze_bn_step", "freeze_range_step", "weight_range")

    def _tracking(self, kind: TargetKind) -> RangeTracking:
        return WEIGHT_RANGES[self.weight_range] if kind is TargetKind.PARAMETER else RangeTracking.MOVING_AVERAGE

    def _options(self) -> str:
        return f"{super()._options()}, weight_range={self.weight_range}, {self.schedule}"

    def _apply_schedule(self) -> None:
        phase = self.schedule.phase(self._current_step)
        if phase == self._phase:
            return
        for fq in self.fake_quantizers():
            fq.enable_fake_quant(phase.activations if fq.activation else phase.weights)
            fq.enable_observer(phase.observers)
        for fusion in self.fusions():
            fusion.freeze_bn(phase.bn_frozen)
        self._phase = phase

    def _loaded(self) -> None:
        super()._loaded()
        self._phase = self.schedule.phase(self._current_step)  # the flags came with the state_dict

    def _state_materialized(self) -> None:
        super()._state_materialized()
        self._phase = None  # the flags were written while the model was on meta: again, for the current step
        self._apply_schedule()

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
        check_budget(max_steps, max_epochs, required=True)
        if self.evaluator.first_optimizer is not None:
            self.attach_optimizer(self.evaluator.first_optimizer)
        self.evaluator.train(max_steps, max_epochs)
        return self.bound_model, self.get_calibration_config()
