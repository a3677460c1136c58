"""What ``quantrain parity`` reads: the inputs (``--data``), the model factory (``--model``), the quantized model
rebuilt from the quantizer spec (``--config``) and its checkpoint (``--checkpoint``), each checked with an error
naming the option and the file."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from quantrain.cli.common import CliError, existing_file, first_line, one_line

__all__ = ["check_onnx", "load_checkpoint", "load_inputs", "quantized_model"]


def load_inputs(path: str | os.PathLike) -> tuple[torch.Tensor, ...]:
    """The model inputs in ``path``: ``.pt`` (a tensor, a list/tuple of tensors, or a dict with key ``'x'`` or
    ``'inputs'``; loaded weights-only), ``.npy``, or ``.npz`` (key ``'x'`` or ``'inputs'``, or its only array).
    float64 becomes float32. Raises :class:`CliError` (exit code 4) when the file is missing or not like that."""
    path = existing_file(os.fspath(path), "--data")
    suffix = os.path.splitext(path)[1].lower()
    value = _load_numpy(path) if suffix in (".npy", ".npz") else _torch_load(path, "--data", "tensors")
    if isinstance(value, Mapping):
        key = next((k for k in ("x", "inputs") if k in value), None)
        if key is None:
            raise CliError(f"--data {path}: a dict of inputs needs key 'x' or 'inputs', found {sorted(map(str, value))}")
        value = value[key]
    tensors = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
        raise CliError(f"--data {path}: expected a tensor (or tensors) with a batch dimension")
    if len({len(t) for t in tensors}) != 1 or len(tensors[0]) == 0:
        raise CliError(f"--data {path}: the inputs must have the same, non-zero batch size")
    return tuple(t.float() if t.dtype == torch.float64 else t for t in tensors)


def _torch_load(path: str, flag: str, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file it refuses is a :class:`CliError` (exit code 4)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CliError(
            f"{flag} {path}: holds Python objects besides tensors, which a weights-only load refuses; save {expected} "
            "(torch.save) instead of objects that need unpickling"
        ) from None
    except Exception as exc:  # zip and torch errors alike: the file is not what we need
        raise CliError(f"{flag} {path}: not {expected} saved with torch.save ({first_line(exc)})") from None


def check_onnx(path: str) -> None:
    """Fail early (before any work) when ``path`` is not a valid ONNX model."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(path))
    except Exception as exc:  # protobuf and checker errors alike
        raise CliError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None


def _load_numpy(path: str) -> Any:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CliError(f"--data {path}: not a NumPy file ({first_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        return torch.from_numpy(loaded)
    with loaded:
        names = list(loaded.files)
        key = next((k for k in ("x", "inputs") if k in names), names[0] if len(names) == 1 else None)
        if key is None:
            raise CliError(f"--data {path}: an .npz needs key 'x' or 'inputs' (or a single array), found {names}")
        return torch.from_numpy(loaded[key])


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Import from the current folder first, as ``python -m`` does (the console script's path lacks it)."""
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path[:] = saved


def _load_factory(spec: str) -> Callable[[], Any]:
    """``'package.module:factory'`` or ``'path/to/file.py:factory'`` (``factory`` may be dotted, e.g.
    ``Model.build``) -> the callable. Raises :class:`CliError` (exit code 4) naming what is missing."""
    module_name, colon, attribute = spec.rpartition(":")
    if not colon or not module_name or not attribute:
        raise CliError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mymodels:build or models.py:build")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise CliError(f"--model {spec!r}: {module_name}: no such file")
            name = "_quantrain_model_" + os.path.splitext(os.path.basename(module_name))[0]
            loader = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            with _cwd_on_path():
                module = importlib.import_module(module_name)
    except CliError:
        raise
    except Exception as exc:  # the user's module: any error in it is a bad input, not ours
        raise CliError(f"--model {spec!r}: cannot import {module_name} ({first_line(exc)})") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CliError(f"--model {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CliError(f"--model {spec!r}: {attribute} is not callable")
    return target


def quantized_model(
    spec: str, config_list: list[dict[str, Any]], options: dict[str, Any], config_path: str, example_inputs: Any = None
) -> Any:
    """The model from the factory ``spec``, quantized by the spec's config_list and options; ``example_inputs``
    (the first inputs of ``--data``) are what quantrain captures the model's graph from."""
    from torch import nn

    from quantrain.qat import QATQuantizer

    factory = _load_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise CliError(f"--model {spec!r}: {spec.rpartition(':')[2]}() raised {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    from quantrain.graph import CaptureError

    try:
        QATQuantizer(model, config_list, **options, example_inputs=example_inputs)
    except CaptureError as exc:
        raise CliError(f"--data: the model's graph could not be captured from the first input: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CliError(f"--config {config_path}: does not fit the model from {spec}: {exc}") from None
    return model


COUNTERS = (".nonfinite_batches",)  # statistics, not calibration: a checkpoint from before they existed still fits


def load_checkpoint(model: Any, path: str) -> None:
    """Load ``model.state_dict()`` saved after QAT; every key must match (quantrain alone would accept a float
    checkpoint and keep the model's uncalibrated quantizers, which is not what parity should compare)."""
    from quantrain.base import is_quantrain_key

    state = _torch_load(path, "--checkpoint", "a state_dict")
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"--checkpoint {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    expected = set(model.state_dict())
    missing = [key for key in model.state_dict() if key not in state and not key.endswith(COUNTERS)]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        problems = [f"{label} {_some(keys)}" for label, keys in (("lacks", missing), ("has unexpected keys", unexpected)) if keys]
        float_checkpoint = bool(missing) and all(is_quantrain_key(key) for key in missing)
        hint = "it looks like a float checkpoint; " if float_checkpoint else ""
        raise CliError(
            f"--checkpoint {path}: does not fit the quantized model: it {' and '.join(problems)}; {hint}it should be "
            "model.state_dict() saved after QAT, quantized with the same config_list and options"
        )
    try:
        model.load_state_dict(state, strict=False)  # every key was checked above
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. a tensor of another shape
        raise CliError(f"--checkpoint {path}: does not fit the quantized model: {one_line(exc)}") from None


def _some(keys: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(repr(key) for key in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
