"""Resolve parsed config entries against a model: which module gets which targets, with which settings.

This reads the model and never changes it, so every error surfaces before anything is wrapped. The result is a
tuple of :class:`ModulePlan`, one per quantized module, in the model's module order.
"""

from __future__ import annotations

import enum
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from quantrain.config.parse import ConfigEntry
from quantrain.config.settings import GranularityKind, TargetSettings, shown

__all__ = [
    "DEFAULT_TARGETS",
    "FusionPlan",
    "ModulePlan",
    "float_type",
    "TargetKind",
    "TargetPlan",
    "WEIGHT_AXES",
    "out_channel_axis",
    "register_default_targets",
    "register_weight_axis",
    "resolve",
]

_LAYER_TARGETS = ("_input_0", "weight", "bias", "_output_0")
_ACTIVATION_TARGETS = ("_input_0", "_output_0")

DEFAULT_TARGETS: dict[type[nn.Module], tuple[str, ...]] = {
    **dict.fromkeys(
        (
            nn.Linear,
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
            nn.BatchNorm1d,
            nn.BatchNorm2d,
        ),
        _LAYER_TARGETS,
    ),
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d), _ACTIVATION_TARGETS),
}
"""Targets used when an entry gives no ``target_names``, by module type (subclasses inherit them)."""


def register_default_targets(module_type: type[nn.Module], target_names: tuple[str, ...]) -> None:
    """Give ``module_type`` default targets, so config entries selecting it may omit ``target_names``.

    Where its weights hold their output channels on another dim than 0 (a weight stored ``(in, out)``), say so with
    :func:`register_weight_axis`, so that granularity ``'out_channel'`` splits that dim.
    """
    DEFAULT_TARGETS[module_type] = tuple(target_names)


WEIGHT_AXES: dict[type[nn.Module] | str, int] = {
    **dict.fromkeys((nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding), 0),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), 1),  # (in, out / groups, *kernel)
    "transformers.pytorch_utils.Conv1D": 1,  # GPT-2's layer: weight (in_features, out_features), y = x @ W + b
}
"""The output-channel axis of each module type's weights, which granularity ``'out_channel'`` splits; subclasses
inherit it, and types not listed use 0. A string key is a class's ``module.qualname``, matched by name, so
``transformers`` is not imported to recognise its ``Conv1D``."""


def register_weight_axis(module_type: type[nn.Module] | str, axis: int) -> None:
    """Say that ``module_type``'s weights hold their output channels on dim ``axis``, so that granularity
    ``'out_channel'`` gives them one scale per index of that dim (the scale's shape is the weight's with every other
    dim 1; ONNX export uses it as DequantizeLinear's ``axis``, and ``integer_bias`` pairs each output channel's bias
    with its scale). Subclasses inherit it.

    ``module_type`` is a module class, or the ``"package.module.QualName"`` of one, for a class whose package
    should not be imported for this. The axis applies to the module's parameters with more than one dim; a 1-D
    parameter (a bias, a norm's affine weight) has one entry per channel on dim 0. Defaults: 0 (Linear, Conv,
    Embedding and any other module), 1 (ConvTranspose, whose weight is ``(in, out / groups, *kernel)``, and
    ``transformers.pytorch_utils.Conv1D``, whose weight is ``(in_features, out_features)``).

    >>> class TransposedLinear(nn.Module):  # weight (in, out): y = x @ W + b
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight, self.bias = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.zeros(6))
    >>> register_weight_axis(TransposedLinear, 1)
    >>> out_channel_axis(TransposedLinear())
    1
    """
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"module_type must be a torch.nn.Module subclass or its dotted name, got {shown(module_type)}")
    if isinstance(module_type, str) and "." not in module_type:
        raise ValueError(f"a module type given by name is 'package.module.QualName', got {module_type!r}")
    if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
        raise ValueError(f"axis must be a non-negative int (a dim of the weight), got {shown(axis)}")
    WEIGHT_AXES[module_type] = axis


def out_channel_axis(module: nn.Module) -> int:
    """The output-channel axis of ``module``'s weights (see :data:`WEIGHT_AXES`): the first class of its MRO
    registered by type or by ``module.qualname``; 0 when none is."""
    for cls in float_type(module).__mro__:
        axis = WEIGHT_AXES.get(cls)
        if axis is None:
            axis = WEIGHT_AXES.get(f"{cls.__module__}.{cls.__qualname__}")
        if axis is not None:
            return axis
    return 0


