"""The ``quantrain`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

__all__ = ["main"]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantrain", description="Quantization-aware training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a digits CNN in float, then QAT it to int8, and compare accuracy",
        description="Train a small CNN on scikit-learn's digits in float, quantization-aware "
        "train it, and print float vs fake-quant test accuracy.",
    )
    demo.add_argument("--epochs", type=_positive, default=10, help="float training epochs (default 10)")
    demo.add_argument("--qat-epochs", type=_positive, default=3, help="QAT epochs after float training (default 3)")
    demo.add_argument("--bits", type=_bits, default=8, help="bit width of weights and activations (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default 2)")
    demo.add_argument("--json", metavar="PATH", help="also write the results and calibration config as JSON")
    demo.add_argument("--out", metavar="DIR", help="where to write the ONNX models (default: a temporary folder)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from quantrain.calibration import save_calibration_config
    from quantrain.demo import format_table, run_demo

    torch.set_num_threads(args.threads)
    result = run_demo(
        epochs=args.epochs, qat_epochs=args.qat_epochs, bits=args.bits, seed=args.seed, progress=not args.quiet, out_dir=args.out
    )

    print(format_table(result))
    if args.json:
        summary = {
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
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _demo(args)
    except ImportError as exc:
        print(f"quantrain: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
