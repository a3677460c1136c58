"""calibration_config: what training produced, in the reference's shape, and its JSON form.

``{module_name: {target_name: {'scale', 'zero_point', 'quant_dtype', 'quant_scheme', 'quant_bits',
'tracked_min', 'tracked_max'}}}``, with CPU float32 tensors (0-dim per tensor, keepdim-shaped per channel/block).

In JSON every tensor is written as nested lists (a plain number when 0-dim), so a float32 value round-trips
exactly and a file written from another tool's tensors (``tensor.tolist()``) loads too. Loading never unpickles.
Saving is atomic (a temporary file renamed over the target), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from quantrain.checkpoint import atomic_write
from quantrain.config.settings import QuantDtype, QuantScheme

__all__ = ["TENSOR_KEYS", "load_calibration_config", "save_calibration_config"]

TENSOR_KEYS = ("scale", "zero_point", "tracked_min", "tracked_max")
FORMAT = "quantrain.calibration_config"
VERSION = 1

CalibrationConfig = dict[str, dict[str, dict[str, Any]]]


def save_calibration_config(config: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | os.PathLike) -> None:
    """Write ``config`` (as returned by ``get_calibration_config()``) to ``path`` as JSON."""
    modules = {
        module: {
            target: {key: (value.tolist() if isinstance(value, torch.Tensor) else value) for key, value in entry.items()}
            for target, entry in targets.items()
        }
        for module, targets in config.items()
    }
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "version": VERSION, "modules": modules}, f, indent=1)


def load_calibration_config(path: str | os.PathLike) -> CalibrationConfig:
    """Read a calibration_config written by :func:`save_calibration_config` (or a bare ``{module: ...}`` dict).

    Raises ``ValueError`` naming the file and the offending entry when the file is not a valid calibration config.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file, so not a JSON calibration_config ({exc})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported calibration_config version {data.get('version')!r}")
        data = data.get("modules")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{module_name: {{target_name: {{...}}}}}}")
    return {module: _load_targets(path, module, targets) for module, targets in data.items()}


def _load_targets(path, module: str, targets: object) -> dict[str, dict[str, Any]]:
    if not isinstance(targets, dict):
        raise ValueError(f"{path}: [{module!r}] must be an object of targets, got {type(targets).__name__}")
    return {target: _load_entry(f"{path}: [{module!r}][{target!r}]", entry) for target, entry in targets.items()}


def _load_entry(where: str, entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    missing = [key for key in ("scale", "zero_point") if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    result: dict[str, Any] = dict(entry)
    for key in TENSOR_KEYS:
        if key in entry:
            result[key] = _tensor(f"{where}[{key!r}]", entry[key])
    if result["scale"].shape != result["zero_point"].shape:
        raise ValueError(
            f"{where}: scale has shape {tuple(result['scale'].shape)} but zero_point {tuple(result['zero_point'].shape)}"
        )
    if (result["scale"] <= 0).any():
        raise ValueError(f"{where}: scale must be positive")
    _check_range(where, result.get("tracked_min"), result.get("tracked_max"))
    try:
        if "quant_dtype" in entry:
            dtype = QuantDtype.parse(entry["quant_dtype"])
            result["quant_dtype"] = dtype.name
            result.setdefault("quant_bits", dtype.bits)
        if "quant_scheme" in entry:
            result["quant_scheme"] = QuantScheme.parse(entry["quant_scheme"]).value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return result


def _check_range(where: str, tracked_min: torch.Tensor | None, tracked_max: torch.Tensor | None) -> None:
    """A tracked range, when both ends are given, has as many values at each end and none with min > max."""
    if tracked_min is None or tracked_max is None:
        return
    if tracked_min.numel() != tracked_max.numel():
        raise ValueError(f"{where}: tracked_min has {tracked_min.numel()} values but tracked_max {tracked_max.numel()}")
    if (tracked_min.reshape(-1) > tracked_max.reshape(-1)).any():
        raise ValueError(f"{where}: tracked_min is greater than tracked_max")


def _tensor(where: str, value: object) -> torch.Tensor:
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: not a number or nested list of numbers ({exc})") from None
    if not all(math.isfinite(v) for v in tensor.flatten().tolist()):
        raise ValueError(f"{where}: contains NaN or infinity")
    return tensor
