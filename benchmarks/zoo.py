"""Zoo benchmark: models nobody here wrote (tests/zoo.py: Hugging Face transformers' vision and text models with random
weights and small inputs, and an MNIST CNN whose forward checks its input size), quantized the way their users would.

Models are built with ``big=True``: wider and deeper than the tests', on 64x64 images and 64-token sequences, so that
arithmetic rather than per-operator overhead sets the latency. Per model: the cost of a QAT training step against a
float one (interleaved medians), and ONNX Runtime latency of three files of the same weights: the fp32 export, ONNX
Runtime's own ``quantize_static`` of it (QDQ, per-channel int8
weights, uint8 activations, calibrated on the same batches), and quantrain's export after QAT with
``deployable_config_list(8, 8, target="onnxruntime")``, ``fuse="auto"`` and ``integer_bias=True``. Sessions run in one
process, interleaved in alternating order, without spin-waiting; medians over ``--runs`` runs; ``vs ORT static`` is
ORT static's median over quantrain's (above 1: quantrain's file is faster). On a CPU whose int8-weight kernels
saturate (x86 without VNNI), quantrain's file stores weights as uint8 (exact there, slower), so ``int8 weights vs ORT
static`` also times quantrain's export with int8 weights, as ORT static stores them: the same kernels on both sides
(elsewhere the two columns are one file). ``parity steps``: quantrain's file against its fake-quant model, in
quantization steps of the output; ``float32 / ORT vs float64 steps``: PyTorch's float32 forward and quantrain's file
against the same model in float64 (``check_parity(..., float64=True)``: how far float32 rounding alone moves the
output); ``float islands``: what the export names (``report.float_islands``). Models also
include torchvision's where it imports (tests/zoo.py).

    python benchmarks/zoo.py [--runs 100] [--threads 2] [--models hf_resnet ...] [--json zoo.json]
"""

from __future__ import annotations

import argparse
import json
import math
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

from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx
from quantrain.graph import output_tensors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the zoo lives with the tests
import test_zoo
import zoo

BATCH = 8


