"""What every ``quantrain`` command shares: exit codes, :class:`CliError`, option types, dependency checks, output."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

__all__ = [
    "BAD_INPUT",
    "CHECK_FAILED",
    "EXIT_CODES",
    "INTERRUPTED",
    "MISSING_DEPENDENCY",
    "OK",
    "USAGE",
    "CliError",
    "add_command",
    "existing_file",
    "first_line",
    "import_message",
    "info",
    "one_line",
    "progress_enabled",
    "require",
]

OK, CHECK_FAILED, USAGE, MISSING_DEPENDENCY, BAD_INPUT, INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    OK: "success",
    CHECK_FAILED: "a check failed (parity below --min-agreement or above --max-diff-steps)",
    USAGE: "usage error (bad command or option)",
    MISSING_DEPENDENCY: "an optional dependency is missing (the message says what to pip install)",
    BAD_INPUT: "a bad input file or output path (missing, unreadable, not writable, or not in the expected format)",
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


# ---------------------------------------------------------------------------------------------------- options


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def seed(value: str) -> int:
    number = int(value)
    if not 0 <= number < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 4294967295, got {value}")
    return number


def bits(value: str) -> int:
    number = int(value)
    if not 2 <= number <= 8:
        raise argparse.ArgumentTypeError(f"bit width must be between 2 and 8, got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (0.99 is 99%), got {value}")
    return number


def non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def exit_code_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


def add_command(commands: Any, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand's parser with its examples and the exit codes in ``--help``, and ``--quiet``."""
    sub = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog + "\n" + exit_code_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--quiet", "-q", action="store_true", help="no progress bars or informational messages")
    return sub


# ------------------------------------------------------------------------------------------------ checks, output


def existing_file(path: str, flag: str | None = None) -> str:
    """``path`` when it is a file; else :class:`CliError` (exit code 4) saying it is missing or a folder."""
    where = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise CliError(f"{where}: is a folder, not a file")
    if not os.path.isfile(path):
        raise CliError(f"{where}: no such file")
    return path


def import_message(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    hint = DEPENDENCY_HINTS.get(name)
    message = str(exc)
    return f"{message} ({hint})" if hint and hint not in message else message


def require(*modules: str, command: str) -> None:
    """Import ``modules`` now, so that a missing one is exit code 3 before any work."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CliError(
                f"quantrain {command} needs {name}: {DEPENDENCY_HINTS.get(name, f'pip install {name}')}", MISSING_DEPENDENCY
            ) from None


def info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"quantrain: {message}", file=sys.stderr)


def progress_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
