"""TrainingRecorder: what a report plots over training, recorded while you train.

Two kinds of series:

* **metrics** you record yourself, ``record_metric(name, step, value)`` (test accuracy of the float model and of
  the QAT model, a loss, ...);
* **tracked ranges**: every activation target's ``tracked_min`` / ``tracked_max`` (the EMA ranges the scales come
  from), copied to the CPU at each counted optimizer step of the quantizer (every ``every`` steps).

How steps are seen: the quantizer counts optimizer steps through PyTorch's global optimizer step post-hook, which it
registers when the first quantizer is created. :meth:`TrainingRecorder.watch` registers a second global post-hook,
so it runs after the quantizer's and reads an up-to-date ``quantizer.current_step``: it records whenever that step
changed (any optimizer stepping, in your loop, through ``compress()``, Lightning or Transformers alike; a step
counted without an optimizer step, by ``quantizer.step()``, is seen at the next optimizer step). The hook
holds the recorder until :meth:`~TrainingRecorder.close` (or the end of a ``with`` block); ``hook=False`` records
nothing by itself, and you call :meth:`~TrainingRecorder.record_ranges` from your loop instead.

Ranges are recorded under the quantizer's step plus ``step_offset``: when QAT continues a float training whose
metrics you recorded from its first step, ``step_offset`` (the float steps) puts both on one optimizer-step axis.

>>> import torch
>>> from quantrain import QATQuantizer
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> quantizer = QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight", "_output_"]}])
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with TrainingRecorder(quantizer) as recorder:
...     for _ in range(3):
...         model(torch.randn(8, 4)).sum().backward()
...         optimizer.step()
...     recorder.record_metric("loss", quantizer.current_step, 0.5)
>>> steps, mins, maxs = recorder.ranges["0._output_0"].as_tensors()
>>> steps.tolist(), mins.shape, bool((mins <= maxs).all())
([1, 2, 3], torch.Size([3]), True)
>>> recorder.metrics["loss"]
[(3, 0.5)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from quantrain.base import Quantizer
from quantrain.fake_quantizer import FakeQuantizer

__all__ = ["RangeHistory", "TrainingRecorder"]


@dataclass
class RangeHistory:
    """One activation target's tracked range over training: CPU float32 tensors, one pair per recorded step."""

    steps: list[int] = field(default_factory=list)
    mins: list[Tensor] = field(default_factory=list)
    maxs: list[Tensor] = field(default_factory=list)

    def as_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(steps, mins, maxs)``: ``steps`` of shape ``(n,)``, the ranges stacked to ``(n, *range_shape)``."""
        if not self.steps:
            empty = torch.empty(0)
            return torch.empty(0, dtype=torch.int64), empty, empty
        return torch.tensor(self.steps, dtype=torch.int64), torch.stack(self.mins), torch.stack(self.maxs)

    def envelope(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(steps, lowest min, highest max)`` per step: per-channel ranges reduced to one interval each."""
        steps, mins, maxs = self.as_tensors()
        if mins.dim() > 1:
            mins, maxs = mins.flatten(1).amin(1), maxs.flatten(1).amax(1)
        return steps, mins, maxs


class TrainingRecorder:
    """Records metrics and (when given a quantizer) its activation ranges at each counted optimizer step.

    Args:
        quantizer: the quantizer whose activation ranges to record; ``None`` records metrics only until
            :meth:`watch` is called (e.g. float training before the model is quantized).
        every: record the ranges at steps that are multiples of ``every``.
        hook: record automatically after each counted optimizer step (see the module docstring); ``False`` leaves
            it to explicit :meth:`record_ranges` calls.
        step_offset: added to the quantizer's step when recording ranges (see the module docstring).

    Attributes:
        ranges: ``{"module.target": RangeHistory}`` for each activation target (inputs and outputs), in the
            quantizer's order; a target appears once its range is seeded (its first training forward).
        metrics: ``{name: [(step, value), ...]}`` in recording order.
    """

    def __init__(self, quantizer: Quantizer | None = None, every: int = 1, *, hook: bool = True, step_offset: int = 0) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.hook = hook
        self.step_offset = _step_offset(step_offset)
        self.quantizer: Quantizer | None = None
        self.ranges: dict[str, RangeHistory] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self._targets: list[tuple[str, FakeQuantizer]] = []
        self._last_step: int | None = None
        self._handle: Any = None
        if quantizer is not None:
            self.watch(quantizer)

    def watch(self, quantizer: Quantizer, *, step_offset: int | None = None) -> TrainingRecorder:
        """Start recording ``quantizer``'s activation ranges (from its next counted step when ``hook``), under its
        step plus ``step_offset`` (default: the offset given before)."""
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a quantrain Quantizer, got {type(quantizer).__name__}")
        if step_offset is not None:
            self.step_offset = _step_offset(step_offset)
        self.close()
        self.quantizer = quantizer
        self._targets = [
            (f"{name}.{target}", fq)
            for name, module in quantizer.quantized_modules.items()
            for target, fq in module.fake_quant.items()
            if fq.activation
        ]
        self._last_step = quantizer.current_step
        if self.hook:
            # Registered after the quantizer's own global hook (created with the first quantizer), so it runs after it.
            self._handle = register_optimizer_step_post_hook(self._after_optimizer_step)
        return self

    def close(self) -> None:
        """Stop recording automatically (remove the optimizer hook); what was recorded stays."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> TrainingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_metric(self, name: str, step: int, value: float) -> None:
        """Append ``(step, value)`` to the series ``name`` (e.g. ``"float"`` and ``"QAT"`` test accuracy)."""
        self.metrics.setdefault(str(name), []).append((int(step), float(value)))

    @torch.no_grad()
    def record_ranges(self, step: int | None = None) -> None:
        """Copy every seeded activation range to the CPU under ``step`` (default: the quantizer's current step plus
        ``step_offset``).

        One device-to-host copy for all targets: the ranges are concatenated on the device first.
        """
        if self.quantizer is None:
            raise RuntimeError("this recorder watches no quantizer: call watch(quantizer) first")
        step = self.quantizer.current_step + self.step_offset if step is None else int(step)
        seeded = [(label, fq.observer) for label, fq in self._targets if fq.observer.is_seeded]
        if not seeded:
            return
        tensors = [t for _, observer in seeded for t in (observer.tracked_min, observer.tracked_max)]
        device = tensors[0].device
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors]).to("cpu")
        pieces = iter(torch.split(flat, [t.numel() for t in tensors]))
        for label, observer in seeded:
            history = self.ranges.setdefault(label, RangeHistory())
            history.steps.append(step)
            history.mins.append(next(pieces).view(observer.tracked_min.shape))
            history.maxs.append(next(pieces).view(observer.tracked_max.shape))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        quantizer = self.quantizer
        if quantizer is None:
            return
        step, last = quantizer.current_step, self._last_step
        if step != last:
            self._last_step = step
            if last is None or step // self.every != last // self.every:  # a multiple of `every` reached or passed
                self.record_ranges(step + self.step_offset)


def _step_offset(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"step_offset must be a non-negative int, got {value!r}")
    return value
