"""What every quantizer shares: wrapping the model, counting optimizer steps, state, calibration_config, unwrapping."""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from quantrain.calibration import CalibrationConfig
from quantrain.config.bias import needs_graph, plan_bias_sources
from quantrain.config.fusion import plan_fusions
from quantrain.config.ops import OpTargetPlan, entry_selects_ops, plan_op_targets
from quantrain.config.parse import parse_config_list
from quantrain.config.resolve import ModulePlan, TargetKind, float_type, resolve
from quantrain.config.settings import GranularityKind
from quantrain.describe import Description, describe
from quantrain.distributed import RangeSync, broadcast_state, check_same_layout
from quantrain.evaluator import Evaluator
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import CaptureError, ModelGraph, capture, example_arguments
from quantrain.observer import RangeTracking
from quantrain.wrapping.fusion import Fusion, fold_parameters
from quantrain.wrapping.meta import PendingState, is_meta, state_device
from quantrain.wrapping.model import OWNED_CHILDREN, check_wrappable, unwrap, wrap
from quantrain.wrapping.op_points import OpPoint, OpPointPlan, OpPoints, build_op_points, remove_op_points
from quantrain.wrapping.quantized_module import FUSION_NAME, link_integer_bias

__all__ = ["FUSE_MODES", "STEP_BUFFER", "Quantizer"]

STEP_BUFFER = "quantrain_step"
LINK_ATTRIBUTE = "_quantrain_quantizer"
FUSE_MODES = (None, "auto")
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # names DistributedDataParallel leaves alone (read when it wraps)
NONFINITE_CHECK_EVERY = 100