class TargetKind(enum.Enum):
    PARAMETER = "parameter"
    INPUT = "input"
    OUTPUT = "output"


@dataclass(frozen=True)
class TargetPlan:
    """One target of one module.

    ``blocks`` is the resolved block layout of a parameter (``None``: per tensor); activations resolve theirs
    from the granularity on each batch. ``position``/``key`` locate an input (positional index and/or keyword)
    or an output (tuple index or dict key).
    """

    name: str
    kind: TargetKind
    settings: TargetSettings
    entry_index: int
    blocks: tuple[int, ...] | None = None
    position: int | None = None
    key: str | int | None = None


@dataclass(frozen=True)
class FusionPlan:
    """A fused chain starting at the planned module: the BatchNorm folded into it and/or the activation after it."""

    group: tuple[str, ...]
    bn: str | None
    activation: str | None


@dataclass(frozen=True)
class ModulePlan:
    name: str
    targets: tuple[TargetPlan, ...]
    fusion: FusionPlan | None = None


def resolve(
    model: nn.Module, entries: tuple[ConfigEntry, ...], selected_counts: dict[int, int] | None = None
) -> tuple[ModulePlan, ...]:
    """Match ``entries`` to ``model``'s modules; the first entry that claims a (module, target) wins.

    Selectors that name functional ops (see :mod:`quantrain.config.ops`) are left to :func:`~quantrain.config.ops.
    plan_op_targets`; ``selected_counts``, when given, receives how many modules each entry selected."""
    from quantrain.config.ops import entry_selects_ops

    modules = dict(model.named_modules())
    module_types = {float_type(m).__name__ for m in modules.values()}
    claimed: dict[str, dict[str, TargetPlan]] = {}
    for entry in entries:
        selected = _select(entry, modules)
        if selected_counts is not None:
            selected_counts[entry.index] = len(selected)
        if not selected and not entry_selects_ops(entry, module_types):
            warnings.warn(f"config_list[{entry.index}] selects no module of {type(model).__name__}", stacklevel=3)
        for name in selected:
            for plan in _targets(entry, name, modules[name]):
                earlier = claimed.setdefault(name, {}).get(plan.name)
                if earlier is not None:
                    warnings.warn(
                        f"config_list[{entry.index}]: module {name!r} target {plan.name!r} is already "
                        f"configured by config_list[{earlier.entry_index}]; the first entry wins",
                        stacklevel=3,
                    )
                    continue
                claimed[name][plan.name] = plan
        _check_fuse_names(entry, modules, selected)
    kind_order = {TargetKind.PARAMETER: 0, TargetKind.INPUT: 1, TargetKind.OUTPUT: 2}
    return tuple(
        ModulePlan(name, tuple(sorted(claimed[name].values(), key=lambda t: kind_order[t.kind])))
        for name in modules
        if claimed.get(name)
    )


def _select(entry: ConfigEntry, modules: dict[str, nn.Module]) -> list[str]:
    from quantrain.config.ops import KNOWN_OPS, is_op_name, is_op_type

    type_names = {name: _type_names(module, entry.include_subclasses) for name, module in modules.items()}
    module_types = set().union(*type_names.values())
    for key in ("op_names", "exclude_op_names"):
        for name in getattr(entry, key):
            if name not in modules and not is_op_name(name):
                raise entry.error(ValueError, key, f"no module named {name!r} in the model{_suggest(name, modules)}")
    for key in ("op_types", "exclude_op_types"):
        present = module_types | {t.__name__ for t in DEFAULT_TARGETS}
        for type_name in getattr(entry, key):
            if is_op_type(type_name, present):
                cased = [name for name in present | set(dir(nn)) if name.lower() == type_name.lower()]
                if cased and type_name not in KNOWN_OPS:  # 'linear' for 'Linear', not 'add' for quantrain.Add
                    raise entry.error(
                        ValueError,
                        key,
                        f"{type_name!r} is neither a module type in the model, a registered type, nor a torch.nn class "
                        f"(did you mean {cased[0]!r}? lower-case op_types name functional ops, such as 'add')",
                    )
                continue  # an op (checked against the graph by quantrain.config.ops)
            if type_name not in present and not isinstance(getattr(nn, type_name, None), type):
                raise entry.error(
                    ValueError,
                    key,
                    f"{type_name!r} is neither a module type in the model, a registered type, nor a torch.nn class"
                    f"{_suggest(type_name, present | set(dir(nn)))}",
                )
    by_name = entry.op_names or entry.op_names_re
    selected = []
    for name in modules:
        kinds = type_names[name]
        if by_name and not (name in entry.op_names or any(p.match(name) for p in entry.op_names_re)):
            continue
        if entry.op_types and kinds.isdisjoint(entry.op_types):
            continue
        if name in entry.exclude_op_names or not kinds.isdisjoint(entry.exclude_op_types):
            continue
        if any(p.match(name) for p in entry.exclude_op_names_re):
            continue
        selected.append(name)
    return selected


