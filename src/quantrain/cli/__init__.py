"""The ``quantrain`` command line: ``demo``, ``inspect FILE`` and ``parity MODEL.onnx``, one module each
(:mod:`quantrain.cli.demo`, :mod:`quantrain.cli.inspect`, :mod:`quantrain.cli.parity`; what they share is in
:mod:`quantrain.cli.common`).

Exit codes (also in ``quantrain --help``):

* 0: success.
* 1: a check failed (``parity`` below ``--min-agreement`` or above ``--max-diff-steps``).
* 2: usage error (unknown command, bad option value), reported by argparse.
* 3: an optional dependency is missing (onnx, onnxruntime, scikit-learn, tqdm); the message says what to install.
* 4: a bad input file or output path: missing, unreadable, not writable, a folder where a file is expected (or
  the reverse), or not in the expected format.
* 130: interrupted (Ctrl-C).

Errors print one line ``quantrain: error: ...`` on stderr, without a traceback. ``--quiet`` (on every command) turns
off progress bars and informational messages; results and errors are still printed.

The ``--config`` of ``parity`` is a quantizer spec (:mod:`quantrain.spec`).
"""

from __future__ import annotations

import argparse
import sys

from quantrain.cli import demo, inspect, parity
from quantrain.cli.common import (
    BAD_INPUT,
    EXIT_CODES,
    INTERRUPTED,
    MISSING_DEPENDENCY,
    CliError,
    exit_code_text,
    import_message,
)
from quantrain.spec import load_quantizer_spec, save_quantizer_spec

__all__ = ["EXIT_CODES", "CliError", "build_parser", "load_quantizer_spec", "main", "save_quantizer_spec"]

TOP_EPILOG = """\
examples:
  quantrain demo                                  train, QAT and deploy a small CNN on digits (files in ./quantrain-demo/)
  quantrain inspect model_int8.onnx               which layers are int8, scales, integer share, size
  quantrain parity model_int8.onnx --model mymodels:build --checkpoint qat.pt --config quant.json --data x.npy

run 'quantrain COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    from quantrain import __version__

    parser = argparse.ArgumentParser(
        prog="quantrain",
        description="Quantization-aware training for PyTorch: a demo, and tools for quantized models.",
        epilog=TOP_EPILOG + "\n" + exit_code_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, inspect, parity):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code (see the module doc)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except ImportError as exc:
        return _fail(import_message(exc), MISSING_DEPENDENCY)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", BAD_INPUT)
    except KeyboardInterrupt:
        print("quantrain: interrupted", file=sys.stderr)
        return INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"quantrain: error: {message}", file=sys.stderr)
    return code
