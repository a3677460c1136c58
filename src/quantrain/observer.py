"""Range observer: tracks the min and max of what flows through.

Three ways to combine batches (:class:`RangeTracking`), the first observed batch always seeding the range:

* ``MOVING_AVERAGE``: ``tracked = decay * tracked + (1 - decay) * current`` (decay 0.99, as the reference's QAT);
* ``CURRENT``: the range of the latest batch only (the paper's choice for weights);
* ``RUNNING_EXTREMES``: the smallest minimum and largest maximum seen (post-training calibration).

The range is per tensor or per block, as the caller's block layout says. All state is in buffers:
``tracked_min``, ``tracked_max`` (float32) and ``seeded`` (uint8), so it is saved, loaded and broadcast with the
model. A Python mirror of ``seeded`` keeps the forward free of host synchronisation. An optional ``reducer``
combines each batch's range with the other processes' before it is tracked (see :mod:`quantrain.distributed`).

NaN and infinity never reach the range: with ``skip_nonfinite`` a block of a batch that holds one is left out (the
block keeps its tracked range) and the batch is counted in ``nonfinite_batches``.

Under ``torch.compile`` the forward does not branch on that mirror (a guard on it would recompile the model once
it flips): the first batch is selected by ``seeded`` inside the graph (``torch.where``, the same numbers), and the
mirror is only written. A range whose shape is not known up front (``shape=None``) gets new buffers of the first
batch's shape (a graph cannot resize its inputs), so the call after it recompiles once.

>>> import torch
>>> obs = RangeObserver()
>>> obs(torch.tensor([-1.0, 2.0])); obs(torch.tensor([0.0, 4.0]))
>>> round(obs.tracked_min.item(), 4), round(obs.tracked_max.item(), 4)
(-0.99, 2.02)
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch import Tensor, nn

from quantrain.ops.ranges import ema_update, ema_update_all_, min_max

__all__ = ["RangeObserver", "RangeTracking", "resize_buffers_for_load"]

DEFAULT_DECAY = 0.99

RangeReducer = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Combines a batch's per-block ``(min, max)`` with other sources of the same batch (other processes)."""


class RangeTracking(enum.Enum):
    MOVING_AVERAGE = "ema"
    CURRENT = "minmax"
    RUNNING_EXTREMES = "extremes"