def _type_names(module: nn.Module, subclasses: bool) -> set[str]:
    """The class names an ``op_types`` entry matches ``module`` by: its class's, and with ``subclasses`` those of
    every module class it derives from (``nn.Module`` itself excepted)."""
    kind = float_type(module)
    if not subclasses:
        return {kind.__name__}
    return {cls.__name__ for cls in kind.__mro__ if issubclass(cls, nn.Module) and cls is not nn.Module}


def _targets(entry: ConfigEntry, name: str, module: nn.Module) -> list[TargetPlan]:
    explicit = entry.target_names is not None
    if explicit:
        names = entry.target_names
    else:
        names = _default_targets(float_type(module))
        if names is None:
            raise entry.error(
                ValueError,
                "target_names",
                f"module {name!r} ({type(module).__name__}) has no default targets; "
                "list them, e.g. 'target_names': ['weight', '_input_', '_output_']",
            )
        for target in entry.target_settings:
            if target not in names:
                raise entry.error(
                    ValueError,
                    "target_settings",
                    f"{target!r} is not a default target of module {name!r} "
                    f"({type(module).__name__}: {list(names)}); add target_names",
                )
    plans = []
    for target in names:
        settings = entry.settings_for(target)
        if target.startswith("_input_"):
            plans.append(_input_plan(entry, name, module, target, settings))
        elif target.startswith("_output_"):
            slot = _slot(target, "_output_")
            if slot != 0 and _returns_one_tensor(module):
                raise entry.error(
                    ValueError,
                    "target_names",
                    f"module {name!r} ({type(module).__name__}) returns a single tensor, so it has no {target!r}; use '_output_'",
                )
            plans.append(_activation_plan(entry, name, target, TargetKind.OUTPUT, settings, key=slot))
        else:
            param = module._parameters.get(target)
            if param is None:
                if not explicit and target in module._parameters:
                    continue  # a template target the module does not use, e.g. bias=False
                raise entry.error(
                    ValueError,
                    "target_names",
                    f"module {name!r} ({type(module).__name__}) has no parameter "
                    f"{target!r}; it has {sorted(k for k, v in module._parameters.items() if v is not None)}",
                )
            plans.append(_parameter_plan(entry, name, module, target, param, settings))
    return plans


def float_type(module: nn.Module) -> type[nn.Module]:
    """The module's class as the user wrote it (a module quantized in place reports its original class)."""
    return getattr(type(module), "_float_class", type(module))


def _default_targets(module_type: type) -> tuple[str, ...] | None:
    for cls in module_type.__mro__:
        if cls in DEFAULT_TARGETS:
            return DEFAULT_TARGETS[cls]
    return None


def _setting_key(entry: ConfigEntry, target: str, key: str) -> str:
    return f"target_settings[{target!r}].{key}" if target in entry.target_settings else key


def _parameter_plan(
    entry: ConfigEntry, name: str, module: nn.Module, target: str, param: torch.Tensor, settings: TargetSettings
) -> TargetPlan:
    axis = out_channel_axis(module) if param.dim() > 1 else 0
    try:
        if settings.granularity.kind is GranularityKind.OUT_CHANNEL and axis == 1 and _grouped_transpose(module):
            raise ValueError(
                f"with groups={module.groups}, {type(module).__name__} holds its output channels on dims 0 and 1 of "
                f"its weight (shape {tuple(param.shape)}), which one axis of scales cannot follow; use 'default', "
                f"or a block granularity such as {[1] + [-1] * (param.dim() - 1)} (one scale per index of dim 0)"
            )
        blocks = settings.granularity.block_shape(tuple(param.shape), activation=False, out_axis=axis)
    except ValueError as exc:
        raise entry.error(
            ValueError,
            _setting_key(entry, target, "granularity"),
            f"{settings.granularity.spec!r} does not fit {name}.{target}: {exc}",
        ) from None
    if not param.is_floating_point():
        raise entry.error(
            TypeError, "target_names", f"{name}.{target} is {param.dtype}, only floating-point tensors are quantized"
        )
    return TargetPlan(target, TargetKind.PARAMETER, settings, entry.index, blocks=blocks)


