"""The ``quantrain`` command line: ``demo``, ``inspect FILE`` and ``parity MODEL.onnx``.

Exit codes (also in ``quantrain --help``):

* 0: success.
* 1: a check failed (``parity`` below ``--min-agreement`` or above ``--max-diff-steps``).
* 2: usage error (unknown command, bad option value), reported by argparse.
* 3: an optional dependency is missing (onnx, onnxruntime, scikit-learn, tqdm); the message says what to install.
* 4: a bad input file: missing, unreadable, or not in the expected format.
* 130: interrupted (Ctrl-C).

Errors print one line ``quantrain: error: ...`` on stderr, without a traceback. ``--quiet`` (on every command) turns
off progress bars and informational messages; results and errors are still printed.

The ``--config`` of ``parity`` is a quantizer spec (:mod:`quantrain.spec`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from quantrain.spec import load_quantizer_spec, save_quantizer_spec

__all__ = ["EXIT_CODES", "CliError", "build_parser", "load_quantizer_spec", "main", "save_quantizer_spec"]

OK, CHECK_FAILED, USAGE, MISSING_DEPENDENCY, BAD_INPUT, INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    OK: "success",
    CHECK_FAILED: "a check failed (parity below --min-agreement or above --max-diff-steps)",
    USAGE: "usage error (bad command or option)",
    MISSING_DEPENDENCY: "an optional dependency is missing (the message says what to pip install)",
    BAD_INPUT: "a bad input file (missing, unreadable, or not in the expected format)",
    INTERRUPTED: "interrupted (Ctrl-C)",
}

DEPENDENCY_HINTS = {
    "onnx": "pip install 'quantrain[onnx]'",
    "onnxruntime": "pip install 'quantrain[onnx]'",
    "sklearn": "pip install 'quantrain[demo]'",
    "tqdm": "pip install 'quantrain[demo]'",
}


class CliError(Exception):
    """An error reported as ``quantrain: error: <message>`` with exit code ``code``."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.message, self.code = message, code


# --------------------------------------------------------------------------------------------------------- parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _bits(value: str) -> int:
    number = int(value)
    if not 2 <= number <= 8:
        raise argparse.ArgumentTypeError(f"bit width must be between 2 and 8, got {value}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (0.99 is 99%), got {value}")
    return number


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _exit_code_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


TOP_EPILOG = """\
examples:
  quantrain demo                                  train, QAT and deploy a small CNN on digits
  quantrain inspect model_int8.onnx               which layers are int8, scales, integer share, size
  quantrain parity model_int8.onnx --model mymodels:build --checkpoint qat.pt --config quant.json --data x.npy

run 'quantrain COMMAND --help' for a command's options.
"""

DEMO_EPILOG = """\
examples:
  quantrain demo                                  8-bit, digits, about 10 s on 2 CPU cores
  quantrain demo --bits 4 --qat-epochs 5          int4 weights and uint4 activations
  quantrain demo --dataset fashion-mnist --out results/   write the ONNX models and the report to results/
"""

INSPECT_EPILOG = """\
FILE is an ONNX model written by quantrain.export_onnx (QDQ form) or a calibration config JSON (written by
quantrain.save_calibration_config, or NNI's {module: {target: {scale, zero_point, quant_dtype, ...}}}).

For ONNX: per Conv/Gemm/MatMul layer the weight's integer type, the bits its integers use, the scheme (symmetric:
zero points 0, or 128 for uint8), per-tensor or per-channel scales and their range, whether its input and output
are quantized; each activation quantization point; the share of weight elements stored as integers, and bytes.
For a calibration config: per module and target the dtype, scheme, granularity, scale and tracked ranges.

examples:
  quantrain inspect model_int8.onnx
  quantrain inspect result.calibration.json --json | python -m json.tool
"""

