"""FakeQuantizer: one target's quantization state and its forward.

It owns a :class:`~quantrain.observer.RangeObserver` and the ``scale``/``zero_point`` buffers derived from it, and
two uint8 enable flags (``observer_enabled``, ``fake_quant_enabled``) kept as buffers so they are saved and
replicated with the model. Its forward, for an input ``x``::

    if (training or calibrating) and observer enabled:   track range of x; if fake quant enabled: scale, zp = qparams(range)
    if fake quant enabled and calibrated: return round(clamp(x / scale + zp, qmin, qmax)) - zp) * scale
    else:                                 return x

so each batch is quantized with a scale that already includes it (as the reference does). Python mirrors of the
flags keep the forward free of host synchronisation; they are refreshed whenever a state_dict is loaded.

Under ``torch.compile`` the forward reads only mirrors that change at step boundaries (the schedule's enable
flags, the training mode), so a schedule phase change recompiles once and nothing else does: the first batch's
one-time work (seeding the range, marking the quantizer calibrated, writing a symmetric zero point) is done on
every compiled call, as tensor writes in the graph, and the mirrors are only written there.

>>> import torch
>>> from quantrain.config import TargetSettings
>>> fq = FakeQuantizer(TargetSettings())
>>> fq.enable_fake_quant(True)
>>> fq(torch.tensor([-1.0, 0.5, 1.27])).tolist() == [-1.0, 0.5, 1.27]
False
>>> round(fq.scale.item() * 127, 5)
1.27
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from quantrain.config.settings import GranularityKind, TargetSettings
from quantrain.observer import RangeObserver, RangeTracking, resize_buffers_for_load
from quantrain.ops import native
from quantrain.ops.fake_quant import clamp_with_mask, fake_quantize_clamped, observe_fake_quantize, quantize_dequantize
from quantrain.ops.qparams import calculate_qparams, symmetric_scale, symmetric_zero_point

__all__ = ["FakeQuantizer", "QParams"]


class QParams(NamedTuple):
    """A target's quantization parameters and the range they represent, shaped like the target's."""

    scale: Tensor
    zero_point: Tensor
    tracked_min: Tensor
    tracked_max: Tensor


class FakeQuantizer(nn.Module):
    """Tracks the range of one target and fake-quantizes it.

    Args:
        settings: dtype, scheme and granularity of the target.
        blocks: the resolved block layout of a parameter; ``None`` for per tensor. Ignored for activations,
            whose layout is resolved from the granularity on each batch (their batch size may change).
        range_shape: the shape of the range and qparams when known up front (parameters); ``None`` sizes them
            on the first batch.
        tracking: how the observer combines batches.
        activation: whether the target is an input/output (dim 0 is the batch) rather than a parameter.
        label: ``module.target``, used in error messages.
    """

    def __init__(
        self,
        settings: TargetSettings,
        *,
        blocks: tuple[int, ...] | None = None,
        activation: bool = False,
        range_shape: tuple[int, ...] | None = None,
        tracking: RangeTracking = RangeTracking.MOVING_AVERAGE,
        label: str = "",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.activation = activation
        self.label = label
        per_tensor = settings.granularity.kind is GranularityKind.PER_TENSOR
        self._blocks = None if per_tensor else blocks
        self._activation_blocks: dict[int, tuple[int, ...] | None] = {}
        shape = () if per_tensor else range_shape
        self.observer = RangeObserver(shape, tracking=tracking, skip_nonfinite=activation, device=device)
        self.calibrating = False  # observe whatever the training mode (post-training calibration)
        size = (0,) if shape is None else shape
        self.register_buffer("scale", torch.ones(size, device=device))
        self.register_buffer("zero_point", torch.zeros(size, device=device))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.uint8, device=device))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8, device=device))
        self.register_buffer("fake_quant_enabled", torch.zeros((), dtype=torch.uint8, device=device))
        self._symmetric = settings.scheme.value == "symmetric"
        # Symmetric signed types have zero point 0: the forward then skips adding and subtracting it.
        self._zero_free = self._symmetric and symmetric_zero_point(settings.qmin, settings.qmax) == 0
        self._native_plans: dict = {}  # settings for the native one-call forward, by (clamp, tracking, decay)
        self._refresh_mirrors()

    def forward(self, x: Tensor, clamp: tuple[float, float | None] | None = None) -> Tensor:
        """Fake-quantize ``x``, or with ``clamp=(lo, hi)`` the output of a fused ReLU/ReLU6, ``clamp(x, lo, hi)``
        (one saved mask for both; the range observed is the clamped one)."""
        if not x.is_floating_point():
            raise TypeError(f"{self.label}: only floating-point tensors can be fake-quantized, got {x.dtype}")
        blocks = self._blocks_for(x) if self.activation else self._blocks
        if clamp is not None and blocks is not None:  # per-block scales: clamp first, then quantize as usual
            x, clamp = clamp_with_mask(x, *clamp), None
        observing = (self.training or self.calibrating) and self._observe
        # (the compiled forward must not read the seeded/calibrated mirrors: a guard on them would recompile it)
        if observing and self._fake_quant and not torch.compiler.is_compiling() and self._calibrated and self.observer.is_seeded:
            fused = self._observe_and_quantize(x, blocks, clamp)
            if fused is not None:
                return fused
        if observing:
            self.observer(x, blocks, clamp)  # the range of clamp(x, lo, hi): x's range, clamped
            unseeded = not (torch.compiler.is_compiling() or self.observer.is_seeded)  # no finite value seen yet
            if not self._fake_quant or (unseeded and not self._calibrated):
                return x if clamp is None else clamp_with_mask(x, *clamp)
            if not unseeded:
                self._update_qparams()  # the range is seeded now, so this calibrates
        elif not (self._fake_quant and self._calibrated):
            return x if clamp is None else clamp_with_mask(x, *clamp)
        zero_point = None if self._zero_free else self.zero_point
        qmin, qmax = self.settings.qmin, self.settings.qmax
        if clamp is not None:
            return fake_quantize_clamped(x, *clamp, self.scale, zero_point, qmin, qmax)
        return quantize_dequantize(x, self.scale, zero_point, qmin, qmax, blocks)

    def _observe_and_quantize(self, x: Tensor, blocks: tuple[int, ...] | None, clamp) -> Tensor | None:
        """The steady-state training forward (observe, update the qparams, fake-quantize) as one native call, where
        it applies (plain float32 CPU tensors, eager, no range reduction across processes, no hooks on the
        observer); ``None`` otherwise. The same numbers as the operation-by-operation path."""
        observer = self.observer
        reducer = observer.reducer
        if reducer is not None and getattr(reducer, "active", lambda: True)():  # ranges combined across processes
            return None
        if observer._forward_hooks or observer._forward_pre_hooks:
            return None
        state = (observer.tracked_min, observer.tracked_max, self.scale, self.zero_point)
        if observer.skip_nonfinite:
            state += (observer.nonfinite_batches,)
        layout = native.observe_layout(x, blocks, state)
        if layout is None:
            return None
        key = (clamp, observer.tracking, observer.decay)
        plan = self._native_plans.get(key)
        if plan is None:
            s = self.settings
            plan = native.observe_plan(
                observer.tracking.value, observer.decay, self._symmetric, observer.skip_nonfinite, s.qmin, s.qmax, clamp
            )
            self._native_plans[key] = plan
        return observe_fake_quantize(x, layout, plan, state, not self._zero_free)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Track the range of ``x`` (per block, as this target's layout says) without quantizing it."""
        self.observer(x, self._blocks_for(x) if self.activation else self._blocks)

    def update_qparams(self) -> None:
        """Recompute ``scale`` and ``zero_point`` from the tracked range (no-op before the first batch)."""
        if self.observer.is_seeded:
            self._update_qparams()

    @torch.no_grad()
    def _update_qparams(self) -> None:
        tracked_min, tracked_max = self.observer.tracked_min, self.observer.tracked_max
        qmin, qmax = self.settings.qmin, self.settings.qmax
        compiling = torch.compiler.is_compiling()
        if self.scale.shape != tracked_min.shape:  # sized lazily: the first batch gives the shape
            if compiling:  # a graph cannot resize its inputs: new buffers (the next call recompiles once)
                self._buffers["scale"] = torch.ones_like(tracked_min, device=self.scale.device)
                self._buffers["zero_point"] = torch.zeros_like(tracked_min, device=self.zero_point.device)
            else:
                self.scale.resize_(tracked_min.shape)
                self.zero_point.resize_(tracked_min.shape)
        if self._symmetric:  # the zero point is a constant: written once (each call when compiled: no branch)
            self.scale.copy_(symmetric_scale(tracked_min, tracked_max, qmin, qmax))
            if compiling or not self._calibrated:
                self.zero_point.fill_(symmetric_zero_point(qmin, qmax))
        else:
            scale, zero_point = calculate_qparams(tracked_min, tracked_max, qmin, qmax, symmetric=False)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if compiling or not self._calibrated:  # compiled: on every call, the mirror written but never read (no guard)
            self.calibrated.fill_(1)
            self._calibrated = True

    def set_qparams(
        self, scale: Tensor, zero_point: Tensor, tracked_min: Tensor | None = None, tracked_max: Tensor | None = None
    ) -> None:
        """Take ``scale`` and ``zero_point`` (and the range they came from) from elsewhere, e.g. a saved
        calibration_config; the quantizer is then calibrated. Raises ``ValueError`` (naming this target) before
        changing anything when they do not fit its settings (see :meth:`check_qparams`)."""
        self.apply_qparams(self.check_qparams(scale, zero_point, tracked_min, tracked_max))

    def check_qparams(
        self, scale: Tensor, zero_point: Tensor, tracked_min: Tensor | None = None, tracked_max: Tensor | None = None
    ) -> QParams:
        """Validate qparams for this target (count, positivity, integral zero points in range, the symmetric zero
        point) and shape them like its own; nothing changes.

        Without a range, the one the scale and zero point represent is used: ``[(qmin - zp) * s, (qmax - zp) * s]``
        (affine) or ``[-s * (qmax - qmin) / 2, s * (qmax - qmin) / 2]`` (symmetric).
        """
        qmin, qmax = self.settings.qmin, self.settings.qmax
        shape = self._incoming_shape(scale)
        values = {"scale": scale, "zero_point": zero_point, "tracked_min": tracked_min, "tracked_max": tracked_max}
        values = {k: None if v is None else self._shaped(k, v, shape) for k, v in values.items()}
        scale, zero_point = values["scale"], values["zero_point"]
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{self.label}: scale must be finite and positive")
        if not (zero_point == zero_point.round()).all() or zero_point.min() < qmin or zero_point.max() > qmax:
            raise ValueError(f"{self.label}: zero_point must hold integers in [{qmin}, {qmax}] for {self.settings.dtype.name}")
        if self._symmetric and (zero_point != symmetric_zero_point(qmin, qmax)).any():
            raise ValueError(
                f"{self.label}: a symmetric {self.settings.dtype.name} target has zero_point "
                f"{symmetric_zero_point(qmin, qmax)}, got {sorted(set(zero_point.flatten().tolist()))[:4]}"
            )
        lo, hi = values["tracked_min"], values["tracked_max"]
        if lo is None or hi is None:
            half = scale * (qmax - qmin) / 2
            lo, hi = (-half, half) if self._symmetric else ((qmin - zero_point) * scale, (qmax - zero_point) * scale)
        return QParams(scale, zero_point, lo, hi)

    @torch.no_grad()
    def apply_qparams(self, qparams: QParams) -> None:
        """Write qparams from :meth:`check_qparams`: scale, zero point, tracked range; the quantizer is calibrated."""
        for buffer, value in ((self.scale, qparams.scale), (self.zero_point, qparams.zero_point)):
            buffer.resize_(value.shape).copy_(value)
        self.observer.set_range(qparams.tracked_min, qparams.tracked_max)
        self.calibrated.fill_(1)
        self._calibrated = True

    def _incoming_shape(self, scale: Tensor) -> tuple[int, ...]:
        """The shape the qparams take: this target's own where known (per tensor, or a parameter's per-block shape)."""
        if self.settings.granularity.kind is GranularityKind.PER_TENSOR:
            if scale.numel() != 1:
                raise ValueError(f"{self.label}: a per-tensor target takes one scale, got {scale.numel()}")
            return ()
        known = tuple(self.scale.shape)
        if self.scale.numel() > 0:
            if scale.numel() != self.scale.numel():
                raise ValueError(f"{self.label}: expected {self.scale.numel()} scales (shape {known}), got {scale.numel()}")
            if scale.dim() == len(known) and tuple(scale.shape) != known:  # e.g. (out, 1) given to a (1, out) target
                raise ValueError(
                    f"{self.label}: expected scales of shape {known}, got shape {tuple(scale.shape)}: they vary along "
                    "another dim than this target's (granularity 'out_channel' follows each module type's output-channel "
                    "axis, see quantrain.register_weight_axis)"
                )
            return known
        return tuple(scale.shape)

    def _shaped(self, name: str, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.scale.device)
        if value.numel() != torch.Size(shape).numel():
            raise ValueError(f"{self.label}: {name} has {value.numel()} values, the scale {torch.Size(shape).numel()}")
        return value.reshape(shape)

    def enable_observer(self, enabled: bool = True) -> None:

        self.observer_enabled.fill_(int(enabled))
        self._observe = bool(enabled)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled.fill_(int(enabled))
        self._fake_quant = bool(enabled)

    @property
    def is_calibrated(self) -> bool:
        """Whether ``scale`` and ``zero_point`` hold values computed from a tracked range."""
        return self._calibrated

    def _blocks_for(self, x: Tensor) -> tuple[int, ...] | None:
        if self.settings.granularity.kind is GranularityKind.PER_TENSOR:
            return None
        ndim = x.dim()
        if ndim not in self._activation_blocks:
            try:
                self._activation_blocks[ndim] = self.settings.granularity.block_shape(tuple(x.shape), activation=True)
            except ValueError as exc:
                raise ValueError(
                    f"{self.label}: granularity {self.settings.granularity.spec!r} does not fit a tensor "
                    f"of shape {tuple(x.shape)}: {exc}"
                ) from None
        return self._activation_blocks[ndim]

    def _refresh_mirrors(self) -> None:
        self._observe = bool(self.observer_enabled.item())
        self._fake_quant = bool(self.fake_quant_enabled.item())
        self._calibrated = bool(self.calibrated.item())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_buffers_for_load(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_mirrors()

    def __getstate__(self):
        # the native kernels' settings are rebuilt on first use: no private C struct layout in pickles or copies
        return {**super().__getstate__(), "_native_plans": {}}

    def extra_repr(self) -> str:
        s = self.settings
        return f"{s.dtype.name}, {s.scheme.value}, granularity={s.granularity.spec!r}"