class RangeObserver(nn.Module):
    """Per-block minima and maxima, combined across batches as ``tracking`` says.

    Args:
        shape: the range's shape when known up front (parameters); ``None`` sizes it on the first batch.
        tracking: how batches combine (see the module docstring).
        decay: weight of the running value in the moving average.
        skip_nonfinite: leave out of the range each block of a batch that holds NaN or infinity, counting such
            batches in ``nonfinite_batches`` (a few operations on the per-block range, no host read); a block left
            out keeps its tracked range. Quantizers do this for activations; a weight with NaN is beyond repair.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | None = (),
        *,
        tracking: RangeTracking = RangeTracking.MOVING_AVERAGE,
        decay: float = DEFAULT_DECAY,
        skip_nonfinite: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.tracking = RangeTracking(tracking)
        self.decay = decay

        size = (0,) if shape is None else shape
        self.register_buffer("tracked_min", torch.zeros(size, device=device))
        self.register_buffer("tracked_max", torch.zeros(size, device=device))
        self.register_buffer("seeded", torch.zeros((), dtype=torch.uint8, device=device))
        self.skip_nonfinite = skip_nonfinite
        if skip_nonfinite:
            self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64, device=device))

        self._seeded = False
        self.reducer: RangeReducer | None = None  # e.g. quantrain.distributed.RangeSync (not state: not saved)

    @torch.no_grad()
    def forward(self, x: Tensor, blocks: tuple[int, ...] | None = None, clamp: tuple[float, float | None] | None = None) -> None:
        """Track the range of ``x`` (with ``clamp=(lo, hi)``: of ``clamp(x, lo, hi)``, which is ``x``'s range
        clamped, as clamping is monotonic), per block of ``blocks`` or for the whole tensor."""
        current_min, current_max = min_max(x, blocks)
        current_min, current_max = current_min.float(), current_max.float()
        if clamp is not None:
            current_min, current_max = torch.clamp(current_min, *clamp), torch.clamp(current_max, *clamp)
        finite = self._finite_blocks(current_min, current_max) if self.skip_nonfinite else None
        if self.reducer is not None:
            if finite is not None:  # a block left out here takes the other processes' range (neutral min and max)
                current_min = torch.where(finite, current_min, torch.inf)
                current_max = torch.where(finite, current_max, -torch.inf)
            current_min, current_max = self.reducer(current_min, current_max)
            if finite is not None:
                finite = torch.isfinite(current_min + current_max)

        if torch.compiler.is_compiling():
            self._compiled_update(current_min, current_max, finite, tuple(x.shape))
            return
        if not self._seeded:
            self._seed_finite(current_min, current_max, finite)
            return
        if current_min.shape != self.tracked_min.shape:
            raise _shape_changed(self.tracked_min.shape, current_min.shape, tuple(x.shape))
        if finite is not None:  # a block left out keeps its range
            current_min = torch.where(finite, current_min, self.tracked_min)
            current_max = torch.where(finite, current_max, self.tracked_max)
        if self.tracking is RangeTracking.MOVING_AVERAGE:
            ema_update_all_([self.tracked_min, self.tracked_max], [current_min, current_max], self.decay)
        elif self.tracking is RangeTracking.RUNNING_EXTREMES:
            torch.minimum(self.tracked_min, current_min, out=self.tracked_min)
            torch.maximum(self.tracked_max, current_max, out=self.tracked_max)
        else:
            self.tracked_min.copy_(current_min)
            self.tracked_max.copy_(current_max)

    def _finite_blocks(self, current_min: Tensor, current_max: Tensor) -> Tensor:
        """Which blocks hold no NaN or infinity (their min + max is finite; beyond 1.7e38 it overflows, and such a
        range would give an infinite scale anyway); counts the batches with any other."""
        finite = torch.isfinite(current_min + current_max)
        self.nonfinite_batches.add_(finite.logical_not() if finite.dim() == 0 else finite.logical_not().any())
        return finite

    def _seed_finite(self, current_min: Tensor, current_max: Tensor, finite: Tensor | None) -> None:
        """Seed from the first batch with a finite range (a once-only host read): blocks with NaN or infinity in it
        start at 0 (the range always contains 0), and a batch with no finite block seeds nothing."""
        if finite is None or bool(finite.all()):
            self._seed(current_min, current_max)
        elif bool(finite.any()):
            self._seed(torch.where(finite, current_min, 0.0), torch.where(finite, current_max, 0.0))

    def _seed(self, current_min: Tensor, current_max: Tensor) -> None:
        self.tracked_min.resize_(current_min.shape).copy_(current_min)
        self.tracked_max.resize_(current_max.shape).copy_(current_max)
        self.seeded.fill_(1)
        self._seeded = True

    def _compiled_update(self, current_min: Tensor, current_max: Tensor, finite: Tensor | None, x_shape: tuple[int, ...]) -> None:
        """The forward as traced by ``torch.compile``: no branch on Python state that changes during training.

        The shape test is static (decided while tracing). Where the shapes agree, the first batch is selected by
        the ``seeded`` buffer in the graph: ``where(seeded, update(tracked, current), current)`` is the eager
        forward's arithmetic (the update's value is discarded where it is not taken).
        """
        if current_min.shape != self.tracked_min.shape:  # the first batch of a range sized lazily
            if self._seeded:
                raise _shape_changed(self.tracked_min.shape, current_min.shape, x_shape)
            # A graph cannot resize its inputs: the buffers are replaced instead (the next call recompiles once).
            if finite is not None:
                current_min, current_max = torch.where(finite, current_min, 0.0), torch.where(finite, current_max, 0.0)
            self._buffers["tracked_min"] = current_min.to(self.tracked_min.device, copy=True)
            self._buffers["tracked_max"] = current_max.to(self.tracked_max.device, copy=True)
            self.seeded.fill_(1)
            self._seeded = True
            return
        if finite is not None:  # left-out blocks keep their range once seeded, and start at 0 before (as eagerly)
            current_min = torch.where(finite, current_min, torch.where(self.seeded.bool(), self.tracked_min, 0.0))
            current_max = torch.where(finite, current_max, torch.where(self.seeded.bool(), self.tracked_max, 0.0))
        if self.tracking is RangeTracking.CURRENT:
            new_min, new_max = current_min, current_max
        else:
            seeded = self.seeded.bool()
            if self.tracking is RangeTracking.MOVING_AVERAGE:
                new_min = ema_update(self.tracked_min, current_min, self.decay)
                new_max = ema_update(self.tracked_max, current_max, self.decay)
            else:
                new_min = torch.minimum(self.tracked_min, current_min)
                new_max = torch.maximum(self.tracked_max, current_max)
            new_min = torch.where(seeded, new_min, current_min)
            new_max = torch.where(seeded, new_max, current_max)
        self.tracked_min.copy_(new_min)
        self.tracked_max.copy_(new_max)
        self.seeded.fill_(1)
        self._seeded = True  # written, never read, in the graph: no guard, no recompilation

    @torch.no_grad()
    def set_range(self, tracked_min: Tensor, tracked_max: Tensor) -> None:
        """Start from a known range (a saved calibration), as if it had been tracked."""
        self._seed(tracked_min.to(self.tracked_min), tracked_max.to(self.tracked_max))

    @property
    def is_seeded(self) -> bool:

        return self._seeded

    def reset(self) -> None:
        self.seeded.fill_(0)
        self._seeded = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_buffers_for_load(self, state_dict, prefix, ("tracked_min", "tracked_max"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seeded = bool(self.seeded.item())

    def extra_repr(self) -> str:
        if self.tracking is RangeTracking.MOVING_AVERAGE:
            return f"tracking={self.tracking.value}, decay={self.decay}"
        return f"tracking={self.tracking.value}"


def _shape_changed(old: torch.Size, new: torch.Size, x_shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"range shape changed from {tuple(old)} to {tuple(new)}: "
        f"the tensor's channels or blocks differ from the first batch (shape {x_shape})"
    )


def resize_buffers_for_load(module: nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Resize lazily shaped buffers to the shapes being loaded, so a checkpoint restores before the first batch."""
    for name in names:
        incoming = state_dict.get(prefix + name)
        buffer = module._buffers[name]
        if isinstance(incoming, Tensor) and buffer is not None and incoming.shape != buffer.shape:
            buffer.resize_(incoming.shape)