PARITY_EPILOG = """\
Rebuilds the trained fake-quant model and compares it with the ONNX model in ONNX Runtime, output by output:
top-1 agreement (2-D outputs), the largest difference in units of the output's quantization step, and SQNR.

  --model MODULE:FACTORY   FACTORY() returns the float model; MODULE is an importable module (the current
                           folder is searched first) or a path to a .py file, e.g. models.py:build
  --config QUANT.json      the config_list and quantizer options (quantrain.save_quantizer_spec writes it):
                           {"config_list": [...], "quantizer": {"fuse": "auto", "integer_bias": true}}
  --checkpoint STATE.pt    model.state_dict() of the quantized model after QAT (torch.save); loaded weights-only
  --data DATA              inputs: a .pt file holding a tensor (or a dict with key "x" or "inputs"), a .npy
                           file, or a .npz file (key "x" or "inputs", or its only array)

examples:
  quantrain parity model_int8.onnx --model models.py:build --checkpoint qat.pt --config quant.json --data x.npy
  quantrain parity model_int8.onnx ... --min-agreement 0.999 --max-diff-steps 1 --quiet || echo "mismatch"
"""


def build_parser() -> argparse.ArgumentParser:
    from quantrain import __version__

    parser = argparse.ArgumentParser(
        prog="quantrain",
        description="Quantization-aware training for PyTorch: a demo, and tools for quantized models.",
        epilog=TOP_EPILOG + "\n" + _exit_code_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_inspect(commands)
    _add_parity(commands)
    return parser


def _subparser(commands: Any, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog + "\n" + _exit_code_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--quiet", "-q", action="store_true", help="no progress bars or informational messages")
    return sub


def _add_demo(commands: Any) -> None:
    demo = _subparser(
        commands,
        "demo",
        help="train a small CNN in float, QAT it to int8, deploy it in ONNX Runtime, compare accuracy",
        description="Train a small CNN in float, quantization-aware train it, export it to ONNX and run it in ONNX "
        "Runtime's integer kernels; print float vs fake-quant vs ONNX Runtime test accuracy, latency and size.",
        epilog=DEMO_EPILOG,
    )
    demo.add_argument(
        "--dataset",
        choices=("digits", "fashion-mnist"),
        default="digits",
        help="scikit-learn's bundled 8x8 digits, or Fashion-MNIST 28x28 (default digits)",
    )
    demo.add_argument("--epochs", type=_positive, default=10, help="float training epochs (default 10)")
    demo.add_argument("--qat-epochs", type=_positive, default=3, help="QAT epochs after float training (default 3)")
    demo.add_argument("--bits", type=_bits, default=8, help="bit width of weights and activations, 2-8 (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default 2)")
    demo.add_argument("--json", metavar="PATH", help="also write the results and calibration config as JSON")
    demo.add_argument("--out", metavar="DIR", help="folder for the ONNX models and the report (default: a temporary folder)")
    demo.set_defaults(handler=_demo)


def _add_inspect(commands: Any) -> None:
    inspect = _subparser(
        commands,
        "inspect",
        help="summarize an ONNX QDQ export or a calibration config JSON",
        description="Show which layers of an ONNX export or calibration config are quantized, and how.",
        epilog=INSPECT_EPILOG,
    )
    inspect.add_argument("file", metavar="FILE", help="an .onnx model or a calibration config .json")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    inspect.set_defaults(handler=_inspect)


def _add_parity(commands: Any) -> None:
    parity = _subparser(
        commands,
        "parity",
        help="compare an ONNX export with the trained fake-quant PyTorch model on data",
        description="Check that the ONNX model computes what the trained fake-quant model computes.",
        epilog=PARITY_EPILOG,
    )
    parity.add_argument("onnx", metavar="MODEL.onnx", help="the exported ONNX model")
    parity.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="builds the float model (see below)")
    parity.add_argument("--checkpoint", required=True, metavar="STATE.pt", help="state_dict of the quantized model")
    parity.add_argument("--config", required=True, metavar="QUANT.json", help="quantizer spec (see below)")
    parity.add_argument("--data", required=True, metavar="DATA", help="inputs: .pt, .npy or .npz (see below)")
    parity.add_argument("--batch-size", type=_positive, default=256, help="inputs per ONNX Runtime call (default 256)")
    parity.add_argument("--min-agreement", type=_fraction, metavar="FRACTION", help="exit 1 if top-1 agreement is lower")
    parity.add_argument(
        "--max-diff-steps", type=_non_negative, metavar="STEPS", help="exit 1 if an output differs by more quantization steps"
    )
    parity.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parity.set_defaults(handler=_parity)


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code (see the module doc)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except ImportError as exc:
        return _fail(_import_message(exc), MISSING_DEPENDENCY)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", BAD_INPUT)
    except KeyboardInterrupt:
        print("quantrain: interrupted", file=sys.stderr)
        return INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"quantrain: error: {message}", file=sys.stderr)
    return code


