"""``quantrain inspect FILE``: what an ONNX QDQ export or a calibration config quantizes, and how
(:mod:`quantrain.summary`). FILE may also be the results JSON of ``quantrain demo --json``, whose calibration config
is inspected; a folder is an error that lists the files in it that inspect reads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import tempfile
from typing import Any

from quantrain.cli.common import MISSING_DEPENDENCY, OK, CliError, add_command, existing_file, import_message

__all__ = ["add_parser", "run"]

LISTED = 8  # files named in the error for a folder
SMALL_JSON = 16 * 2**20  # JSON files larger than this are not opened to see whether inspect reads them

INSPECT_EPILOG = """\
FILE is an ONNX model written by quantrain.export_onnx (QDQ form) or a calibration config JSON (written by
quantrain.save_calibration_config, or NNI's {module: {target: {scale, zero_point, quant_dtype, ...}}}), or the
results JSON of 'quantrain demo --json', whose calibration config is shown. Given a folder, inspect names the
files in it that it reads.

For ONNX: per Conv/Gemm/MatMul layer the weight's integer type, the bits its integers use, the scheme (symmetric:
zero points 0, or 128 for uint8), per-tensor or per-channel scales and their range, whether its input and output
are quantized; each activation quantization point; the share of weight elements stored as integers, and bytes.
For a calibration config: per module and target the dtype, scheme, granularity, scale and tracked ranges.

examples:
  quantrain inspect model_int8.onnx
  quantrain inspect quantrain-demo/calibration.json --json | python -m json.tool
"""


def add_parser(commands: Any) -> None:
    inspect = add_command(
        commands,
        "inspect",
        help="summarize an ONNX QDQ export or a calibration config JSON",
        description="Show which layers of an ONNX export or calibration config are quantized, and how.",
        epilog=INSPECT_EPILOG,
    )
    inspect.add_argument("file", metavar="FILE", help="an .onnx model, a calibration config .json, or a demo results .json")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from quantrain import summary

    if os.path.isdir(args.file):
        raise CliError(_folder_message(args.file))
    path = existing_file(args.file)
    try:
        embedded = _demo_calibration(path)
        result = summary.summarize_file(path) if embedded is None else _summarize_embedded(path, embedded)
    except ImportError as exc:
        raise CliError(f"inspecting an ONNX model needs onnx: {import_message(exc)}", MISSING_DEPENDENCY) from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"{exc} (expected an ONNX model or a calibration config JSON)") from None
    print(json.dumps(summary.summary_to_dict(result), indent=1) if args.json else summary.format_summary(result))
    return OK


def _demo_calibration(path: str) -> dict | None:
    """The calibration config inside a results JSON of ``quantrain demo`` (``None`` for any other file)."""
    from quantrain.demo.artifacts import RESULTS_FORMAT

    if not path.lower().endswith(".json") or os.path.getsize(path) > SMALL_JSON:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None  # summarize_file says what is wrong with it
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        return None
    section = data.get("calibration_config")
    if not isinstance(section, dict):
        raise ValueError(f"{path}: a quantrain demo results file without its 'calibration_config'")
    return section


def _summarize_embedded(path: str, section: dict) -> Any:
    """Summarize ``section`` exactly as the same calibration config in a file of its own, errors naming ``path``."""
    from quantrain import summary

    with tempfile.TemporaryDirectory(prefix="quantrain-inspect-") as folder:
        copy = os.path.join(folder, "calibration_config.json")
        with open(copy, "w", encoding="utf-8") as f:
            json.dump(section, f)
        try:
            result = summary.summarize_file(copy)
        except ValueError as exc:
            raise ValueError(str(exc).replace(copy, f"{path} ['calibration_config']")) from None
    return dataclasses.replace(result, path=path, file_bytes=os.path.getsize(path))


def _folder_message(folder: str) -> str:
    readable = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if _readable(os.path.join(folder, name))]
    if not readable:
        return f"{folder}: is a folder, not a file, and holds no .onnx model or calibration config .json that inspect reads"
    listed = ", ".join(shlex.quote(path) for path in readable[:LISTED])
    more = f" and {len(readable) - LISTED} more" if len(readable) > LISTED else ""
    return f"{folder}: is a folder, not a file; inspect reads one file, e.g. one of these in it: {listed}{more}"


def _readable(path: str) -> bool:
    """Whether inspect reads ``path``: an ``.onnx`` file (by its name), or a JSON calibration config or demo results."""
    from quantrain.calibration import load_calibration_config

    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".onnx"):
        return True
    if not path.lower().endswith(".json") or os.path.getsize(path) > SMALL_JSON:
        return False
    try:
        return _demo_calibration(path) is not None or bool(load_calibration_config(path))
    except (OSError, ValueError):
        return False