class Quantizer:
    """Base class: quantizes ``model`` in place from ``config_list`` (see :class:`~quantrain.QATQuantizer`).

    Subclasses say how ranges are tracked (:meth:`_tracking`) and what each step changes (:meth:`_apply_schedule`).

    ``model`` may be a ``DistributedDataParallel`` wrapper: its ``module`` is quantized (names are relative to it,
    and it becomes ``bound_model``), while the evaluator trains the wrapper. A model on the ``meta`` device can be
    quantized before it is materialized (see :mod:`quantrain.wrapping.meta`).
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator | None = None,
        *,
        fuse: str | None = None,
        integer_bias: bool = False,
        example_inputs: Any = None,
        sync_ranges: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        trained = model
        model = model.module if isinstance(model, DistributedDataParallel) else model
        _check_flag("integer_bias", integer_bias)
        _check_flag("sync_ranges", sync_ranges)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}")
        plans, op_plans, graph = self._plan(
            model, config_list, evaluator, fuse, integer_bias=integer_bias, example_inputs=example_inputs
        )
        per_tensor = frozenset(p.name for p in op_plans if p.settings.granularity.kind is GranularityKind.PER_TENSOR)
        bias_sources, float_biases = plan_bias_sources(model, plans, graph, per_tensor) if integer_bias else ((), ())
        if evaluator is not None:
            evaluator.bind_model(trained)
        self.bound_model = model
        self.evaluator = evaluator
        self.config_list = config_list
        self.fuse = fuse
        self.integer_bias = integer_bias
        self.example_inputs = example_inputs
        self.graph: ModelGraph | None = graph
        """The model's graph as quantization planned on it (``None`` when nothing needed it)."""
        self._current_step = 0
        device = _device_of(model)
        self._modules = wrap(model, plans, self._tracking, state_device(device))
        try:
            self._op_points, self._op_runtime = self._wrap_ops(model, op_plans, state_device(device))
        except BaseException:
            unwrap(self._modules)
            raise
        holders = self._holders()
        for source in bias_sources:
            link_integer_bias(self._modules[source.module], holders[source.source].fake_quant[source.target])
        if float_biases:
            warnings.warn(
                f"integer_bias: the input of {', '.join(float_biases)} is not known to come from a per-tensor "
                "activation quantizer (give the layer an '_input_' target, or quantize the output of the module "
                "before it), so its bias stays float",
                stacklevel=3,
            )
        model.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.int64, device=state_device(device)))
        self._param_ids = frozenset(id(p) for p in model.parameters())
        self._optimizer: weakref.ref | None = None
        ref = weakref.ref(self)
        # One global optimizer hook serves every live quantizer (held weakly); the load hooks stay with the model for
        # as long as it is quantized.
        _watch_optimizer_steps(self)
        self._hooks = [
            model.register_load_state_dict_pre_hook(_BeforeLoad(ref)),
            model.register_load_state_dict_post_hook(_AfterLoad(ref)),
        ]
        self._connect_ranks(process_group, sync_ranges)
        self._filled_on_load: list[str] = []  # see _before_load
        self._pending = PendingState(model, list(self._owned_buffers())) if is_meta(device) else None
        # The model keeps its quantizer alive, so steps are counted even if the caller drops the quantizer object.
        model.__dict__[LINK_ATTRIBUTE] = _QuantizerLink(self)
        if evaluator is not None and evaluator.first_optimizer is not None:
            self.attach_optimizer(evaluator.first_optimizer)  # its steps are the ones counted, as in NNI

    @staticmethod
    def _plan(
        model: nn.Module,
        config_list: Any,
        evaluator: Any,
        fuse: Any,
        *,
        integer_bias: bool = False,
        example_inputs: Any = None,
        handover: bool = False,
    ) -> tuple[tuple[ModulePlan, ...], tuple[OpTargetPlan, ...], ModelGraph | None]:
        """Validate everything and return the plans, and the graph they were planned on (captured from
        ``example_inputs``, or the evaluator's ``dummy_input``, when fusion or integer bias needs it); raises before
        the model is touched.

        ``handover``: the model is still quantized by the quantizer being replaced (see ``from_compressor``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator must be a quantrain Evaluator such as TorchEvaluator, got {type(evaluator).__name__}")
        if fuse not in FUSE_MODES:
            raise ValueError(f"fuse must be None (fold only what fuse_names names) or 'auto', got {fuse!r}")
        if not handover:
            if hasattr(model, STEP_BUFFER):
                hint = _requantize_hint(model)
                raise ValueError(f"{type(model).__name__} is already quantized by quantrain (it has {STEP_BUFFER!r}); {hint}")
            check_wrappable(model)

        if example_inputs is not None:
            example_arguments(example_inputs)  # raises TypeError for something that is no example
        entries = parse_config_list(config_list)
        selected: dict[int, int] = {}
        plans = resolve(model, entries, selected)
        module_types = {float_type(m).__name__ for m in model.modules()}
        op_entries = [entry for entry in entries if entry_selects_ops(entry, module_types)]
        example = example_inputs if example_inputs is not None else getattr(evaluator, "dummy_input", None)
        graph = _capture_if_needed(model, entries, plans, fuse, integer_bias, example, op_entries)
        plans = plan_fusions(model, entries, plans, auto=fuse == "auto", graph=graph)
        op_plans = plan_op_targets(entries, graph, module_types, selected, auto=fuse == "auto")
        if not handover:
            check_wrappable(model, plans, op_plans)
        return plans, op_plans, graph

    _OPTIONS: tuple[str, ...] = ()
    """The keyword options of a subclass's constructor that ``from_compressor`` accepts besides the shared ones."""

    @staticmethod
    def _check_options(*args: Any, **kwargs: Any) -> Any:
        """Validate a subclass's own constructor options (raises as the constructor would)."""

    @classmethod
    def _continue_from(
        cls, compressor: Quantizer, new_config_list: Any, evaluator: Evaluator | None, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """``cls(model, new_config_list, evaluator, *args, **kwargs)`` on ``compressor``'s model, which it hands over.

        As in NNI, the earlier quantizer's targets that ``new_config_list`` does not configure stay quantized, with
        their settings (:func:`_kept_entries` appends them to the new config_list); targets with the same settings
        carry their tracked ranges, scales and zero points over. ``evaluator`` and the shared options (``fuse``,
        ``integer_bias``, ``example_inputs``, ``sync_ranges``, ``process_group``) default to the earlier quantizer's.
        Everything is validated while the earlier quantizer still holds the model, so a bad argument changes nothing.
        """
        if not isinstance(compressor, Quantizer):
            raise TypeError(f"compressor must be a quantrain quantizer, got {type(compressor).__name__}")
        compressor._check_wrapped()
        model = compressor.bound_model
        evaluator = evaluator or compressor.evaluator
        shared = {
            "fuse": compressor.fuse,
            "integer_bias": compressor.integer_bias,
            "example_inputs": compressor.example_inputs,
            "sync_ranges": compressor.range_sync.enabled,
            "process_group": compressor.range_sync.group,
        }
        shared.update({key: kwargs.pop(key) for key in list(shared) if key in kwargs})
        options = {key: kwargs.pop(key) for key in cls._OPTIONS if key in kwargs}
        if kwargs:
            raise TypeError(f"from_compressor() got unexpected arguments {sorted(kwargs)}")
        cls._check_options(*args, **options)
        planning = {"integer_bias": shared["integer_bias"], "example_inputs": shared["example_inputs"], "handover": True}
        plans, op_plans, _ = cls._plan(model, new_config_list, evaluator, shared["fuse"], **planning)
        kept = _kept_entries(compressor, plans, op_plans)
        if kept:
            new_config_list = [*new_config_list, *kept]
            cls._plan(model, new_config_list, evaluator, shared["fuse"], **planning)
        if evaluator is not None and evaluator is not compressor.evaluator:
            evaluator.bind_model(model)
        carried = {
            (name, target): (fq.settings, fq.state_dict())
            for name, module in compressor._holders().items()
            for target, fq in module.fake_quant.items()
        }
        compressor.unwrap_model()
        quantizer = cls(model, new_config_list, evaluator, *args, **shared, **options)
        for name, module in quantizer._holders().items():
            for target, fq in module.fake_quant.items():
                settings, state = carried.get((name, target), (None, None))
                if settings == fq.settings:
                    keep = {k: v for k, v in state.items() if not k.endswith("_enabled")}
                    fq.load_state_dict({**fq.state_dict(), **keep})
        return quantizer

    def _connect_ranks(self, group: dist.ProcessGroup | None, enabled: bool) -> None:
        """Reduce activation ranges across ranks (see :mod:`quantrain.distributed`), and keep DistributedDataParallel
        from broadcasting quantrain's buffers, which the ranks keep identical themselves."""
        self.range_sync = RangeSync(self._first_sync, group, enabled)
        self._calibrating_now = False
        for fq in self.fake_quantizers():
            if fq.activation:  # weights are identical on every rank under DDP: nothing to reduce
                fq.observer.reducer = self.range_sync
        self._hooks.append(self.bound_model.register_forward_pre_hook(_BeforeForward(weakref.ref(self))))
        self._ddp_ignored_before = self.bound_model.__dict__.get(DDP_IGNORE)
        self.bound_model.__dict__[DDP_IGNORE] = [*(self._ddp_ignored_before or ()), *self._owned_buffers()]

    def _before_forward(self) -> None:
        self._ensure_materialized()
        sync = self.range_sync
        if not sync.ready and (self.bound_model.training or self._calibrating_now) and sync.active():
            sync.first_sync()

    def _first_sync(self) -> None:
        """Every rank quantized the model alike (else ``ValueError`` on all), then rank 0's quantization state."""
        group = self.range_sync.group
        check_same_layout(self._layout(), group, _device_of(self.bound_model))
        self.bound_model.load_state_dict(broadcast_state(self._owned_buffers(), group), strict=False)

    def _wrap_ops(
        self, model: nn.Module, op_plans: tuple, device: torch.device | None
    ) -> tuple[dict[str, OpPoint], OpPoints | None]:
        """A quantizer on the output of each planned op (see :mod:`quantrain.wrapping.op_points`)."""
        if not op_plans:
            return {}, None
        plans = tuple(
            OpPointPlan(p.call.scope, p.call.op_type, p.call.index, p.settings, p.activation, p.inner) for p in op_plans
        )
        tracking = self._tracking(TargetKind.OUTPUT)

        def make(plan: OpPointPlan, target: str) -> FakeQuantizer:
            if target == "_param_0":  # a parameter the op reads: quantized from its current range, as weights are
                return FakeQuantizer(
                    plan.settings, tracking=self._tracking(TargetKind.PARAMETER), label=f"{plan.name}.{target}", device=device
                )
            return FakeQuantizer(plan.settings, activation=True, tracking=tracking, label=f"{plan.name}.{target}", device=device)

        return build_op_points(model, plans, make)

    def _holders(self) -> dict[str, nn.Module]:
        """Every quantized module and op point by name; each holds its quantizers in ``fake_quant``."""
        return {**self._modules, **self._op_points}

    @property
    def op_points(self) -> dict[str, nn.Module]:
        """The quantized functional ops by name (``layer1.0.add:0``); each holds its quantizer in ``fake_quant``."""
        return dict(self._op_points)

    def _owned_buffers(self) -> dict[str, torch.Tensor]:
        """quantrain's buffers in the bound model (its quantizers' state and the step), by state_dict name."""
        return {name: buffer for name, buffer in self.bound_model.named_buffers() if is_quantrain_key(name)}

    def _layout(self) -> list[str]:
        """How the model is quantized, one line per target and fusion (compared across ranks)."""
        lines = [f"{type(self).__name__}: {self._options()}"]
        for name, module in self._holders().items():
            lines += [
                f"{name}.{target}: {fq.extra_repr()}, {fq.observer.extra_repr()}" for target, fq in module.fake_quant.items()
            ]
            fusion = module._modules.get(FUSION_NAME)
            if fusion is not None:
                lines.append(f"{name}: {fusion.extra_repr()}")
        return lines

    def _options(self) -> str:
        return f"integer_bias={self.integer_bias}"

    def _tracking(self, kind: TargetKind) -> RangeTracking:
        return RangeTracking.MOVING_AVERAGE

    def _apply_schedule(self) -> None:
        """Bring every quantizer's flags in line with the current step."""

    # ---- steps -------------------------------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """Optimizer steps counted so far. Assigning it (as NNI users do to resume) moves the schedule there too."""
        return self._current_step

    @current_step.setter
    def current_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"current_step must be a non-negative int, got {step!r}")
        self._current_step = step
        self.bound_model.get_buffer(STEP_BUFFER).fill_(step)
        self._apply_schedule()

    def step(self) -> None:
        """Count one optimizer step (done automatically for the tracked optimizer)."""
        self._current_step += 1
        self.bound_model.get_buffer(STEP_BUFFER).fill_(self._current_step)
        self._apply_schedule()
        if self._current_step % NONFINITE_CHECK_EVERY == 0 or self.bound_model.get_buffer(STEP_BUFFER).device.type == "cpu":
            self.check_nonfinite()

    def check_nonfinite(self) -> dict[str, int]:
        """Warn (``RuntimeWarning``) naming each target that saw batches with NaN or infinity since the last check;
        those were left out of its tracked range. Returns each such target's count since then.

        Done after every optimizer step when the model is on the CPU (a read of a few counters), every
        ``NONFINITE_CHECK_EVERY`` steps on an accelerator (where a read waits for the device), and when ranges are
        tracked through :meth:`track_forward` or read through :meth:`get_calibration_config`.
        """
        quantizers = [fq for fq in self.fake_quantizers() if fq.observer.skip_nonfinite]
        if not quantizers:
            return {}
        totals = torch.stack([fq.observer.nonfinite_batches for fq in quantizers]).tolist()
        seen = self.__dict__.setdefault("_nonfinite_seen", {})
        new = {fq.label: total - seen.get(fq.label, 0) for fq, total in zip(quantizers, totals, strict=True)}
        new = {label: count for label, count in new.items() if count > 0}
        seen.update({fq.label: total for fq, total in zip(quantizers, totals, strict=True)})
        if new:
            listed = ", ".join(f"{label} ({count})" for label, count in new.items())
            warnings.warn(
                f"quantrain: NaN or infinity reached {listed} (batches in parentheses); those batches were left out of "
                "the tracked ranges, which stay finite",
                RuntimeWarning,
                stacklevel=2,
            )
        return new

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the steps of ``optimizer`` (instead of the first optimizer seen stepping on the model)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = weakref.ref(optimizer)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        bound = self._optimizer() if self._optimizer is not None else None
        if bound is None:
            if not self._trains_model(optimizer):
                return
            self._optimizer = weakref.ref(optimizer)
            bound = optimizer
        if optimizer is bound:
            self.step()

    def _trains_model(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` steps on some parameter of the model (looked up again when the model's Parameters
        were replaced, e.g. by ``to_empty`` or ``load_state_dict(assign=True)``)."""
        for _ in range(2):
            if any(id(p) in self._param_ids for group in optimizer.param_groups for p in group["params"]):
                return True
            current = frozenset(id(p) for p in self.bound_model.parameters())
            if current == self._param_ids:
                return False
            self._param_ids = current
        return False

    # ---- forwards ----------------------------------------------------------------------------------------

    def track_forward(self, *args: Any, **kwargs: Any) -> None:
        """Run one no-grad forward that tracks ranges, whatever the model's mode, so every buffer has its shape.

        Tensors among the inputs (in tuples, lists and dicts too) are moved to the model's device first, as NNI does.
        Under a process group of several ranks (with ``sync_ranges``) it reduces ranges across ranks, so every rank
        must call it together."""
        self._check_wrapped()
        device = _device_of(self.bound_model)
        if device is not None and not is_meta(device):
            args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        with self._calibrating(), torch.no_grad():
            self.bound_model(*args, **kwargs)
        self.check_nonfinite()

    @contextlib.contextmanager
    def _calibrating(self) -> Iterator[None]:
        """Inside the block, every quantizer tracks ranges whatever its module's training mode."""
        quantizers = list(self.fake_quantizers())
        for fq in quantizers:
            fq.calibrating = True
        self._calibrating_now = True
        try:
            yield
        finally:
            self._calibrating_now = False
            for fq in quantizers:
                fq.calibrating = False

    # ---- results -----------------------------------------------------------------------------------------

    def fake_quantizers(self) -> Iterator[FakeQuantizer]:
        for module in self._holders().values():
            yield from module.fake_quant.values()

    def reestimate_bn(self, data: Any, batches: int | None = None, forward: Any = None) -> int:
        """Recompute every BatchNorm's running statistics under the quantized model, on ``data`` (an iterable of
        batches: a tensor, a ``(inputs, *targets)`` tuple or list, or a dict of keyword inputs; or any batch with
        ``forward(model, batch)``), at most ``batches`` of them; returns how many ran. Each BatchNorm's statistics
        become the plain average over those batches, with quantized weights and activations and frozen ranges;
        folded BatchNorms too (see :mod:`quantrain.wrapping.bn_reestimation`). Run it after QAT, before export;
        every mode, momentum and fold state is restored, and on an error the statistics are as they were.

        >>> import torch
        >>> from torch import nn
        >>> from quantrain import QATQuantizer
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> quantizer = QATQuantizer(model, [{"op_types": ["Conv2d"], "quant_dtype": "int8"}])
        >>> quantizer.reestimate_bn([torch.randn(8, 1, 6, 6) for _ in range(5)], batches=3)
        3
        >>> int(model[1].num_batches_tracked)
        3
        """
        from quantrain.wrapping.bn_reestimation import reestimate_batchnorm

        self._check_wrapped()
        return reestimate_batchnorm(self.bound_model, data, batches, list(self.fusions()), forward)

    def fusions(self) -> Iterator[Fusion]:
        for module in self._modules.values():
            fusion = module._modules.get(FUSION_NAME)
            if fusion is not None:
                yield fusion

    def folded_parameters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For each layer with a folded BatchNorm, the float ``(weight, bias)`` of the single conv/linear it becomes:
        ``w * s`` and ``beta + (b - running_mean) * s`` with ``s = gamma / sqrt(running_var + eps)``."""
        folded = {}
        for name, module in self._modules.items():
            fusion = module._modules.get(FUSION_NAME)
            if fusion is not None and fusion.bn is not None:
                with torch.no_grad():
                    folded[name] = fold_parameters(module.weight, module.bias, fusion.bn)
        return folded

    @property
    def quantized_modules(self) -> dict[str, nn.Module]:
        """The quantized modules by name."""
        return dict(self._modules)

    def describe(self) -> Description:
        """Every quantization point, named as a config names it, in the order the forward runs them, and every op
        of the forward that a config could name but none quantizes; ``print()`` it for a table (see
        :mod:`quantrain.describe`)."""
        self._check_wrapped()
        return describe(self.bound_model, self._holders(), self.graph)

    def get_calibration_config(self) -> CalibrationConfig:
        """``{module: {target: {scale, zero_point, quant_dtype, quant_scheme, quant_bits, tracked_min, tracked_max}}}``
        for every target that has a scale (CPU tensors, copies; zero_point as float). A plain dict, where NNI returns a
        ``defaultdict``, so that ``torch.load`` of a saved one works with its default ``weights_only=True``. After
        :meth:`unwrap_model`, the calibration held when the model was unwrapped."""
        if getattr(self, "_unwrapped", False):
            return copy.deepcopy(self._final_calibration)
        self._ensure_materialized()
        self.check_nonfinite()
        config: CalibrationConfig = {}
        for name, module in self._holders().items():
            for target, fq in module.fake_quant.items():
                if fq.is_calibrated:
                    config.setdefault(name, {})[target] = _calibration_entry(fq)
        return config

    def set_calibration_config(self, calibration_config: CalibrationConfig, *, strict: bool = True) -> list[str]:
        """Load scales, zero points and ranges from a calibration_config (``get_calibration_config()``'s shape, or
        :func:`~quantrain.load_calibration_config` of a JSON file, NNI 3.0's included), e.g. to export a model
        calibrated elsewhere. Every entry is checked against this quantizer's targets first (its ``quant_dtype``,
        ``quant_scheme``, ``quant_bits`` and shapes), and nothing changes unless all fit.

        Returns the quantizer's targets the config does not cover (``module.target``). With ``strict`` (the default)
        an entry for a module or target this quantizer does not quantize is a ``ValueError``; otherwise it is skipped.
        """
        self._check_wrapped()
        self._ensure_materialized()
        if not isinstance(calibration_config, Mapping):
            kind = type(calibration_config).__name__
            raise TypeError(f"calibration_config must be a dict {{module: {{target: {{...}}}}}}, got {kind}")
        planned = []
        for module, targets in calibration_config.items():
            for target, entry in (targets or {}).items():
                fq = self._target(module, target, strict)
                if fq is not None:
                    planned.append((fq, fq.check_qparams(**_checked_entry(fq, entry))))
        for fq, qparams in planned:  # all checked: now written
            fq.apply_qparams(qparams)
        covered = {id(fq) for fq, _ in planned}
        return [fq.label for fq in self.fake_quantizers() if id(fq) not in covered]

    def update_calibration_config(self, calibration_config: CalibrationConfig) -> None:
        """NNI's name for :meth:`set_calibration_config` (strict: every entry must name a quantized target)."""
        self.set_calibration_config(calibration_config)

    def _target(self, module: str, target: str, strict: bool) -> FakeQuantizer | None:
        holders = self._holders()
        fake_quant = holders[module].fake_quant if module in holders else {}
        if target in fake_quant:
            return fake_quant[target]
        if strict:
            where = f"module {module!r}" if module in holders else f"{module!r} is not a quantized module or op"
            raise ValueError(f"calibration_config[{module!r}][{target!r}]: no such target ({where}; strict=False skips it)")
        return None

    def unwrap_model(self) -> nn.Module:
        """Remove every quantizer: the model is its float self again, with the trained weights.

        :meth:`get_calibration_config` still returns the calibration the quantizer held at this point (NNI's reads
        its wrappers after unwrapping, and NNI's examples rely on that)."""
        self._check_wrapped()
        self._final_calibration = self.get_calibration_config() if self._pending is None else {}
        unwrap(self._modules)
        remove_op_points(self.bound_model, self._op_runtime)
        self._op_points, self._op_runtime = {}, None
        del self.bound_model._buffers[STEP_BUFFER]
        self.bound_model.__dict__.pop(LINK_ATTRIBUTE, None)
        self.bound_model.__dict__.pop(DDP_IGNORE, None)
        if self._ddp_ignored_before is not None:
            self.bound_model.__dict__[DDP_IGNORE] = self._ddp_ignored_before
        _remove_hooks(self._hooks)
        _LIVE_QUANTIZERS.discard(self)
        self._modules = {}
        self._pending = None
        self._unwrapped = True
        return self.bound_model

    def wrap_model(self) -> None:
        """NNI re-wraps a model after ``unwrap_model``; quantrain's quantizers stay attached until
        :meth:`unwrap_model`, which is final (the state_dict keys never change, so nothing needs unwrapping to save
        or load). Raises ``RuntimeError`` saying so."""
        if getattr(self, "_unwrapped", False):
            raise RuntimeError(
                f"unwrap_model() is final in quantrain; create a new {type(self).__name__} on the model to quantize it "
                "again (load the earlier state_dict into it to continue)"
            )
        raise RuntimeError("the model is already wrapped: quantrain attaches its quantizers when the quantizer is created")

    def _check_wrapped(self) -> None:
        if getattr(self, "_unwrapped", False):
            raise RuntimeError(f"this quantizer's model was unwrapped; create a new {type(self).__name__} to quantize it again")

    def _loaded(self) -> None:
        self._current_step = int(self.bound_model.get_buffer(STEP_BUFFER).item())
        # Counts of NaN/infinity that came with the checkpoint were reported where they happened.
        self.__dict__["_nonfinite_seen"] = {
            fq.label: int(fq.observer.nonfinite_batches) for fq in self.fake_quantizers() if fq.observer.skip_nonfinite
        }

    # ---- a model quantized on the meta device (see quantrain.wrapping.meta) --------------------------------------

    def _before_load(self, state_dict: Mapping[str, Any], prefix: str, assign: bool) -> None:
        """Before load_state_dict fills a model quantized on meta: give the quantrain buffers it does not fill their
        initial values, on the device of the tensors loaded (``assign=True``) or of the materialized model."""
        if self._pending is None:
            return
        loading = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        device = next((v.device for v in loading.values() if isinstance(v, torch.Tensor) and not v.is_meta), None)
        filled = None if self._pending.blocks_load(self.bound_model, assign) else self._materialize(frozenset(loading), device)
        if filled is None:
            raise ValueError(
                f"{type(self.bound_model).__name__} is on the meta device, where load_state_dict() copies nothing: "
                "load real tensors with load_state_dict(state_dict, assign=True), or materialize the model first with "
                "model.to_empty(device=...)"
            )
        self._filled_on_load = filled

    def _after_load(self) -> None:
        """After load_state_dict: resync the step (and the flags, where :meth:`_before_load` gave initial values)."""
        filled, self._filled_on_load = self._filled_on_load, []
        if self._pending is not None:  # still on meta: nothing to read yet
            return
        self._loaded()
        if filled:
            self._state_materialized()

    def _ensure_materialized(self) -> None:
        if self._pending is not None and self._materialize():
            self._state_materialized()

    def _materialize(self, loaded: frozenset[str] = frozenset(), device: torch.device | None = None) -> list[str] | None:
        """The buffers given their initial values now (``None`` if none were pending or there is no device yet)."""
        if self._pending is None:
            return None
        filled = self._pending.materialize(self.bound_model, loaded, device)
        if filled is not None:
            self._pending = None
        return filled

    def _state_materialized(self) -> None:
        """quantrain's buffers just got their initial values: the Python mirrors of the flags are read from them again,
        then what the quantizer set while the model was on meta (the step, and in subclasses the schedule's flags) is
        written again."""
        for module in (*self.fake_quantizers(), *self.fusions()):
            module.load_state_dict(module.state_dict())
        self.bound_model.get_buffer(STEP_BUFFER).fill_(self._current_step)


def _kept_entries(compressor: Quantizer, plans: tuple[ModulePlan, ...], op_plans: tuple = ()) -> list[dict[str, Any]]:
    """config_list entries, one per module or op, for ``compressor``'s targets that ``plans`` and ``op_plans`` leave
    out, each with its settings (and the module's ``fuse_names`` group where its folding would otherwise be lost)."""
    configured = {(plan.name, target.name) for plan in plans for target in plan.targets}
    configured |= {(plan.name, "_output_0") for plan in op_plans}
    fused = {plan.name for plan in plans if plan.fusion is not None}
    entries = []
    for name, module in compressor._holders().items():
        kept = {target: fq.settings for target, fq in module.fake_quant.items() if (name, target) not in configured}
        if not kept:
            continue
        entry: dict[str, Any] = {
            "op_names": [name],
            "target_names": list(kept),
            "target_settings": {
                target: {"quant_dtype": s.dtype.name, "quant_scheme": s.scheme.value, "granularity": s.granularity.spec}
                for target, s in kept.items()
            },
        }
        fusion = module._modules.get(FUSION_NAME)
        if fusion is not None and name not in fused:
            entry["fuse_names"] = [fusion.group]
        entries.append(entry)
    return entries


def _checked_entry(fq: FakeQuantizer, entry: Any) -> dict[str, Any]:
    """``entry``'s tensors for :meth:`FakeQuantizer.set_qparams`, after checking its dtype and scheme against ``fq``."""
    where = f"calibration_config entry {fq.label}"
    if not isinstance(entry, Mapping) or "scale" not in entry or "zero_point" not in entry:
        raise ValueError(f"{where}: expected a dict with 'scale' and 'zero_point'")
    s = fq.settings
    expected = {"quant_dtype": s.dtype.name, "quant_scheme": s.scheme.value, "quant_bits": s.dtype.bits}
    for key, value in expected.items():
        given = entry.get(key)
        if key == "quant_dtype" and given is None and "quant_dtype" in entry:
            given = "int8"  # NNI writes None for its default
        if given is not None and given != value:
            raise ValueError(f"{where}: {key} is {given!r}, but this quantizer's config gives {value!r}")
    tensors = {}
    for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
        if entry.get(key) is not None:
            try:
                tensors[key] = torch.as_tensor(entry[key], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{where}: {key} is not a number or nested list of numbers ({exc})") from None
    return tensors


def _calibration_entry(fq: FakeQuantizer) -> dict[str, Any]:

    s = fq.settings
    return {
        "scale": _cpu(fq.scale),
        "zero_point": _cpu(fq.zero_point),
        "quant_dtype": s.dtype.name,
        "quant_scheme": s.scheme.value,
        "quant_bits": s.dtype.bits,
        "tracked_min": _cpu(fq.observer.tracked_min),
        "tracked_max": _cpu(fq.observer.tracked_max),
    }


def _capture_if_needed(
    model: nn.Module,
    entries: Any,
    plans: tuple[ModulePlan, ...],
    fuse: Any,
    integer_bias: bool,
    example: Any,
    op_entries: list = (),
) -> ModelGraph | None:
    """The model's graph (planned modules as units) when ``fuse='auto'``, explicit ``fuse_names`` or integer bias
    read it. Without an example: ``ValueError`` for what cannot do without the graph; explicit ``fuse_names`` are
    then checked when the forward runs (a folded BatchNorm must receive its layer's output)."""
    wants = []
    if fuse == "auto":
        wants.append("fuse='auto' finds the chains to fold")
    upstream = needs_graph(model, plans) if integer_bias else []
    if upstream:
        wants.append(f"integer_bias finds which quantizer feeds {', '.join(upstream[:3])}{' ...' if len(upstream) > 3 else ''}")
    if op_entries:
        listed = [f"config_list[{entry.index}]" for entry in op_entries]
        wants.append(f"{', '.join(listed)} select functional ops, which are found")
    explicit = any(entry.fuse_names for entry in entries)
    if not wants and not (explicit and example is not None):
        return None
    if example is None:
        raise ValueError(
            f"{' and '.join(wants)} in the model's graph, which quantrain captures with torch.export from an example "
            "input: pass example_inputs= (a batch as the forward takes it: a tensor, a tuple of positional inputs or a "
            "dict of keyword inputs), or give the evaluator a dummy_input"
        )
    device = _device_of(model)
    if device is not None:
        example = _to_device(example, device)  # as track_forward does
    try:
        return capture(model, example, units=frozenset(plan.name for plan in plans))
    except CaptureError:
        if wants:
            raise
        return None  # explicit fuse_names only: the fused forward checks its chain when it runs


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_budget(max_steps: Any, max_epochs: Any, *, required: bool) -> None:
    """Validate compress()'s step and epoch budget."""
    if required and max_steps is None and max_epochs is None:
        raise ValueError("compress() needs max_steps or max_epochs (or both)")
    for name, value in (("max_steps", max_steps), ("max_epochs", max_epochs)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"compress(): {name} must be a positive int or None, got {value!r}")


def _requantize_hint(model: nn.Module) -> str:
    """What to do with a model quantized already: unwrap it, or, for a copy (which has no quantizer), start afresh."""
    link = model.__dict__.get(LINK_ATTRIBUTE)
    if link is not None and link.quantizer is None:
        return (
            "it is a copy or an unpickled quantized model, which has no quantizer (and so counts no steps): quantize "
            "a float model and load this one's state_dict() into it to go on training it"
        )
    return "call unwrap_model() on its quantizer first"


def is_quantrain_key(key: str) -> bool:
    """Whether a state_dict key belongs to quantrain's state rather than to the user's model."""
    if key == STEP_BUFFER:
        return True
    return any(key.startswith(f"{child}.") or f".{child}." in key for child in OWNED_CHILDREN)


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


_LIVE_QUANTIZERS: weakref.WeakSet[Quantizer] = weakref.WeakSet()
_STEP_HOOK: list = []


def _watch_optimizer_steps(quantizer: Quantizer) -> None:
    """Count ``quantizer``'s steps from every optimizer step, for as long as it lives and stays wrapped.

    A single global hook that is never removed: removing hooks when a quantizer is garbage-collected could happen in
    the middle of an optimizer step, while PyTorch iterates over its hooks.
    """
    _LIVE_QUANTIZERS.add(quantizer)
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_pre_hook(_before_optimizer_step))
        _STEP_HOOK.append(register_optimizer_step_post_hook(_on_optimizer_step))


_STEP_DEPTH: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
"""Optimizer steps in progress: an optimizer subclass whose ``step`` calls ``super().step()`` runs the global hooks
once per class; only the outermost step is counted."""


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _STEP_DEPTH[optimizer] = _STEP_DEPTH.get(optimizer, 0) + 1


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    depth = _STEP_DEPTH.pop(optimizer, 1) - 1
    if depth > 0:
        _STEP_DEPTH[optimizer] = depth
        return
    for quantizer in list(_LIVE_QUANTIZERS):
        quantizer._on_step(optimizer)


class _QuantizerLink:
    """The model's reference to its quantizer; copies and pickles of the model get none (they have no quantizer)."""

    def __init__(self, quantizer: Quantizer | None) -> None:
        self.quantizer = quantizer

    def __reduce__(self):
        return _QuantizerLink, (None,)

    def __deepcopy__(self, memo: dict) -> _QuantizerLink:
        return _QuantizerLink(None)


class _AfterLoad:
    """load_state_dict post hook on the model: accept float checkpoints, and resync the quantizer's step.

    It refers to the quantizer weakly and drops that reference when the model is copied or pickled (a copy has
    no quantizer of its own).
    """

    def __init__(self, ref: weakref.ref | None) -> None:
        self.ref = ref

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        # A float checkpoint has no quantization state: keep the model's own rather than failing a strict load.
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_quantrain_key(k)]
        quantizer = self.ref() if self.ref is not None else None
        if quantizer is not None:
            quantizer._after_load()

    def __reduce__(self):
        return _AfterLoad, (None,)


class _BeforeLoad:
    """load_state_dict pre-hook on the model: see :meth:`Quantizer._before_load` (copies drop the reference)."""

    def __init__(self, ref: weakref.ref | None) -> None:
        self.ref = ref

    def __call__(self, module: nn.Module, state_dict: Mapping, prefix: str, local_metadata: dict, *args: Any) -> None:
        quantizer = self.ref() if self.ref is not None else None
        if quantizer is not None:
            quantizer._before_load(state_dict, prefix, bool(local_metadata.get("assign_to_params_buffers", False)))

    def __reduce__(self):
        return _BeforeLoad, (None,)


class _BeforeForward:
    """Forward pre-hook on the model: the first training forward under a process group checks and aligns the ranks."""

    def __init__(self, ref: weakref.ref | None) -> None:
        self.ref = ref

    def __call__(self, module: nn.Module, args: Any) -> None:
        quantizer = self.ref() if self.ref is not None else None
        if quantizer is not None:
            quantizer._before_forward()

    def __reduce__(self):
        return _BeforeForward, (None,)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
