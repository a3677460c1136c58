"""Step-overhead benchmark: what one training step of quantization-aware training costs, in time and in memory,
against float training of the same model.

Models (random inputs and integer labels from a fixed seed; cross-entropy loss; SGD, lr 0.01, momentum 0.9):

* ``mlp``: 784-1024-1024-10 with ReLUs, batch 256;
* ``resnet``: a small ResNet-style CNN for 3x32x32 (a conv-BN-ReLU stem, three basic blocks of 32/64/128 channels,
  residual adds as ``quantrain.Add`` modules; ``benchmarks/models.py``), batch 64;
* ``digits``: the demo's CNN for 1x8x8 images (``quantrain.demo.build_model()``), batch 64.

Methods (the columns):

* ``float``: the model as built;
* ``quantrain``: ``QATQuantizer(model, deployable_config_list(8, 8), fuse="auto")``: uint8 affine activations, int8
  symmetric weights with one scale per output channel, BatchNorm folded; resnet also quantizes the outputs of its
  ``Add`` and ``AdaptiveAvgPool2d`` modules;
* ``quantrain-per-tensor``: the same with one weight scale per tensor (granularity ``"default"``);
* ``torch.ao``: torch.ao eager-mode QAT with ``get_default_qat_qconfig("x86")``: conv-BN(-ReLU) and linear-ReLU
  fused by ``fuse_modules_qat``, ``QuantStub``/``DeQuantStub`` around the model, ``prepare_qat``. Eager mode observes
  an addition only through a ``FloatFunctional``, so torch.ao's resnet has each ``quantrain.Add`` replaced by one
  (:class:`FloatFunctionalAdd`), which quantizes the sum as quantrain's config does;
* ``nni``: NNI 3.0's QATQuantizer; skipped, with the reason printed, where ``nni`` is not importable (this benchmark
  has no NNI column yet even where it is);
* with ``--compile``: ``float+compile`` and ``quantrain+compile``, the prepared model wrapped in ``torch.compile``
  (default backend; quantrain's model gets one ``track_forward`` first, which seeds its range observers, or the
  compiled graph breaks and recompiles). A compilation error is recorded in the JSON and printed, not raised.

Protocol: each (model, method) configuration lives in its own worker process (this script, run with ``--worker``),
which sets its torch threads (``--threads``), builds its model from the same seed as the others, prepares it, runs
``--warmup`` training steps (10 more under torch.compile), then waits for commands. Workers are started one after
another and the parent talks to one at a time, so only one process is ever busy. The parent runs ``--rounds`` rounds;
in each it asks every configuration in turn, starting one further along the list each round, for ``--steps`` steps,
and gets back each step's wall time: ``time.perf_counter`` around zero_grad, forward, loss, backward and optimizer
step. Reported: the median step time over all rounds and its ratio to (eager) ``float`` of the same model, both
from the same run.

Memory: each worker reads its resident set size (``/proc/self/statm``) once its model is prepared, just before the
first training step, and its high-water mark (``getrusage``'s ``ru_maxrss``) after the last step. ``train peak MiB``
is the difference: the most memory training ever added on top of the prepared model (gradients, optimizer state,
the activations autograd saves, which under QAT include the fake-quantized tensors, allocator slack, and under
``torch.compile`` the compiler's own memory). It is the process's RSS: whole pages, and memory freed but kept by the
allocator still counts, so small models' numbers are mostly noise, and their ratios more so.

    python benchmarks/step_overhead.py [--models mlp resnet digits] [--rounds 15] [--steps 10] [--threads 2]
        [--compile] [--json step_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from quantrain import Add, QATQuantizer
from quantrain.config.presets import deployable_config_list
from quantrain.demo import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared models next to this script
from models import BasicBlock, mlp, resnet

SCRIPT = os.path.abspath(__file__)

BASE_METHODS = ("float", "quantrain", "quantrain-per-tensor", "torch.ao", "nni")
COMPILED_METHODS = ("float+compile", "quantrain+compile")
COMPILE_EXTRA_WARMUP = 10
LEARNING_RATE, MOMENTUM = 0.01, 0.9


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    output_op_types: tuple[str, ...] = ()  # quantrain quantizes these modules' outputs too


CASES = {
    case.name: case
    for case in (
        Case("mlp", mlp, (256, 784)),
        Case("resnet", resnet, (64, 3, 32, 32), ("Add", "AdaptiveAvgPool2d")),
        Case("digits", build_model, (64, 1, 8, 8)),
    )
}


@dataclass(frozen=True)
class Prepared:
    """A model ready to train, what its preparation made of it, what to report once training is done, and what to
    run on a batch before ``torch.compile`` (see :func:`prepare_quantrain`)."""

    module: nn.Module
    counts: dict[str, int] = field(default_factory=dict)
    report: Callable[[], dict[str, Any]] = dict
    before_compile: Callable[[torch.Tensor], None] = lambda x: None


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    method: str
    steps: int
    median_ms: float
    min_ms: float
    max_ms: float
    x_float: float | None
    baseline_mib: float
    peak_mib: float
    train_peak_mib: float
    x_float_memory: float | None
    warmup_ms: list[float]
    prepared: dict[str, Any]


# ---- the methods --------------------------------------------------------------------------------------------------


def quantrain_config(case: Case, per_tensor: bool = False) -> list[dict]:
    config = deployable_config_list(8, 8, output_op_types=case.output_op_types)
    if per_tensor:
        for entry in config:
            weight = entry.get("target_settings", {}).get("weight")
            if weight is not None:
                weight["granularity"] = "default"  # one scale for the whole tensor
    return config


def prepare_float(model: nn.Module, case: Case) -> Prepared:
    return Prepared(model)


def prepare_quantrain(model: nn.Module, case: Case, per_tensor: bool = False) -> Prepared:
    quantizer = QATQuantizer(model, quantrain_config(case, per_tensor), fuse="auto")
    counts = {
        "quantized_modules": len(quantizer.quantized_modules),
        "fake_quantizers": sum(1 for _ in quantizer.fake_quantizers()),
        "folded_batchnorms": sum(1 for fusion in quantizer.fusions() if fusion.bn is not None),
    }
    # Before torch.compile, one tracking forward seeds every range observer: a fresh observer sizes its buffers on its
    # first batch (a Python flag and resize_), which breaks the graph and recompiles on the next step.
    return Prepared(
        model,
        counts,
        lambda: {"quantizer_steps": quantizer.current_step, "calibrated_modules": len(quantizer.get_calibration_config())},
        quantizer.track_forward,
    )


class FloatFunctionalAdd(FloatFunctional):
    """``quantrain.Add`` for torch.ao: eager-mode QAT observes and fake-quantizes a sum only through FloatFunctional."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.add(a, b)