def _grouped_transpose(module: nn.Module) -> bool:
    return isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and module.groups != 1


def _activation_plan(
    entry: ConfigEntry,
    name: str,
    target: str,
    kind: TargetKind,
    settings: TargetSettings,
    position: int | None = None,
    key: str | int | None = None,
) -> TargetPlan:
    try:
        settings.granularity.check_activation()
    except ValueError as exc:
        raise entry.error(
            ValueError, _setting_key(entry, target, "granularity"), f"module {name!r} target {target!r}: {exc}"
        ) from None
    return TargetPlan(target, kind, settings, entry.index, position=position, key=key)


def _returns_one_tensor(module: nn.Module) -> bool:
    """Whether ``module`` is known to return a single tensor: a torch.nn forward annotated ``-> Tensor`` (a user's
    annotation is not trusted: only its real output tells, at the first forward)."""
    forward = float_type(module).forward
    if not getattr(forward, "__module__", "").startswith("torch.nn."):
        return False
    try:
        annotation = inspect.signature(forward).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is torch.Tensor or annotation in ("Tensor", "torch.Tensor")


def _slot(target: str, prefix: str) -> str | int:
    rest = target[len(prefix) :]
    return int(rest) if rest.isdigit() else rest


def _input_plan(entry: ConfigEntry, name: str, module: nn.Module, target: str, settings: TargetSettings) -> TargetPlan:
    try:
        position, keyword = _locate_input(module, _slot(target, "_input_"))
    except ValueError as exc:
        raise entry.error(ValueError, "target_names", f"module {name!r} ({type(module).__name__}): {exc}") from None
    return _activation_plan(entry, name, target, TargetKind.INPUT, settings, position, keyword)


def _locate_input(module: nn.Module, slot: str | int) -> tuple[int | None, str | None]:
    """Where input ``slot`` (a position or an argument name) arrives in ``module.forward``: (position, keyword)."""
    try:
        params = list(inspect.signature(float_type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no Python signature: take positions and names as they come
        return (slot, None) if isinstance(slot, int) else (None, slot)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kinds = {p.kind for p in params}
    if isinstance(slot, int):
        if slot < len(positional):
            param = positional[slot]
            return slot, (None if param.kind is param.POSITIONAL_ONLY else param.name)
        if inspect.Parameter.VAR_POSITIONAL in kinds:
            return slot, None
        names = ", ".join(p.name for p in positional)
        raise ValueError(f"forward takes {len(positional)} positional input(s) ({names}), so it has no '_input_{slot}'")
    for param in params:
        if param.name == slot and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            return (positional.index(param) if param in positional else None), slot
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return None, slot
    raise ValueError(f"forward has no argument {slot!r}; its arguments are {[p.name for p in params]}")


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _check_fuse_names(entry: ConfigEntry, modules: dict[str, nn.Module], selected: list[str]) -> None:
    for group in entry.fuse_names:
        for name in group:
            if name not in modules:
                raise entry.error(
                    ValueError, "fuse_names", f"{group}: no module named {name!r} in the model{_suggest(name, modules)}"
                )
        if group[0] not in selected:
            raise entry.error(ValueError, "fuse_names", f"{group}: {group[0]!r} must be one of the modules this entry selects")
        if not _is_fusable(tuple(modules[n] for n in group)):
            kinds = tuple(type(modules[n]).__name__ for n in group)
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group} is {kinds}; supported patterns are (Conv/Linear, "
                "BatchNorm[, ReLU/ReLU6]), (Conv/Linear, ReLU/ReLU6) and (BatchNorm, ReLU/ReLU6)",
            )
        if isinstance(modules[group[-1]], _ACTIVATIONS):
            targets = entry.target_names or _default_targets(type(modules[group[0]])) or ()
            if "_output_0" not in targets:
                raise entry.error(ValueError, "fuse_names", f"{group} fuses an activation, which needs '_output_' in the targets")


def _is_fusable(chain: tuple[nn.Module, ...]) -> bool:
    first, rest = chain[0], chain[1:]
    if isinstance(first, _FOLDABLE):
        if len(rest) == 1:
            return isinstance(rest[0], _NORMS + _ACTIVATIONS)
        return isinstance(rest[0], _NORMS) and isinstance(rest[1], _ACTIVATIONS)
    return isinstance(first, _NORMS) and len(rest) == 1 and isinstance(rest[0], _ACTIVATIONS)


def _suggest(name: str, choices) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
