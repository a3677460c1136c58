"""Parse and validate a ``config_list`` (NNI 3.0's schema) into frozen :class:`ConfigEntry` objects.

Parsing reads only the config; checks that need the model live in :mod:`quantrain.config.resolve`.
Every error is a ``ValueError`` or ``TypeError`` whose message starts with ``config_list[i]`` and names the key.

>>> entries = parse_config_list([{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int4"}])
>>> entries[0].settings_for("weight").dtype.name
'int4'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from quantrain.config.settings import APPLY_METHODS, Granularity, QuantDtype, QuantScheme, TargetSettings, shown

__all__ = ["ConfigEntry", "parse_config_list", "canonical_target_name"]

SELECTION_KEYS = ("op_types", "op_names", "op_names_re")
EXCLUSION_KEYS = ("exclude_op_types", "exclude_op_names", "exclude_op_names_re")
SETTING_KEYS = ("quant_dtype", "quant_scheme", "granularity", "apply_method", "quant_bits")
ENTRY_KEYS = (
    *SELECTION_KEYS,
    *EXCLUSION_KEYS,
    "include_subclasses",
    "target_names",
    "target_settings",
    "fuse_names",
    *SETTING_KEYS,
)
MAX_SLOT_DIGITS = 9
"""``_input_N`` / ``_output_N``: N has at most this many digits."""


class _EntryError(Exception):
    """Internal: carries the exception type, key and message until the entry index is attached."""

    def __init__(self, exc_type: type[Exception], key: str, message: str) -> None:
        super().__init__(message)
        self.exc_type, self.key, self.message = exc_type, key, message


@dataclass(frozen=True, kw_only=True)
class ConfigEntry:
    """One validated entry of a config_list.

    ``settings`` holds the top-level shortcut settings; ``target_settings`` the per-target ones, each already
    merged over the shortcuts (a key given for a target wins over the same key at the top level).
    """

    index: int
    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    op_names_re: tuple[re.Pattern[str], ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    exclude_op_names_re: tuple[re.Pattern[str], ...] = ()
    include_subclasses: bool = False
    """Whether ``op_types``/``exclude_op_types`` also match subclasses of the named classes (a class whose MRO has
    a class of that name: Hugging Face's ``ConvNextLayerNorm(nn.LayerNorm)`` is then a ``"LayerNorm"``)."""
    target_names: tuple[str, ...] | None = None
    settings: TargetSettings = field(default_factory=TargetSettings)
    target_settings: Mapping[str, TargetSettings] = field(default_factory=lambda: MappingProxyType({}))
    fuse_names: tuple[tuple[str, ...], ...] = ()

    def settings_for(self, target: str) -> TargetSettings:
        return self.target_settings.get(target, self.settings)

    def error(self, exc_type: type[Exception], key: str, message: str) -> Exception:
        """An exception of ``exc_type`` whose message names this entry and ``key``."""
        return exc_type(f"config_list[{self.index}]: key {key!r}: {message}")


def canonical_target_name(name: str) -> str:
    """``_input_`` is ``_input_0`` and ``_output_`` is ``_output_0``; other names are kept."""
    if name == "_input_":
        return "_input_0"
    if name == "_output_":
        return "_output_0"
    return name


def parse_config_list(config_list: object) -> tuple[ConfigEntry, ...]:
    """Validate ``config_list`` and return its entries; nothing about the model is checked here."""
    if not isinstance(config_list, (list, tuple)):
        raise TypeError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    entries = []
    for index, raw in enumerate(config_list):
        try:
            entries.append(_parse_entry(index, raw))
        except _EntryError as exc:
            raise exc.exc_type(f"config_list[{index}]: key {exc.key!r}: {exc.message}") from None
    return tuple(entries)


def _parse_entry(index: int, raw: object) -> ConfigEntry:
    if not isinstance(raw, Mapping):
        raise TypeError(f"config_list[{index}] must be a dict, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str) or key not in ENTRY_KEYS:
            text = _key_text(key)
            hint = _closest(text, ENTRY_KEYS)
            raise _EntryError(ValueError, text, f"unknown key{hint}; allowed keys are {', '.join(ENTRY_KEYS)}")
    if not any(_given(raw.get(key)) for key in SELECTION_KEYS):
        raise _EntryError(ValueError, "op_types", "each entry needs at least one non-empty op_types, op_names or op_names_re")
    fields: dict[str, Any] = {}
    for key in ("op_types", "op_names", "exclude_op_types", "exclude_op_names"):
        fields[key] = _string_list(raw, key)
    for key in ("op_names_re", "exclude_op_names_re"):
        fields[key] = tuple(_compile(key, pattern) for pattern in _string_list(raw, key))
    subclasses = raw.get("include_subclasses", False)
    if not isinstance(subclasses, bool):
        raise _EntryError(TypeError, "include_subclasses", f"must be True or False, got {shown(subclasses)}")
    fields["include_subclasses"] = subclasses
    top_level = {key: raw[key] for key in SETTING_KEYS if key in raw}
    settings = _parse_settings(top_level, "")
    fields["target_names"] = _parse_target_names(raw)
    fields["target_settings"] = MappingProxyType(_parse_target_settings(raw, top_level, fields["target_names"]))
    fields["fuse_names"] = _parse_fuse_names(raw)
    return ConfigEntry(index=index, settings=settings, **fields)


def _key_text(key: object) -> str:
    """A dict key as messages show it: ``str(key)``, or shortened where that fails (a huge int); never raises."""
    if isinstance(key, str):
        return key
    try:
        return str(key)
    except Exception:  # ValueError: int_max_str_digits, or anything a __str__ raises
        return shown(key)


def _given(value: object) -> bool:
    """Whether a selection key has a non-empty value (a value without a truth value counts: its type is reported)."""
    if value is None:
        return False
    try:
        return bool(value)
    except Exception:  # e.g. an array or tensor of several elements; _string_list then names its type
        return True


def _string_list(raw: Mapping, key: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _EntryError(TypeError, key, f"must be a list of strings, e.g. [{shown(value)}], got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise _EntryError(TypeError, key, f"must contain only strings, got {shown(item)} ({type(item).__name__})")
    return tuple(value)


def _compile(key: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # OverflowError: a{99999999999}; RecursionError: deep nesting
        raise _EntryError(ValueError, key, f"invalid regular expression {pattern!r}: {exc}") from None


def _parse_settings(raw: Mapping, where: str) -> TargetSettings:
    """Build TargetSettings from the setting keys of ``raw``; ``where`` prefixes the key in errors."""
    if "quant_bits" in raw and raw.get("quant_dtype") is not None:
        raise _EntryError(ValueError, f"{where}quant_bits", "give either quant_dtype or the legacy quant_bits, not both")
    dtype_value = raw.get("quant_dtype")
    if raw.get("quant_bits") is not None:
        bits = raw["quant_bits"]
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise _EntryError(TypeError, f"{where}quant_bits", f"must be an int, got {type(bits).__name__}")
        if bits.bit_length() > 64:
            raise _EntryError(ValueError, f"{where}quant_bits", f"must be between 2 and 8, got {shown(bits)}")
        dtype_value = f"int{bits}"
    kwargs: dict[str, Any] = {}
    parsers = (
        ("quant_dtype", "dtype", QuantDtype.parse, dtype_value),
        ("quant_scheme", "scheme", QuantScheme.parse, raw.get("quant_scheme")),
        ("granularity", "granularity", Granularity.parse, raw.get("granularity")),
    )
    for key, attribute, parser, value in parsers:
        try:
            kwargs[attribute] = parser(value)
        except (TypeError, ValueError) as exc:
            named = "quant_bits" if key == "quant_dtype" and raw.get("quant_bits") is not None else key
            raise _EntryError(type(exc), f"{where}{named}", str(exc)) from None
    apply_method = raw.get("apply_method")
    if apply_method is not None and (not isinstance(apply_method, str) or apply_method not in APPLY_METHODS):
        raise _EntryError(
            ValueError, f"{where}apply_method", f"unknown apply_method {shown(apply_method)}; use one of {APPLY_METHODS}"
        )
    return TargetSettings(apply_method=apply_method, **kwargs)


def _check_target_name(key: str, name: object) -> str:
    if not isinstance(name, str):
        raise _EntryError(TypeError, key, f"target names are strings, got {shown(name)} ({type(name).__name__})")
    for prefix in ("_input_", "_output_"):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            digits = rest.isascii() and rest.isdigit()  # str.isdigit() also accepts '²', which int() rejects
            if rest and not (digits or rest.isidentifier()):
                raise _EntryError(ValueError, key, f"{name!r}: write {prefix}N for position N or {prefix}<name>")
            if digits and len(rest) > MAX_SLOT_DIGITS:
                raise _EntryError(ValueError, key, f"{name!r}: the position N has more than {MAX_SLOT_DIGITS} digits")
            return canonical_target_name(name)
    if not name.isidentifier():
        raise _EntryError(ValueError, key, f"{name!r} is neither a parameter name nor _input_*/_output_*")
    return name


def _parse_target_names(raw: Mapping) -> tuple[str, ...] | None:
    value = raw.get("target_names")
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _EntryError(TypeError, "target_names", f"must be a list of strings, e.g. ['weight'], got {type(value).__name__}")
    if not value:
        raise _EntryError(ValueError, "target_names", "is empty; omit it to use the module type's default targets")
    names = tuple(dict.fromkeys(_check_target_name("target_names", name) for name in value))
    return names


def _parse_target_settings(raw: Mapping, top_level: Mapping, target_names: tuple[str, ...] | None) -> dict[str, TargetSettings]:
    value = raw.get("target_settings")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _EntryError(TypeError, "target_settings", f"must be a dict {{target_name: settings}}, got {type(value).__name__}")
    result = {}
    for name, settings in value.items():
        target = _check_target_name("target_settings", name)
        where = f"target_settings[{name!r}]."
        if target_names is not None and target not in target_names:
            raise _EntryError(ValueError, "target_settings", f"{name!r} is not one of target_names {list(target_names)}")
        if not isinstance(settings, Mapping):
            raise _EntryError(
                TypeError, f"target_settings[{name!r}]", f"must be a dict of settings, got {type(settings).__name__}"
            )
        for key in settings:
            if not isinstance(key, str) or key not in SETTING_KEYS:
                text = _key_text(key)
                raise _EntryError(
                    ValueError,
                    f"{where}{text}",
                    f"unknown setting{_closest(text, SETTING_KEYS)}; allowed: {', '.join(SETTING_KEYS)}",
                )
        merged = {**top_level, **settings}
        if "quant_dtype" in settings and "quant_bits" not in settings:
            merged.pop("quant_bits", None)
        if "quant_bits" in settings and "quant_dtype" not in settings:
            merged.pop("quant_dtype", None)
        result[target] = _parse_settings(merged, where)
    return result


def _parse_fuse_names(raw: Mapping) -> tuple[tuple[str, ...], ...]:
    value = raw.get("fuse_names")
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _EntryError(
            TypeError,
            "fuse_names",
            f"must be a list of tuples of module names, e.g. [('conv1', 'bn1')], got {type(value).__name__}",
        )
    groups = []
    for group in value:
        if isinstance(group, str) or not isinstance(group, (list, tuple)) or not all(isinstance(n, str) for n in group):
            raise _EntryError(TypeError, "fuse_names", f"each item must be a tuple of module names, got {shown(group)}")
        if not 2 <= len(group) <= 3:
            raise _EntryError(
                ValueError,
                "fuse_names",
                f"{tuple(group)} must name 2 or 3 modules: (conv/linear, bn[, activation]) or (module, activation)",
            )
        groups.append(tuple(group))
    return tuple(groups)


def _closest(key: object, choices: tuple[str, ...]) -> str:
    import difflib

    match = difflib.get_close_matches(str(key), choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