FUSE_PATTERNS = ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), (nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.ReLU))


def torch_ao_fuse_groups(model: nn.Module) -> list[list[str]]:
    """The names ``fuse_modules_qat`` fuses: conv-BN(-ReLU) and linear-ReLU runs of a Sequential's children, and the
    two conv-BN(-ReLU) chains of each BasicBlock (its forward, not its attribute order, says which)."""
    groups = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, BasicBlock):
            groups += [[f"{dot}conv1", f"{dot}bn1", f"{dot}relu1"], [f"{dot}conv2", f"{dot}bn2"]]
        elif isinstance(module, nn.Sequential):
            names, kinds = list(module._modules), [type(child) for child in module.children()]
            index = 0
            while index < len(names):
                pattern = next((p for p in FUSE_PATTERNS if tuple(kinds[index : index + len(p)]) == p), None)
                if pattern is None:
                    index += 1
                else:
                    groups.append([dot + name for name in names[index : index + len(pattern)]])
                    index += len(pattern)
    return groups


def prepare_torch_ao(model: nn.Module, case: Case) -> Prepared:
    from torch.ao import quantization as tq

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Add):
                setattr(module, name, FloatFunctionalAdd())
    model.train()
    groups = torch_ao_fuse_groups(model)
    wrapped = nn.Sequential(tq.QuantStub(), tq.fuse_modules_qat(model, groups), tq.DeQuantStub())
    wrapped.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(wrapped, inplace=True)
    counts = {
        "fused_groups": len(groups),
        "fake_quantizers": sum(isinstance(m, tq.FakeQuantizeBase) for m in wrapped.modules()),
    }
    return Prepared(wrapped, counts)


