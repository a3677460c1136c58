"""``quantrain demo``: check every option and path, run :func:`quantrain.demo.run_demo`, print the table, where each
file went, and the ``quantrain inspect`` / ``parity`` commands that work on them."""

from __future__ import annotations

import argparse
import os
from typing import Any

from quantrain.cli.common import OK, CliError, add_command, bits, info, positive, progress_enabled, require, seed

__all__ = ["add_parser", "run"]

# Wall time of the whole command (imports, warm-up, training, evaluation, export, report), measured with `time` on an
# otherwise idle 2-core machine: digits 16-19 s (5 runs), Fashion-MNIST 70-80 s (2 runs); torch 2.13 CPU, December 2026.
DIGITS_SECONDS, FASHION_MNIST_SECONDS = 20, 75

DEMO_EPILOG = f"""\
Writes into --out (default ./quantrain-demo/, created if missing; files of an earlier run there are replaced):
the int8 model and the float control as ONNX, the calibration config (calibration.json), the quantized model's
state_dict (checkpoint.pt), the quantizer spec (quant.json), test inputs (test_inputs.npy) and, with matplotlib,
report.html; then prints each path and the 'quantrain inspect' and 'quantrain parity' commands that work on them.

train time in the table is the wall time of the epochs each row adds, after an untimed warm-up (first steps, the
native kernels' build), without the report's evaluations.

examples:
  quantrain demo                                  8-bit, digits: about {DIGITS_SECONDS} s on a 2-core machine
  quantrain demo --bits 4 --qat-epochs 5          int4 weights and uint4 activations
  quantrain demo --dataset fashion-mnist --out results/   28x28 images: about {FASHION_MNIST_SECONDS} s on a 2-core machine
"""


def add_parser(commands: Any) -> None:
    from quantrain.demo import DEFAULT_OUT

    demo = add_command(
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
        help="scikit-learn's bundled 8x8 digits, or Fashion-MNIST 28x28 from Debian's dataset-fashion-mnist (default digits)",
    )
    demo.add_argument("--epochs", type=positive, default=10, help="float training epochs (default 10)")
    demo.add_argument("--qat-epochs", type=positive, default=3, help="QAT epochs after float training (default 3)")
    demo.add_argument("--bits", type=bits, default=8, help="bit width of weights and activations, 2-8 (default 8)")
    demo.add_argument("--seed", type=seed, default=0, help="random seed, 0 to 2**32 - 1 (default 0)")
    demo.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default 2)")
    demo.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results, the files' paths and the calibration config to PATH as JSON ('quantrain inspect PATH' "
        "shows its calibration config); PATH's folder must exist",
    )
    demo.add_argument(
        "--out", metavar="DIR", help=f"folder for the files the demo writes (default ./{DEFAULT_OUT}/, created if missing)"
    )
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from quantrain import demo

    out = _check(args)
    seconds = FASHION_MNIST_SECONDS if args.dataset == "fashion-mnist" else DIGITS_SECONDS
    info(args, f"demo on {args.dataset}, files into {out}/ (the defaults take about {seconds} s on a 2-core machine)")
    torch.set_num_threads(args.threads)
    result = demo.run_demo(
        dataset=args.dataset,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        bits=args.bits,
        seed=args.seed,
        progress=progress_enabled(args),
        out_dir=out,
    )
    if args.json:
        from quantrain.demo.artifacts import write_results_json

        write_results_json(result, args.json)
    print(demo.format_table(result))
    if result.artifacts is not None:
        from quantrain.demo.table import format_files

        print(format_files(result.artifacts, args.json, _missing_note(result)))
    return OK


def _check(args: argparse.Namespace) -> str:
    """Everything that could fail after training, checked before it: dependencies, dataset files, --json, --out
    (created last, so that a bad option leaves nothing behind). Returns the output folder."""
    from quantrain.demo import DEFAULT_OUT
    from quantrain.demo.artifacts import check_file_path, prepare_folder
    from quantrain.demo.data import check_dataset

    if args.dataset == "digits":
        require("sklearn", command="demo")
    if progress_enabled(args):
        require("tqdm", command="demo")
    try:
        check_dataset(args.dataset)
    except FileNotFoundError as exc:
        raise CliError(f"--dataset {args.dataset}: {exc}") from None
    out = args.out or DEFAULT_OUT
    in_out = args.json is not None and os.path.abspath(os.path.dirname(args.json) or ".") == os.path.abspath(out)
    try:
        if args.json and not in_out:  # a --json inside --out is checked once the folder exists
            check_file_path(args.json, "--json")
        if args.out:
            prepare_folder(out, "--out")
        else:
            prepare_folder(out, "the default --out", hint="choose a folder with --out DIR (created if missing)")
        if in_out:
            check_file_path(args.json, "--json")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return out


def _missing_note(result: Any) -> str | None:
    """What was left out for want of an optional package."""
    missing = []
    if result.deployment is None:
        missing.append("the ONNX models and the parity check need onnx and onnxruntime: pip install 'quantrain[onnx]'")
    if result.artifacts.report is None:
        missing.append("the report needs matplotlib: pip install 'quantrain[report]'")
    return "; ".join(missing) or None