def _import_message(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    hint = DEPENDENCY_HINTS.get(name)
    message = str(exc)
    return f"{message} ({hint})" if hint and hint not in message else message


def _require(*modules: str, command: str) -> None:
    """Import ``modules`` now, so that a missing one is exit code 3 before any work."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CliError(
                f"quantrain {command} needs {name}: {DEPENDENCY_HINTS.get(name, f'pip install {name}')}", MISSING_DEPENDENCY
            ) from None


def _info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"quantrain: {message}", file=sys.stderr)


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from quantrain.calibration import save_calibration_config
    from quantrain.demo import format_table, run_demo

    torch.set_num_threads(args.threads)
    result = run_demo(
        dataset=args.dataset,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        bits=args.bits,
        seed=args.seed,
        progress=_progress_enabled(args),
        out_dir=args.out,
    )
    print(format_table(result))
    report_path = getattr(result, "report_path", None)
    if report_path:
        print(f"report: {report_path}")
    if args.json:
        summary = {
            "dataset": args.dataset,
            "float_accuracy": result.float_accuracy,
            "qat_accuracy": result.qat_accuracy,
            "bits": result.bits,
            "test_size": result.test_size,
            "float_seconds": result.float_seconds,
            "qat_seconds": result.qat_seconds,
        }
        if result.deployment is not None:
            summary["onnx_runtime"] = dataclasses.asdict(result.deployment)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        save_calibration_config(result.calibration_config, args.json.removesuffix(".json") + ".calibration.json")
    return OK


# -------------------------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    from quantrain.summary import format_summary, summarize_file, summary_to_dict

    if not os.path.isfile(args.file):
        raise CliError(f"{args.file}: no such file")
    try:
        summary = summarize_file(args.file)
    except ImportError as exc:
        raise CliError(f"inspecting an ONNX model needs onnx: {_import_message(exc)}", MISSING_DEPENDENCY) from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"{exc} (expected an ONNX model or a calibration config JSON)") from None
    print(json.dumps(summary_to_dict(summary), indent=1) if args.json else format_summary(summary))
    return OK


# --------------------------------------------------------------------------------------------------------- parity


def _parity(args: argparse.Namespace) -> int:
    _require("onnx", "onnxruntime", command="parity")
    for flag, path in (("MODEL.onnx", args.onnx), ("--checkpoint", args.checkpoint), ("--config", args.config)):
        if not os.path.isfile(path):
            raise CliError(f"{flag} {path}: no such file")
    try:
        config_list, options = load_quantizer_spec(args.config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _check_onnx(args.onnx)
    inputs = _load_inputs(args.data)
    model = _quantized_model(args.model, config_list, options, args.config)
    _load_checkpoint(model, args.checkpoint)
    model.eval()
    count = len(inputs[0])
    batches = -(-count // args.batch_size)
    batches_text = f"{batches} batch{'es' if batches > 1 else ''}"
    _info(args, f"comparing {args.onnx} with {args.model} + {args.checkpoint} on {count} inputs ({batches_text})")
    report = _batched_parity(model, args.onnx, inputs, args.batch_size, _progress_enabled(args))
    failures = _threshold_failures(report, args.min_agreement, args.max_diff_steps)
    if args.json:
        outputs = [_finite_dict(dataclasses.asdict(o)) for o in report.outputs]
        print(json.dumps({"onnx": args.onnx, "inputs": count, "outputs": outputs, "failures": failures}, indent=1))
    else:
        print(_format_parity(report, args.onnx, count))
    for failure in failures:
        print(f"quantrain: check failed: {failure}", file=sys.stderr)
    return CHECK_FAILED if failures else OK


def _load_inputs(path: str | os.PathLike) -> tuple[torch.Tensor, ...]:
    """The model inputs in ``path``: ``.pt`` (a tensor, a list/tuple of tensors, or a dict with key ``'x'`` or
    ``'inputs'``; loaded weights-only), ``.npy``, or ``.npz`` (key ``'x'`` or ``'inputs'``, or its only array).
    float64 becomes float32. Raises :class:`CliError` (exit code 4) when the file is missing or not like that."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CliError(f"--data {path}: no such file")
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
        raise CliError(f"{flag} {path}: not {expected} saved with torch.save ({_first_line(exc)})") from None


def _check_onnx(path: str) -> None:
    """Fail early (before any work) when ``path`` is not a valid ONNX model."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(path))
    except Exception as exc:  # protobuf and checker errors alike
        raise CliError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None


def _load_numpy(path: str) -> Any:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CliError(f"--data {path}: not a NumPy file ({_first_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        return torch.from_numpy(loaded)
    with loaded:
        names = list(loaded.files)
        key = next((k for k in ("x", "inputs") if k in names), names[0] if len(names) == 1 else None)
        if key is None:
            raise CliError(f"--data {path}: an .npz needs key 'x' or 'inputs' (or a single array), found {names}")
        return torch.from_numpy(loaded[key])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
        raise CliError(f"--model {spec!r}: cannot import {module_name} ({_first_line(exc)})") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CliError(f"--model {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CliError(f"--model {spec!r}: {attribute} is not callable")
    return target


def _quantized_model(spec: str, config_list: list[dict[str, Any]], options: dict[str, Any], config_path: str) -> Any:
    from torch import nn

    from quantrain.qat import QATQuantizer

    factory = _load_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise CliError(f"--model {spec!r}: {spec.rpartition(':')[2]}() raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    try:
        QATQuantizer(model, config_list, **options)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--config {config_path}: does not fit the model from {spec}: {exc}") from None
    return model


COUNTERS = (".nonfinite_batches",)  # statistics, not calibration: a checkpoint from before they existed still fits


def _load_checkpoint(model: Any, path: str) -> None:
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
        raise CliError(f"--checkpoint {path}: does not fit the quantized model: {_one_line(exc)}") from None


def _some(keys: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(repr(key) for key in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _batched_parity(model: Any, onnx_path: str, inputs: tuple[torch.Tensor, ...], batch_size: int, progress: bool) -> Any:
    """:func:`quantrain.check_parity` batch by batch, combined as if run at once (see :func:`_combine`)."""
    from quantrain.deploy.parity import ParityReport, check_parity

    signals: list[float] = []  # the reference's signal power per output, from the forward check_parity runs

    def remember(module: Any, args: Any, output: Any) -> None:
        signals[:] = _powers(output)

    handle = model.register_forward_hook(remember)
    parts: list[tuple[int, Any, list[float]]] = []
    try:
        with _bar(len(inputs[0]), progress) as bar:
            for start in range(0, len(inputs[0]), batch_size):
                batch = tuple(t[start : start + batch_size] for t in inputs)
                signals.clear()
                try:
                    report = check_parity(model, onnx_path, batch if len(batch) > 1 else batch[0])
                except ValueError as exc:  # check_parity's own messages name the file and the mismatch
                    raise CliError(str(exc)) from None
                except Exception as exc:  # PyTorch or ONNX Runtime refusing these inputs (shape, dtype, rank)
                    raise CliError(
                        f"running the models on --data inputs {start}..{start + len(batch[0]) - 1} failed: {_one_line(exc)}"
                    ) from None
                parts.append((len(batch[0]), report, list(signals)))
                bar.update(len(batch[0]))
    finally:
        handle.remove()
    return ParityReport(_combine(parts))


def _powers(output: Any) -> list[float]:
    """``sum(output^2)`` per output of the model (a tensor or a tuple/list of tensors), in float64."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [float(o.detach().double().pow(2).sum()) for o in outputs]


def _combine(parts: Sequence[tuple[int, Any, list[float]]]) -> tuple[Any, ...]:
    """Per output, the batches' results as one: top-1 agreement weighted by batch size, the largest differences,
    and ``SQNR = 10 log10(sum signal / sum noise)``, each batch's noise recovered from its SQNR and signal power as
    ``signal * 10^(-SQNR / 10)`` (for an all-zero reference, whose SQNR says nothing, ``max |diff|^2``)."""
    from quantrain.deploy.parity import OutputParity

    total = sum(size for size, _, _ in parts)
    combined = []
    for index, first in enumerate(parts[0][1].outputs):
        results = [(size, report.outputs[index], signal[index] if index < len(signal) else 0.0) for size, report, signal in parts]
        agreements = [r.top1_agreement for _, r, _ in results]
        steps = [r.max_diff_in_steps for _, r, _ in results]
        signal = sum(s for _, _, s in results)
        noise = sum(_noise(r, s) for _, r, s in results)
        combined.append(
            OutputParity(
                name=first.name,
                top1_agreement=None if None in agreements else sum(n * r.top1_agreement for n, r, _ in results) / total,
                max_abs_diff=max(r.max_abs_diff for _, r, _ in results),
                max_diff_in_steps=None if None in steps else max(steps),
                sqnr_db=math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf,
            )
        )
    return tuple(combined)


def _noise(result: Any, signal: float) -> float:
    if result.sqnr_db == math.inf:
        return 0.0
    if signal > 0 and math.isfinite(result.sqnr_db):
        return signal * 10 ** (-result.sqnr_db / 10)
    return result.max_abs_diff**2


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm progress bar over ``total`` inputs on stderr; a silent stand-in when disabled or without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield _NoBar()
        return
    with tqdm(total=total, unit="input", desc="parity", leave=False, file=sys.stderr) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        return None


def _threshold_failures(report: Any, min_agreement: float | None, max_diff_steps: float | None) -> list[str]:
    failures = []
    if min_agreement is not None:
        rated = [o for o in report.outputs if o.top1_agreement is not None]
        if not rated:
            failures.append("--min-agreement: no output is 2-D (batch, classes), so there is no top-1 agreement")
        failures += [
            f"{o.name}: top-1 agreement {100 * o.top1_agreement:.2f}% is below --min-agreement {100 * min_agreement:.2f}%"
            for o in rated
            if o.top1_agreement < min_agreement
        ]
    if max_diff_steps is not None:
        stepped = [o for o in report.outputs if o.max_diff_in_steps is not None]
        if not stepped:
            failures.append("--max-diff-steps: no output is quantized, so differences have no step")
        failures += [
            f"{o.name}: differs by {o.max_diff_in_steps:.2f} quantization steps, more than --max-diff-steps {max_diff_steps:g}"
            for o in stepped
            if o.max_diff_in_steps > max_diff_steps
        ]
    return failures


def _format_parity(report: Any, onnx_path: str, count: int) -> str:
    from quantrain.summary import format_table

    rows = [("output", "top-1 agreement", "max |diff|", "max diff in steps", "SQNR dB")]
    for o in report.outputs:
        rows.append(
            (
                o.name,
                "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%",
                f"{o.max_abs_diff:.4g}",
                "-" if o.max_diff_in_steps is None else f"{o.max_diff_in_steps:.2f}",
                f"{o.sqnr_db:.1f}",
            )
        )
    return f"{onnx_path} in ONNX Runtime vs the fake-quant model, {count} inputs\n" + format_table(rows)


def _finite_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value for key, value in data.items()}


if __name__ == "__main__":
    sys.exit(main())