PREPARE: dict[str, Callable[[nn.Module, Case], Prepared]] = {
    "float": prepare_float,
    "quantrain": prepare_quantrain,
    "quantrain-per-tensor": lambda model, case: prepare_quantrain(model, case, per_tensor=True),
    "torch.ao": prepare_torch_ao,
}


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if method != "nni":
        return None
    try:
        import nni  # noqa: F401
    except ImportError as error:
        return f"NNI 3.0 not importable ({error}); pip install nni to compare"
    return "NNI is importable, but this benchmark has no NNI column yet"


# ---- the worker ---------------------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def worker(spec: dict[str, Any]) -> None:
    """Build, prepare and warm up one configuration, then answer commands, one JSON line each, on stdout:
    ``{"steps": k}`` -> ``{"times": [...]}`` (seconds); ``{"finish": true}`` -> the peak RSS and the method's report."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to stderr

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(spec["threads"])
        case = CASES[spec["model"]]
        method, compiled = spec["method"].removesuffix("+compile"), spec["method"].endswith("+compile")
        torch.manual_seed(0)
        model = case.build()
        model.train()
        prepared = PREPARE[method](model, case)
        optimizer = torch.optim.SGD(prepared.module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(case.shape, generator=generator)
        y = torch.randint(0, 10, (case.shape[0],), generator=generator)
        module = prepared.module
        if compiled:
            prepared.before_compile(x)
            module = torch.compile(module)
        baseline = resident_bytes()
        warmup = [train_step(module, optimizer, x, y) for _ in range(spec["warmup"])]
        send({"ready": True, "baseline_bytes": baseline, "warmup": warmup, "counts": prepared.counts})
        for line in sys.stdin:
            command = json.loads(line)
            if "steps" in command:
                send({"times": [train_step(module, optimizer, x, y) for _ in range(command["steps"])]})
            else:
                with torch.no_grad():
                    loss = F.cross_entropy(module(x), y).item()
                send({"peak_bytes": peak_resident_bytes(), "report": {**prepared.report(), "final_loss": loss}})
                return
    except Exception as error:
        send({"error": f"{type(error).__name__}: {error}".strip(), "traceback": traceback.format_exc()})


# ---- the parent ---------------------------------------------------------------------------------------------------


class Worker:
    """One configuration's worker process, spoken to in JSON lines."""

    def __init__(self, model: str, method: str, threads: int, warmup: int) -> None:
        self.model, self.method = model, method
        spec = {"model": model, "method": method, "threads": threads, "warmup": warmup}
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, "--worker", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.times: list[float] = []

    def receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            return {"error": f"worker exited with code {self.process.wait()} (its traceback is on stderr)"}
        return json.loads(line)

    def request(self, command: dict[str, Any]) -> dict[str, Any]:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"error": f"worker exited with code {self.process.wait()} (its traceback is on stderr)"}
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


def ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def rows_of(workers: list[Worker], ready: dict, finished: dict) -> list[Row]:
    mib = 2**20
    measured = {}
    for w in workers:
        if (w.model, w.method) in finished:
            train_peak = (finished[w.model, w.method]["peak_bytes"] - ready[w.model, w.method]["baseline_bytes"]) / mib
            measured[w.model, w.method] = (statistics.median(w.times), train_peak)
    rows = []
    for w in workers:
        if (w.model, w.method) not in measured:
            continue
        median, train_peak = measured[w.model, w.method]
        float_median, float_peak = measured.get((w.model, "float"), (None, None))
        start, end = ready[w.model, w.method], finished[w.model, w.method]
        rows.append(
            Row(
                model=w.model,
                batch=CASES[w.model].shape[0],
                method=w.method,
                steps=len(w.times),
                median_ms=1000 * median,
                min_ms=1000 * min(w.times),
                max_ms=1000 * max(w.times),
                x_float=ratio(median, float_median),
                baseline_mib=start["baseline_bytes"] / mib,
                peak_mib=end["peak_bytes"] / mib,
                train_peak_mib=train_peak,
                x_float_memory=ratio(train_peak, float_peak),
                warmup_ms=[1000 * t for t in start["warmup"]],
                prepared={**start["counts"], **end["report"]},
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = ["| model | method | median ms/step | x float | train peak MiB | x float memory |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.model} ({row.batch}) | {row.method} | {row.median_ms:.2f} | {times(row.x_float)} "
            f"| {row.train_peak_mib:.1f} | {times(row.x_float_memory)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=list(BASE_METHODS), choices=[*BASE_METHODS, *COMPILED_METHODS])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=10, help=f"untimed steps first (+{COMPILE_EXTRA_WARMUP} under compile)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    parser.add_argument("--compile", action="store_true", help=f"add the columns {', '.join(COMPILED_METHODS)}")
    parser.add_argument("--json", default="step_overhead.json", help="where to write the results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    methods = list(dict.fromkeys(args.methods + (list(COMPILED_METHODS) if args.compile else [])))
    skipped = {m: reason for m in methods if (reason := unavailable(m))}
    for method, reason in skipped.items():
        print(f"{method} column skipped: {reason}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    errors: list[dict[str, str]] = []
    workers: list[Worker] = []
    ready: dict[tuple[str, str], dict] = {}
    finished: dict[tuple[str, str], dict] = {}

    def failed(w: Worker, reply: dict[str, Any]) -> bool:
        if "error" not in reply:
            return False
        errors.append({"model": w.model, "method": w.method, "error": reply["error"], "traceback": reply.get("traceback", "")})
        print(f"{w.model} / {w.method} failed: {reply['error']}", flush=True)
        return True

    try:
        for model in args.models:
            for method in methods:
                if method in skipped:
                    continue
                warmup = args.warmup + (COMPILE_EXTRA_WARMUP if method.endswith("+compile") else 0)
                w = Worker(model, method, args.threads, warmup)
                workers.append(w)
                reply = w.receive()  # one worker warms up at a time
                if not failed(w, reply):
                    ready[model, method] = reply
        active = [w for w in workers if (w.model, w.method) in ready]
        for round_index in range(args.rounds):
            shift = round_index % len(active) if active else 0
            for w in active[shift:] + active[:shift]:
                reply = w.request({"steps": args.steps})
                if failed(w, reply):
                    del ready[w.model, w.method]
                else:
                    w.times += reply["times"]
            active = [w for w in active if (w.model, w.method) in ready]
        for w in active:
            reply = w.request({"finish": True})
            if not failed(w, reply) and w.times:
                finished[w.model, w.method] = reply
    finally:
        for w in workers:
            w.close()
    rows = rows_of(workers, ready, finished)
    load_after = os.getloadavg()
    print()
    print(format_table(rows))
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads per worker, {os.cpu_count()} CPUs, {args.rounds} rounds of "
        f"{args.steps} steps, {time.perf_counter() - started:.0f} s in all; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    for error in errors:
        print(f"error: {error['model']} / {error['method']}: {error['error']}")
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_before,
        "load_average_end": load_after,
    }
    with open(args.json, "w", encoding="utf-8") as f:
        report = {"args": vars(args), "environment": environment, "skipped": skipped, "errors": errors}
        json.dump({**report, "rows": [asdict(row) for row in rows]}, f, indent=1)
    # A compilation failure is a result; any other failure means the table is missing a column.
    return 1 if any(not e["method"].endswith("+compile") for e in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
