"""Quantizer specs: a config_list and QATQuantizer options as JSON, so a quantized model can be rebuilt elsewhere
(``quantrain parity --config``).

A spec is a JSON object (:func:`save_quantizer_spec` writes it, :func:`load_quantizer_spec` reads it)::

    {"format": "quantrain.quantizer_spec", "version": 1,
     "config_list": [...],                        # the config_list given to QATQuantizer
     "quantizer": {"fuse": "auto", "integer_bias": true, "quant_start_step": 0, "activation_start_step": null,
                   "freeze_bn_step": null, "freeze_range_step": null, "weight_range": "ema"}}

``format`` and ``version`` may be left out of a hand-written file, and so may ``quantizer`` or any of its keys
(QATQuantizer's defaults apply). Any other key is an error naming it.

>>> import json, pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "quant.json"
>>> save_quantizer_spec(path, [{"op_types": ["Linear"], "target_names": ["weight"]}], fuse="auto", integer_bias=True)
>>> json.loads(path.read_text())["quantizer"]
{'fuse': 'auto', 'integer_bias': True}
>>> load_quantizer_spec(path)[1]
{'fuse': 'auto', 'integer_bias': True}
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["QUANTIZER_OPTIONS", "load_quantizer_spec", "save_quantizer_spec"]

SPEC_FORMAT = "quantrain.quantizer_spec"
SPEC_VERSION = 1
SPEC_KEYS = ("format", "version", "config_list", "quantizer")
SCHEDULE_OPTIONS = ("quant_start_step", "activation_start_step", "freeze_bn_step", "freeze_range_step")
QUANTIZER_OPTIONS = ("fuse", "integer_bias", *SCHEDULE_OPTIONS, "weight_range")
"""The QATQuantizer keyword arguments a spec may set."""


def save_quantizer_spec(
    path: str | os.PathLike, config_list: list[dict[str, Any]], quantizer: Any = None, **options: Any
) -> None:
    """Write the quantizer spec that ``quantrain parity --config`` reads (format in the module docstring).

    ``options`` are QATQuantizer keyword arguments (:data:`QUANTIZER_OPTIONS`); with ``quantizer`` (a quantrain
    quantizer) its fuse, integer_bias, schedule and weight range are taken from it, and ``options`` override them.
    Raises ``ValueError``/``TypeError`` for what :func:`load_quantizer_spec` would reject.
    """
    merged = {**_options_of(quantizer), **options} if quantizer is not None else dict(options)
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "config_list": config_list, "quantizer": merged}
    try:
        text = json.dumps(spec, indent=1)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the config_list or options cannot be written as JSON: {exc}") from None
    _check_spec(json.loads(text), "quantizer spec")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _options_of(quantizer: Any) -> dict[str, Any]:
    """The spec options of a quantizer object (QATQuantizer: all of them; others: fuse and integer_bias)."""
    options = {"fuse": getattr(quantizer, "fuse", None), "integer_bias": bool(getattr(quantizer, "integer_bias", False))}
    schedule = getattr(quantizer, "schedule", None)
    if schedule is not None:
        options |= {name: getattr(schedule, name) for name in SCHEDULE_OPTIONS}
        options["weight_range"] = getattr(quantizer, "weight_range", "ema")
    return options


def load_quantizer_spec(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a quantizer spec; returns ``(config_list, quantizer_options)``.

    Raises ``ValueError`` naming the file and the offending key when it is not a valid spec.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return _check_spec(data, os.fspath(path))


def _check_spec(data: Any, where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from quantrain.config.parse import parse_config_list

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with keys 'config_list' and 'quantizer'")
    unknown = [key for key in data if key not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(SPEC_KEYS)}")
    if "format" in data and data["format"] != SPEC_FORMAT:
        raise ValueError(f"{where}: key 'format' must be {SPEC_FORMAT!r}, got {data['format']!r}")
    if "version" in data and data["version"] != SPEC_VERSION:
        raise ValueError(f"{where}: key 'version': unsupported version {data['version']!r} (this quantrain reads 1)")
    if "config_list" not in data:
        raise ValueError(f"{where}: key 'config_list' is missing")
    try:
        parse_config_list(data["config_list"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: key 'config_list': {exc}") from None
    options = data.get("quantizer", {})
    if not isinstance(options, dict):
        raise ValueError(f"{where}: key 'quantizer' must be an object of QATQuantizer options, got {type(options).__name__}")
    for key, value in options.items():
        problem = _option_problem(key, value)
        if problem:
            raise ValueError(f"{where}: key 'quantizer.{key}': {problem}")
    return data["config_list"], dict(options)


def _option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not valid for the QATQuantizer option ``key`` (``None`` when it is)."""
    if key not in QUANTIZER_OPTIONS:
        return f"unknown option; allowed options are {', '.join(QUANTIZER_OPTIONS)}"
    if key == "fuse" and value not in (None, "auto"):
        return f"must be null or 'auto', got {value!r}"
    if key == "integer_bias" and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    if key == "weight_range" and value not in ("ema", "minmax"):
        return f"must be 'ema' or 'minmax', got {value!r}"
    if key in SCHEDULE_OPTIONS:
        nullable = key != "quant_start_step"
        if (value is None and not nullable) or (value is not None and (type(value) is not int or value < 0)):
            return f"must be a non-negative integer{' or null' if nullable else ''}, got {value!r}"
    return None
