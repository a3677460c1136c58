"""The QAT training schedule: which steps quantize what, and when ranges and BatchNorm statistics freeze.

>>> schedule = Schedule(quant_start_step=10, activation_start_step=20, freeze_bn_step=80, freeze_range_step=90)
>>> schedule.phase(15)
Phase(weights=True, activations=False, observers=True, bn_frozen=False)
>>> schedule.phase(95)
Phase(weights=True, activations=True, observers=False, bn_frozen=True)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Phase", "Schedule"]


@dataclass(frozen=True)
class Phase:
    """What is on at one step: fake quantization of weights (parameters) and of activations (inputs/outputs),
    range tracking, and whether folded BatchNorms use frozen running statistics."""

    weights: bool
    activations: bool
    observers: bool
    bn_frozen: bool


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Step thresholds, in optimizer steps.

    * ``quant_start_step``: parameters are fake-quantized from this step (before it, ranges are only tracked).
    * ``activation_start_step``: inputs and outputs from this step (default: ``quant_start_step``); the paper
      delays activation quantization so that their ranges settle first.
    * ``freeze_bn_step``: folded BatchNorms switch to their running statistics and stop updating them.
    * ``freeze_range_step``: ranges (and so scales and zero points) stop changing.
    """

    quant_start_step: int = 0
    activation_start_step: int | None = None
    freeze_bn_step: int | None = None
    freeze_range_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("quant_start_step", "activation_start_step", "freeze_bn_step", "freeze_range_step"):
            value = getattr(self, name)
            if value is None and name != "quant_start_step":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(
                    f"{name} must be an int{'' if name == 'quant_start_step' else ' or None'}, got {type(value).__name__}"
                )
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        last_start = max(self.quant_start_step, self.activation_start)
        if self.freeze_range_step is not None and self.freeze_range_step <= last_start:
            raise ValueError(
                f"freeze_range_step ({self.freeze_range_step}) must come after quantization starts (step "
                f"{last_start}): scales are computed from ranges tracked while quantization is on"
            )

    @property
    def activation_start(self) -> int:
        return self.quant_start_step if self.activation_start_step is None else self.activation_start_step

    def phase(self, step: int) -> Phase:
        return Phase(
            weights=step >= self.quant_start_step,
            activations=step >= self.activation_start,
            observers=self.freeze_range_step is None or step < self.freeze_range_step,
            bn_frozen=self.freeze_bn_step is not None and step >= self.freeze_bn_step,
        )