def batch(example, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if isinstance(example, dict):
        ids = torch.randint(1, 100, (BATCH, example["input_ids"].shape[1]), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn((BATCH, *example.shape[1:]), generator=generator)


def feeds(example) -> dict[str, np.ndarray]:
    if isinstance(example, dict):
        return {name: value.numpy() for name, value in example.items()}
    return {"input_0": example.numpy()}


def loss(model, example) -> torch.Tensor:
    output = zoo.run(model, example)
    logits = output.logits if hasattr(output, "logits") else output
    return logits.float().square().mean()


def step_times(float_model, qat_model, examples, steps: int) -> tuple[float, float]:
    """Median seconds of one training step (forward, loss, backward, SGD step) of each model, interleaved."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (float_model, qat_model)]
    times = ([], [])
    for step in range(steps + 3):
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for which in order:
            model, optimizer = (float_model, qat_model)[which], optimizers[which]
            example = examples[step % len(examples)]
            start = time.perf_counter()
            loss(model, example).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 3:
                times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


class Flat(torch.nn.Module):
    """The float model as the fp32 export sees it: keyword inputs by position, output tensors as a tuple."""

    def __init__(self, model, keywords):
        super().__init__()
        self.model, self.keywords = model, keywords

    def forward(self, *inputs):
        if self.keywords:
            return tuple(output_tensors(self.model(**dict(zip(self.keywords, inputs, strict=True)))))
        return tuple(output_tensors(self.model(*inputs)))


def export_fp32(model, example, path: str) -> None:
    keywords = list(example) if isinstance(example, dict) else []
    inputs = tuple(example.values()) if keywords else (example,)
    names = keywords or ["input_0"]
    count = len(tuple(output_tensors(zoo.run(model, example))))
    outputs = [f"output_{i}" for i in range(count)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Flat(model, keywords),
            inputs,
            path,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [*names, *outputs]},
        )


class Reader(CalibrationDataReader):
    def __init__(self, examples) -> None:
        self.items = iter([feeds(e) for e in examples])

    def get_next(self):
        return next(self.items, None)


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the sessions take turns
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, str], inputs: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, float]:
    sessions = {kind: session(path, threads) for kind, path in paths.items()}
    kinds = list(sessions)
    times = {kind: [] for kind in kinds}
    for run in range(runs + 5):
        for kind in kinds if run % 2 == 0 else kinds[::-1]:
            start = time.perf_counter()
            sessions[kind].run(None, inputs)
            if run >= 5:
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(samples) for kind, samples in times.items()}


def measure(name: str, folder: str, runs: int, threads: int, steps: int) -> dict:
    model, example = zoo.build(name, big=True)
    examples = [batch(example, seed) for seed in range(8)]
    float_model, _ = zoo.build(name, big=True)
    float_model.load_state_dict(model.state_dict())
    config = deployable_config_list(
        8,
        8,
        input_module=test_zoo.FIRST_LAYER.get(name) or zoo.TORCHVISION_FIRST_LAYER[name],
        op_types=test_zoo.LAYERS.get(name, ("Conv2d", "Linear")),
        target="onnxruntime",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers whose input scale is not found keep a float bias, and say so
        quantizer = QATQuantizer(model, config, fuse="auto", integer_bias=True, example_inputs=example)
    float_step, qat_step = step_times(float_model, model, examples, steps)
    float_model.load_state_dict({k: v for k, v in model.state_dict().items() if k in float_model.state_dict()})
    model.eval()
    float_model.eval()
    paths = {kind: os.path.join(folder, f"{name}_{kind}.onnx") for kind in ("fp32", "ort_static", "quantrain")}
    export_fp32(float_model, examples[0], paths["fp32"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            paths["fp32"],
            paths["ort_static"],
            Reader(examples),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    report = export_onnx(model, examples[0], paths["quantrain"])
    checked = check_parity(model, paths["quantrain"], examples[1], float64=True)
    last = test_zoo.LAST_LAYER.get(name)
    scale = model.get_submodule(last).fake_quant["_output_0"].scale.item() if last else math.nan

    def in_steps(output) -> float:  # GPT-2's output indexes its last layer's: that layer's steps
        return output.max_abs_diff / scale if output.max_diff_in_steps is None else output.max_diff_in_steps

    parity = checked.outputs[0]
    if report.weight_dtype != "int8":  # a CPU whose int8-weight kernels saturate: also time the file as ORT stores it
        paths["quantrain_int8"] = os.path.join(folder, f"{name}_quantrain_int8.onnx")
        export_onnx(model, examples[0], paths["quantrain_int8"], weight_dtype="int8")
    median = latencies(paths, feeds(examples[0]), runs, threads)
    return {
        "model": name,
        "float_step_ms": 1000 * float_step,
        "qat_step_ms": 1000 * qat_step,
        "qat_x_float": qat_step / float_step,
        **{f"{kind}_ms": 1000 * value for kind, value in median.items()},
        "ort_static_vs_fp32": median["fp32"] / median["ort_static"],
        "quantrain_vs_fp32": median["fp32"] / median["quantrain"],
        "quantrain_vs_ort_static": median["ort_static"] / median["quantrain"],
        "int8_weights_vs_ort_static": median["ort_static"] / median.get("quantrain_int8", median["quantrain"]),
        "top1_agreement": parity.top1_agreement,
        "parity_steps": in_steps(parity),
        "pytorch_vs_float64_steps": in_steps(checked.pytorch_vs_float64[0]),
        "onnx_vs_float64_steps": in_steps(checked.onnx_vs_float64[0]),
        "op_points": len(quantizer.op_points),
        "notes": report.notes,
        "float_islands": len(report.float_islands),
        "weight_dtype": report.weight_dtype,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model and method")
    available = [*zoo.ZOO, *(zoo.TORCHVISION_FIRST_LAYER if zoo.TORCHVISION_MODELS is not None else ())]
    parser.add_argument("--models", nargs="+", default=available, choices=available)
    parser.add_argument("--json", default="zoo.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(name, folder, args.runs, args.threads, args.steps) for name in args.models]
    print(
        "\n| model | QAT step x float | fp32 ms | ORT static ms | quantrain ms | ORT static vs fp32 | quantrain vs fp32 "
        "| quantrain vs ORT static | int8 weights vs ORT static | parity steps | float32 / ORT vs float64 steps "
        "| float islands |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['qat_x_float']:.2f}x | {r['fp32_ms']:.2f} | {r['ort_static_ms']:.2f} | {r['quantrain_ms']:.2f} "
            f"| {r['ort_static_vs_fp32']:.2f}x | {r['quantrain_vs_fp32']:.2f}x | {r['quantrain_vs_ort_static']:.2f}x "
            f"| {r['int8_weights_vs_ort_static']:.2f}x | {r['parity_steps']:.2f} "
            f"| {r['pytorch_vs_float64_steps']:.0f} / {r['onnx_vs_float64_steps']:.0f} | {r['float_islands']} |"
        )
    ratios = [r["quantrain_vs_ort_static"] for r in rows]
    geomean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    speedups = [r["quantrain_vs_fp32"] for r in rows]
    same_kernels = [r["int8_weights_vs_ort_static"] for r in rows]
    same_geomean = math.exp(sum(math.log(x) for x in same_kernels) / len(same_kernels))
    print(
        f"\nquantrain vs ORT static: geometric mean {geomean:.2f}x, {sum(x >= 1.0 for x in ratios)} of {len(rows)} at or "
        f"above 1.0; quantrain vs fp32: median {statistics.median(speedups):.2f}x, {sum(x > 1.0 for x in speedups)} of "
        f"{len(rows)} faster; with int8 weights as ORT static stores them: geometric mean {same_geomean:.2f}x, "
        f"{sum(x >= 1.0 for x in same_kernels)} of {len(rows)} at or above 1.0. ONNX Runtime {ort.__version__}, "
        f"{args.threads} threads, batch {BATCH}, {args.runs} "
        f"interleaved runs; quantrain's weights stored as {', '.join(sorted({r['weight_dtype'] for r in rows}))} "
        f"(weight_dtype='auto'); {zoo.TORCHVISION_STATUS}; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(
            {"args": vars(args), "rows": rows, "geomean_vs_ort_static": geomean, "onnxruntime": ort.__version__}, f, indent=1
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
