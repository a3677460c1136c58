"""Deploy benchmark: ONNX Runtime latency and file size of quantrain's int8 export, against the fp32 ONNX of the same
model and against ONNX Runtime's own static QDQ quantization of that fp32 model.

quantrain's export is measured twice: with its weights stored as int8 (``quantrain``, what ORT's quantizer writes)
and as the same values in uint8 + 128 (``quantrain-uint8``), which ONNX Runtime computes exactly on x86 CPUs without
VNNI, where its int8-weight kernels saturate (``export_onnx``'s default, ``weight_dtype="auto"``, picks it there).
Each quantrain file's largest difference from its fake-quant model is reported in quantization steps of the output
(``parity steps``), with whether this CPU's kernels saturate.

Models: an MLP 784-1024-1024-10 (batch 256) and a small ResNet-style CNN (3x32x32, three basic blocks of 32/64/128
channels, batch 32). Weights are random and BatchNorm statistics come from a few training-mode batches: latency and
size do not depend on training. quantrain's model is prepared with the deployable config (uint8 affine activations,
int8 symmetric per-channel weights, BatchNorm folded) and its ranges are tracked on the same batches ORT's calibration
sees. All sessions run in one process, interleaved, with the same thread count; medians over many runs are reported
with min and max, and the ratios are measured in the same run.

    python benchmarks/deploy.py [--runs 60] [--threads 2] [--json deploy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from quantrain import QATQuantizer, check_parity, export_onnx
from quantrain.config.presets import deployable_config_list
from quantrain.deploy.runtime import u8s8_saturates

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared models next to this script
from models import mlp, resnet

CASES = {"mlp": (mlp, (256, 784)), "resnet": (resnet, (32, 3, 32, 32))}
VARIANTS = ("fp32", "ort_static", "quantrain", "quantrain-uint8")
WEIGHT_DTYPES = {"quantrain": "int8", "quantrain-uint8": "uint8"}


def config(name: str) -> list[dict]:
    return deployable_config_list(8, 8, output_op_types=("Add", "AdaptiveAvgPool2d") if name == "resnet" else ())


class Batches(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter([{"input_0": b} for b in batches])

    def get_next(self):
        return next(self.batches, None)


def prepare(name: str, folder: str, calibration: list[torch.Tensor]) -> tuple[dict[str, str], dict[str, float]]:
    build, _ = CASES[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    with torch.no_grad():
        for x in calibration:  # BatchNorm statistics
            model(x)
    model.eval()
    paths = {kind: os.path.join(folder, f"{name}_{kind}.onnx") for kind in VARIANTS}
    axes = {"input_0": {0: "batch"}, "output_0": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (calibration[0],),
            paths["fp32"],
            dynamo=False,
            input_names=["input_0"],
            output_names=["output_0"],
            dynamic_axes=axes,
        )
    quantize_static(
        paths["fp32"],
        paths["ort_static"],
        Batches([x.numpy() for x in calibration]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    quantizer = QATQuantizer(model, config(name), fuse="auto", integer_bias=True, example_inputs=calibration[0])

    for x in calibration:
        quantizer.track_forward(x)
    steps = {}
    for kind, weight_dtype in WEIGHT_DTYPES.items():
        report = export_onnx(model.eval(), calibration[0], paths[kind], weight_dtype=weight_dtype)
        parity = check_parity(model, paths[kind], calibration[-1]).outputs[0]
        steps[kind] = parity.max_diff_in_steps
        print(
            f"{name}: {kind} export notes {report.notes or 'none'}; parity with its fake-quant model: top-1 "
            f"{100 * parity.top1_agreement:.1f}%, largest difference {parity.max_diff_in_steps:.2f} steps"
        )
    return paths, steps


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The sessions take turns: a session whose idle threads spin-wait for work (ORT's default) would steal the
    # cores from the next one and bias the comparison by position, so no session spins.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(paths: dict[str, str], x: np.ndarray, runs: int, threads: int) -> dict[str, list[float]]:
    sessions = {kind: session(path, threads) for kind, path in paths.items()}
    kinds = list(sessions)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for run in range(runs + 5):
        order = kinds if run % 2 == 0 else kinds[::-1]  # interleaved, alternating order
        for kind in order:
            start = time.perf_counter()
            sessions[kind].run(None, {"input_0": x})
            if run >= 5:
                times[kind].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", default="deploy.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            shape = CASES[name][1]
            generator = torch.Generator().manual_seed(1)
            calibration = [torch.randn(shape, generator=generator) for _ in range(8)]
            paths, steps = prepare(name, folder, calibration)
            times = measure(paths, calibration[0].numpy(), args.runs, args.threads)
            fp32 = statistics.median(times["fp32"])
            for kind, samples in times.items():
                median = statistics.median(samples)
                rows.append(
                    {
                        "model": name,
                        "batch": shape[0],
                        "variant": kind,
                        "median_ms": 1000 * median,
                        "min_ms": 1000 * min(samples),
                        "max_ms": 1000 * max(samples),
                        "speedup_vs_fp32": fp32 / median,
                        "size_kib": os.path.getsize(paths[kind]) / 1024,
                        "size_vs_fp32": os.path.getsize(paths[kind]) / os.path.getsize(paths["fp32"]),
                        "parity_steps": steps.get(kind),
                    }
                )
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["variant"]] = row
    for variants in by_model.values():
        for row in variants.values():
            row["vs_ort_static"] = variants["ort_static"]["median_ms"] / row["median_ms"]
    header = "| model (batch) | variant | median ms (min-max) | speed-up vs fp32 | vs ORT static | size KiB | size vs fp32 |"
    print(f"\n{header} parity steps |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        timing = f"{row['median_ms']:.2f} ({row['min_ms']:.2f}-{row['max_ms']:.2f})"
        parity = "-" if row["parity_steps"] is None else f"{row['parity_steps']:.2f}"
        print(
            f"| {row['model']} ({row['batch']}) | {row['variant']} | {timing} | {row['speedup_vs_fp32']:.2f}x "
            f"| {row['vs_ort_static']:.2f}x | {row['size_kib']:.0f} | {row['size_vs_fp32']:.2f} | {parity} |"
        )
    saturates = u8s8_saturates()
    print(
        f"\nONNX Runtime {ort.__version__}, {args.threads} threads, {args.runs} interleaved runs per variant; "
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; this CPU's uint8 x int8 "
        f"kernels {'saturate (x86 without VNNI)' if saturates else 'are exact'}"
    )
    with open(args.json, "w", encoding="utf-8") as f:
        report = {"args": vars(args), "rows": rows, "onnxruntime": ort.__version__, "u8s8_saturates": saturates}
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
