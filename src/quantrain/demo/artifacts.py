"""What the demo leaves in its output folder, and the commands that work on it.

``{dataset}_int8.onnx`` and ``{dataset}_fp32.onnx`` (the QAT model as QDQ ONNX, the float control), and:

* ``calibration.json``: the calibration config (:func:`quantrain.save_calibration_config`), ``quantrain inspect``;
* ``checkpoint.pt``: ``model.state_dict()`` of the quantized model after QAT, ``quantrain parity --checkpoint``;
* ``quant.json``: the quantizer spec (:func:`quantrain.spec.save_quantizer_spec`), ``quantrain parity --config``;
* ``test_inputs.npy``: up to 1,000 test images, ``quantrain parity --data``;
* ``report.html`` with its plots (:mod:`quantrain.report`), when matplotlib is installed.

The float model comes from :data:`quantrain.demo.model.MODEL_FACTORIES` (``quantrain parity --model``). Files of an
earlier run in the same folder are replaced. :func:`prepare_folder` checks the folder before any work is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from quantrain.calibration import FORMAT as CALIBRATION_FORMAT
from quantrain.calibration import VERSION as CALIBRATION_VERSION
from quantrain.calibration import save_calibration_config
from quantrain.checkpoint import atomic_write
from quantrain.demo.model import MODEL_FACTORIES, demo_config_list
from quantrain.spec import save_quantizer_spec

__all__ = [
    "DEFAULT_OUT",
    "RESULTS_FORMAT",
    "Artifacts",
    "check_file_path",
    "prepare_folder",
    "results_dict",
    "write_model_files",
    "write_results_json",
]

DEFAULT_OUT = "quantrain-demo"
RESULTS_FORMAT = "quantrain.demo_results"
RESULTS_VERSION = 1
PARITY_INPUTS = 1000  # test images saved for `quantrain parity --data`
MIN_AGREEMENT = 0.99  # the threshold in the printed parity command (the demo's int8 model agrees on ~100%)


@dataclass(frozen=True)
class Artifacts:
    """The paths the demo wrote (as given: relative to the working directory when ``folder`` is)."""

    folder: str
    dataset: str
    calibration: str
    checkpoint: str
    spec: str
    inputs: str
    inputs_count: int
    int8_onnx: str | None = None
    fp32_onnx: str | None = None
    report: str | None = None

    @property
    def model_factory(self) -> str:
        return MODEL_FACTORIES[self.dataset]

    def commands(self) -> list[list[str]]:
        """``quantrain`` command lines (argv lists) that work on these files: inspect, then parity."""
        commands = [["quantrain", "inspect", path] for path in (self.int8_onnx, self.calibration) if path is not None]
        if self.int8_onnx is not None:
            files = ["--checkpoint", self.checkpoint, "--config", self.spec, "--data", self.inputs]
            check = ["--min-agreement", f"{MIN_AGREEMENT:g}"]
            commands.append(["quantrain", "parity", self.int8_onnx, "--model", self.model_factory, *files, *check])
        return commands

    def listing(self, results_json: str | None = None) -> list[tuple[str, str]]:
        """``(what, path)`` for each file written, in the order the printed list shows them."""
        rows = [
            ("int8 model, QDQ ONNX", self.int8_onnx),
            ("float control, fp32 ONNX", self.fp32_onnx),
            ("calibration config", self.calibration),
            ("checkpoint (state_dict after QAT)", self.checkpoint),
            ("quantizer spec", self.spec),
            (f"test inputs ({self.inputs_count} images)", self.inputs),
            ("report", self.report),
            ("results and calibration config", results_json),
        ]
        return [(what, path) for what, path in rows if path is not None]


def prepare_folder(path: str | os.PathLike, name: str = "out_dir", hint: str = "give a folder (created if missing)") -> str:
    """Create the folder ``path`` (with its parents) unless it exists and check that a file can be written in it.

    Raises ``ValueError`` naming ``name`` (the argument) when ``path`` or one of its parents is a file (the message
    then ends with ``hint``), or when the folder cannot be created or written to. Call it before any work, so that a
    bad folder costs nothing.
    """
    text = os.fspath(path)
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"{name} {text}: is a file, not a folder; {hint}")
    parent = _existing_ancestor(text)
    if not os.path.isdir(parent):
        raise ValueError(f"{name} {text}: {parent} is a file, not a folder")
    try:
        os.makedirs(text, exist_ok=True)
        with tempfile.TemporaryFile(dir=text):
            pass
    except OSError as exc:
        raise ValueError(f"{name} {text}: cannot write files there ({exc.strerror or exc})") from None
    return text


def check_file_path(path: str | os.PathLike, name: str) -> str:
    """Check that a file can be written at ``path`` (its folder exists and is writable, ``path`` is not a folder);
    ``ValueError`` naming ``name`` otherwise. Nothing is written at ``path`` itself."""
    text = os.fspath(path)
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        raise ValueError(f"{name} {text}: is a folder; give a file path, e.g. {name} {os.path.join(text, 'results.json')}")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"{name} {text}: its folder {folder} {what}; create it first or give a path in an existing folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{name} {text}: cannot write files in {folder} ({exc.strerror or exc})") from None
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise ValueError(f"{name} {text}: the file exists and is not writable")
    return text


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


def write_model_files(
    folder: str, dataset: str, model: nn.Module, quantizer: Any, calibration_config: dict, x_test: torch.Tensor, bits: int
) -> Artifacts:
    """Write the calibration config, the checkpoint, the quantizer spec and the test inputs into ``folder``."""
    artifacts = Artifacts(
        folder=folder,
        dataset=dataset,
        calibration=os.path.join(folder, "calibration.json"),
        checkpoint=os.path.join(folder, "checkpoint.pt"),
        spec=os.path.join(folder, "quant.json"),
        inputs=os.path.join(folder, "test_inputs.npy"),
        inputs_count=min(PARITY_INPUTS, len(x_test)),
    )
    save_calibration_config(calibration_config, artifacts.calibration)
    with atomic_write(artifacts.checkpoint, "wb") as f:
        torch.save(model.state_dict(), f)
    save_quantizer_spec(artifacts.spec, demo_config_list(bits), quantizer)
    with atomic_write(artifacts.inputs, "wb") as f:
        np.save(f, x_test[: artifacts.inputs_count].numpy())
    return artifacts


def results_dict(result: Any) -> dict[str, Any]:
    """The demo's results as JSON-ready data: accuracies, times, ONNX Runtime numbers, the files and commands, and
    the calibration config in the form :func:`quantrain.save_calibration_config` writes (``quantrain inspect``
    reads it from this file too)."""
    data = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        **{field.name: getattr(result, field.name) for field in dataclasses.fields(result) if field.name not in _NESTED},
    }
    data["onnx_runtime"] = dataclasses.asdict(result.deployment) if result.deployment is not None else None
    artifacts = result.artifacts
    data["artifacts"] = {what: path for what, path in artifacts.listing()} if artifacts is not None else None
    data["commands"] = [shlex.join(command) for command in artifacts.commands()] if artifacts is not None else []
    data["calibration_config"] = _calibration_json(result.calibration_config)
    return data


_NESTED = ("calibration_config", "deployment", "artifacts")


def _calibration_json(config: dict) -> dict[str, Any]:
    modules = {
        module: {
            target: {key: (value.tolist() if isinstance(value, torch.Tensor) else value) for key, value in entry.items()}
            for target, entry in targets.items()
        }
        for module, targets in config.items()
    }
    return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "modules": modules}


def write_results_json(result: Any, path: str | os.PathLike) -> None:
    """Write :func:`results_dict` of ``result`` to ``path`` (atomically)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(results_dict(result), f, indent=1)
        f.write("\n")
