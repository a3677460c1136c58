"""PtqQuantizer: post-training quantization with NNI 3.0's interface: calibrate by forward passes, no training.

Ranges are the smallest minimum and largest maximum seen over the calibration data (per tensor, channel or block),
tracked whatever the module's mode; scales and zero points are then computed once with the same formulas as QAT,
and fake quantization is switched on. Folded BatchNorms use their running statistics throughout.

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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from quantrain.base import Quantizer, check_budget, is_quantrain_key
from quantrain.calibration import CalibrationConfig
from quantrain.config.resolve import TargetKind
from quantrain.evaluator import Evaluator
from quantrain.observer import RangeTracking

__all__ = ["PtqQuantizer"]


class PtqQuantizer(Quantizer):
    """Post-training quantization: calibrate ranges on data, then quantize, without changing any weight.

    Calibrate with :meth:`track_forward` (one batch per call), or through the evaluator in :meth:`compress`,
    which runs the evaluator's training loop and its ``evaluating_func`` only to feed data: parameters, buffers
    (BatchNorm statistics included) and optimizer states are restored afterwards. :meth:`compress` then computes
    scales and zero points and switches fake quantization on. ``QATQuantizer.from_compressor(ptq, config_list)``
    continues from the result.


    Args:
        model: the float model; quantized in place.
        config_list: as for :class:`~quantrain.QATQuantizer`.
        evaluator: optional data source for :meth:`compress`.
        fuse: ``None`` or ``'auto'``, as for :class:`~quantrain.QATQuantizer`.
        integer_bias: as for :class:`~quantrain.QATQuantizer`.
        sync_ranges, process_group: as for :class:`~quantrain.QATQuantizer`: under DistributedDataParallel each
            calibration batch's extremes are reduced across ranks, so the ranges are those of the global data.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator | None = None,
        *,
        fuse: str | None = None,
        integer_bias: bool = False,
        sync_ranges: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            config_list,
            evaluator,
            fuse=fuse,
            integer_bias=integer_bias,
            sync_ranges=sync_ranges,
            process_group=process_group,
        )

        self.is_compressed = False
        for fusion in self.fusions():
            fusion.freeze_bn(True)

    def _tracking(self, kind: TargetKind) -> RangeTracking:
        return RangeTracking.RUNNING_EXTREMES

    def _state_materialized(self) -> None:
        super()._state_materialized()
        for fusion in self.fusions():  # frozen while the model was on meta: again, now that the flag has memory
            fusion.freeze_bn(True)

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None) -> tuple[nn.Module, CalibrationConfig]:
        """Calibrate through the evaluator (if given), then compute scales and zero points and quantize.

        Returns ``(model, calibration_config)``.
        """
        self._check_wrapped()
        check_budget(max_steps, max_epochs, required=False)
        if (max_steps is not None or max_epochs is not None) and self.evaluator is None:
            raise ValueError(
                "compress(max_steps, max_epochs) calibrates through an evaluator; pass evaluator=... or "
                "calibrate with track_forward() and call compress() without arguments"
            )
        evaluator = self.evaluator
        if evaluator is not None:
            with self._calibrating(), _nothing_trained(self.bound_model, evaluator):
                if max_steps is not None or max_epochs is not None:
                    evaluator.train(max_steps, max_epochs)
                if getattr(evaluator, "evaluating_func", None) is not None:
                    with torch.no_grad():
                        evaluator.evaluate()
        uncalibrated = [fq.label for fq in self.fake_quantizers() if not fq.observer.is_seeded]
        if uncalibrated:
            raise ValueError(
                f"no calibration data reached {uncalibrated}; run track_forward() on some batches "
                "(or give the evaluator a training or evaluating function that calls the model) first"
            )
        for fq in self.fake_quantizers():
            fq.update_qparams()
            fq.enable_observer(False)
            fq.enable_fake_quant(True)
        self.is_compressed = True
        return self.bound_model, self.get_calibration_config()


@contextlib.contextmanager
def _nothing_trained(model: nn.Module, evaluator: Evaluator) -> Iterator[None]:
    """Let a training loop or evaluation run as a data feeder: afterwards the model's parameters and buffers (BatchNorm
    statistics included) and the optimizers' states are exactly as before; quantrain's range state is kept."""
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
