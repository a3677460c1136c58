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
* ``quantrain-pytorch-ops``: ``quantrain`` without its native CPU kernels (``QUANTRAIN_NATIVE=0``): the same numbers
  from PyTorch operations, as where no C compiler is found;
* ``torch.ao``: torch.ao eager-mode QAT with ``get_default_qat_qconfig("x86")``: conv-BN(-ReLU) and linear-ReLU
  fused by ``fuse_modules_qat``, ``QuantStub``/``DeQuantStub`` around the model, ``prepare_qat``. Eager mode observes
  an addition only through a ``FloatFunctional``, so torch.ao's resnet has each ``quantrain.Add`` replaced by one
  (:class:`FloatFunctionalAdd`), which quantizes the sum as quantrain's config does;
* ``nni``: NNI 3.0's QATQuantizer on the same layout: quantrain's config_list (``Add`` and ``AdaptiveAvgPool2d``
  registered with NNI's ``QuantizationSetting``, which NNI requires for module types it has no settings for),
  BatchNorm and ReLU folded by ``fuse_names`` groups (the torch.ao column's, :func:`torch_ao_fuse_groups`), SGD built
  by ``nni.trace`` and re-created by NNI's ``TorchEvaluator``, whose ``training_func`` is this worker's loop, run by
  ``quantizer.compress``. It runs in an interpreter with NNI (``--nni-python PATH``, else ``$QUANTRAIN_NNI_PYTHON``,
  else ``/opt/nni-venv/bin/python`` if it exists, else this one if ``import nni`` works; see
  ``benchmarks/nni_support.py``), with this checkout's ``src`` on ``PYTHONPATH`` only so that this script (which
  imports quantrain for its models) loads there; skipped, with the reason printed, where no such interpreter is
  found;
* with ``--compile``: ``float+compile`` and ``quantrain+compile``, the prepared model wrapped in ``torch.compile``
  (default backend), compiled fresh as a user would. While a folded BatchNorm is live (no ``freeze_bn_step`` here),
  quantrain runs that layer eagerly inside the compiled model (a graph break per conv-BN layer; compiled, AOT autograd
  would get its gradients wrong). A compilation error is recorded in the JSON and printed, not raised.


Protocol: each (model, method) configuration lives in its own worker process (this script, run with ``--worker``),
which sets its torch threads (``--threads``), builds its model from the same seed as the others, prepares it, runs
``--warmup`` training steps (10 more under torch.compile), then waits for commands. Workers are started one after
another and the parent talks to one at a time, so only one process is ever busy. The parent runs ``--rounds`` rounds;
in each it asks every configuration in turn, starting one further along the list each round, for ``--steps`` steps,
and gets back each step's wall time: ``time.perf_counter`` around zero_grad, forward, loss, backward and optimizer
step. Reported: the median step time over all rounds and its ratio to (eager) ``float`` of the same model, both
from the same run.

Memory, two ways.

* Deterministic, from the tensors themselves: the last warm-up step runs its forward and loss under
  ``torch.autograd.graph.saved_tensors_hooks`` (:func:`saved_for_backward`); the step is otherwise the timed one.
  ``saved MiB`` is the bytes of the tensors autograd keeps for backward at the end of that forward: each saved
  tensor's untyped storage counted once (by its data pointer), ``untyped_storage().nbytes()``, only those still held
  by the graph when the forward returns, and not the model's parameters' storages (views such as ``weight.t()``
  included), which exist anyway, as much in float as under QAT. What QAT adds there: the fake-quantized copies a
  layer saves in place of its weight (float32; its input's copy replaces the float input), the straight-through masks
  (one bool per element of each fake-quantized tensor that needs a gradient), and what its extra ops keep (a fused
  layer's ReLU module, applied again to the quantized output, keeps its own output). ``peak tensor MiB`` adds the
  parameters, their gradients and the optimizer's state (SGD's momentum) after that step, each storage counted once:
  a deterministic estimate of peak training memory (an upper bound of what these tensors need at once; the gradients
  grow while backward frees the saved tensors), without buffers (running statistics, observers' ranges and qparams),
  the backward's temporaries or the allocator. ``x float tensors`` is its ratio to ``float`` of the same model. The
  JSON also has the bytes of each part (``tensor_bytes``) and the largest saved storages (``saved_top``: size, shape,
  dtype, the ``grad_fn`` that made the tensor and the autograd nodes that keep it, from a walk of the graph). Under
  ``torch.compile`` the hooks see what the compiled graph's autograd function saves (its partitioner decides what to
  keep and what to recompute); if the measured step recompiles or breaks the graph (the hooks then changed what
  runs), the numbers are null, with the reason in ``saved_note``; they are also null with ``--warmup 0`` (no step to
  measure).
* The process's: each worker reads its resident set size (``/proc/self/statm``) once its model is prepared, just
  before the first training step, and its high-water mark (``getrusage``'s ``ru_maxrss``) after the last step.
  ``RSS train peak MiB`` (``train_peak_mib`` in the JSON, its ratio ``x_float_memory``) is the difference: the most
  memory training ever added on top of the prepared model (gradients, optimizer state, the saved activations,
  allocator slack, and under ``torch.compile`` the compiler's own memory). It counts whole pages, and memory freed but
  kept by the allocator, so small models' numbers are mostly noise, and their ratios more so.

    python benchmarks/step_overhead.py [--models mlp resnet digits] [--rounds 15] [--steps 10] [--threads 2]
        [--compile] [--nni-python PATH] [--json step_overhead.json]
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
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from quantrain import Add, QATQuantizer
from quantrain.config.presets import deployable_config_list
from quantrain.demo import build_model
from quantrain.ops import native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared models next to this script
from models import BasicBlock, mlp, resnet
from nni_support import NniPython, find_nni_python, worker_env

SCRIPT = os.path.abspath(__file__)

BASE_METHODS = ("float", "quantrain", "quantrain-per-tensor", "quantrain-pytorch-ops", "torch.ao", "nni")
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
    """A model ready to train, what its preparation made of it, and what to report once training is done."""

    module: nn.Module
    counts: dict[str, int] = field(default_factory=dict)
    report: Callable[[], dict[str, Any]] = dict
    # How the training runs: None calls it directly with the worker's optimizer; NNI's hands it to its evaluator,
    # which calls it back with the optimizer NNI re-created for the wrapped model.
    drive: Callable[[Callable[[torch.optim.Optimizer], None]], None] | None = None


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
    saved_mib: float | None
    peak_tensor_mib: float | None
    x_float_peak_tensor: float | None
    tensor_bytes: dict[str, int] | None
    saved_top: list[dict[str, Any]]
    saved_note: str | None
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
    quantizer = QATQuantizer(
        model, quantrain_config(case, per_tensor), fuse="auto", example_inputs=torch.zeros(2, *case.shape[1:])
    )
    counts = {
        "quantized_modules": len(quantizer.quantized_modules),
        "fake_quantizers": sum(1 for _ in quantizer.fake_quantizers()),
        "folded_batchnorms": sum(1 for fusion in quantizer.fusions() if fusion.bn is not None),
    }
    return Prepared(
        model,
        counts,
        lambda: {"quantizer_steps": quantizer.current_step, "calibrated_modules": len(quantizer.get_calibration_config())},
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


def nni_config(model: nn.Module, case: Case) -> list[dict]:
    """quantrain's config_list for NNI: the same entries, the conv/linear one with the ``fuse_names`` groups that
    ``fuse="auto"`` finds (NNI folds only what it is told)."""
    config = quantrain_config(case)
    groups = [tuple(group) for group in torch_ao_fuse_groups(model)]
    for entry in config:
        if "weight" in entry["target_names"]:
            entry["fuse_names"] = groups
    return config


def prepare_nni(model: nn.Module, case: Case) -> Prepared:
    import nni
    from nni.compression.base.setting import QuantizationSetting
    from nni.compression.quantization import QATQuantizer
    from nni.compression.utils import TorchEvaluator

    for op_type in case.output_op_types:  # NNI quantizes only the module types it has settings for
        if op_type not in QuantizationSetting.registry:
            QuantizationSetting.register(op_type, QuantizationSetting.activation_setting)
    body: list[Callable[[torch.optim.Optimizer], None]] = []

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        body[0](optimizers)  # the worker's warm-up and timed steps, with the optimizer NNI re-created

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    quantizer = QATQuantizer(model, nni_config(model, case), TorchEvaluator(training_func, optimizer, training_step))
    wrappers = [m._nni_wrapper for m in model.modules() if getattr(m, "_nni_wrapper", None) is not None]
    counts = {
        "quantized_modules": sum(1 for w in wrappers if w.quantization_target_spaces),
        "fake_quantizers": sum(len(w.quantization_target_spaces) for w in wrappers),
        "folded_batchnorms": sum(isinstance(f, nn.BatchNorm2d | nn.BatchNorm1d) for w in wrappers for f in w.fused_modules),
    }

    def drive(run: Callable[[torch.optim.Optimizer], None]) -> None:
        body.append(run)
        quantizer.compress(None, 1)  # the budget is the worker's commands; training_func ignores it

    return Prepared(
        model,
        counts,
        lambda: {"quantizer_steps": quantizer.current_step, "calibrated_modules": len(quantizer.get_calibration_config())},
        drive,
    )


PREPARE: dict[str, Callable[[nn.Module, Case], Prepared]] = {
    "float": prepare_float,
    "quantrain": prepare_quantrain,
    "quantrain-per-tensor": lambda model, case: prepare_quantrain(model, case, per_tensor=True),
    "quantrain-pytorch-ops": prepare_quantrain,  # its worker runs with QUANTRAIN_NATIVE=0
    "torch.ao": prepare_torch_ao,
    "nni": prepare_nni,  # its worker runs in NNI's interpreter
}


def unavailable(method: str, nni_python: NniPython | None) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if method != "nni":
        return None
    return "no NNI interpreter looked for" if nni_python is None else nni_python.reason


# ---- a training step ----------------------------------------------------------------------------------------------


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


# ---- the tensors autograd saves -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedStorage:
    """One storage autograd keeps for backward: its size, the first tensor seen on it, and who keeps it."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    made_by: str  # the saved tensor's grad_fn ("leaf": a tensor that requires grad; "no grad": data, masks)
    saved_by: tuple[str, ...]  # "Node.attribute" of each autograd node holding it

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "mib": self.nbytes / 2**20, "shape": list(self.shape), "saved_by": list(self.saved_by)}


class _Packed:
    """What the pack hook hands autograd: the saved tensor, behind an object only the graph holds, so that a weak
    reference to it says whether the graph still keeps the tensor."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def saved_by_nodes(root: Any) -> dict[int, list[str]]:
    """Storage key -> ``"Node.attribute"`` of each node of the autograd graph under ``root`` that saves a tensor on
    it (built-in nodes expose their saved tensors as ``_saved_<name>``, custom and compiled functions as
    ``saved_tensors``)."""
    names: dict[int, list[str]] = {}
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attribute in dir(node):
            if not (attribute.startswith("_saved_") or attribute == "saved_tensors"):
                continue
            try:
                value = getattr(node, attribute)
            except Exception:  # a saved value that cannot be read back here
                continue
            values = value if isinstance(value, tuple | list) else (value,)
            for index, tensor in enumerate(values):
                if isinstance(tensor, torch.Tensor):
                    label = attribute.removeprefix("_saved_") + (f"[{index}]" if len(values) > 1 else "")
                    names.setdefault(storage_key(tensor), []).append(f"{type(node).__name__}.{label}")
        stack.extend(child for child, _ in node.next_functions)
    return names


def saved_for_backward(
    forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> tuple[torch.Tensor, list[SavedStorage]]:
    """Run ``forward`` (a forward and its loss) under saved-tensor hooks; return its result and the storages the
    autograd graph keeps for backward once it has returned, largest first: each counted once (tensors sharing a
    storage, such as ``weight`` and ``weight.t()``, are one), storages of ``exclude`` (the parameters) left out.
    Tensors saved by nodes freed during the forward (a branch cut by ``detach``) are not counted."""
    excluded = {storage_key(tensor) for tensor in exclude}
    packed: list[tuple[weakref.ref, int, SavedStorage]] = []  # no references to the tensors: backward frees them

    def pack(tensor: torch.Tensor) -> _Packed:
        holder = _Packed(tensor)
        grad_fn = tensor.grad_fn
        made_by = type(grad_fn).__name__ if grad_fn is not None else "leaf" if tensor.requires_grad else "no grad"
        dtype = str(tensor.dtype).removeprefix("torch.")
        storage = SavedStorage(tensor.untyped_storage().nbytes(), tuple(tensor.shape), dtype, made_by, ())
        packed.append((weakref.ref(holder), storage_key(tensor), storage))
        return holder

    def unpack(holder: _Packed) -> torch.Tensor:
        return holder.tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = forward()
    saved_by = saved_by_nodes(out.grad_fn)
    storages: dict[int, SavedStorage] = {}
    for holder, key, storage in packed:
        if holder() is not None and key not in excluded and key not in storages:
            storages[key] = replace(storage, saved_by=tuple(saved_by.get(key, ())))
    return out, sorted(storages.values(), key=lambda storage: -storage.nbytes)


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages of ``tensors`` not in ``seen`` (which gets them), each counted once."""
    total = 0
    for tensor in tensors:
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def compile_counters() -> tuple[int, ...]:
    """Frames compiled, graphs made and graph breaks so far: a step that changes them did not run what was timed."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


SAVED_TOP = 8  # the largest saved storages each JSON row lists


@dataclass
class Setup:
    """One configuration ready to train: what :func:`train_step` and :func:`measured_step` run."""

    prepared: Prepared
    module: nn.Module  # prepared.module, or it compiled
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    compiled: bool


def setup(model: str, method: str) -> Setup:
    """Build ``model`` from the shared seed, prepare it for ``method`` (``+compile``: wrapped in torch.compile)."""
    case = CASES[model]
    base, compiled = method.removesuffix("+compile"), method.endswith("+compile")
    torch.manual_seed(0)
    built = case.build()
    built.train()
    prepared = PREPARE[base](built, case)
    optimizer = torch.optim.SGD(prepared.module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.shape, generator=generator)
    y = torch.randint(0, 10, (case.shape[0],), generator=generator)
    module = prepared.module
    if compiled:
        module = torch.compile(module)
    return Setup(prepared, module, optimizer, x, y, compiled)


def measured_step(s: Setup) -> tuple[float, dict[str, Any]]:
    """One training step as :func:`train_step` (its time includes the measuring), with the forward and loss under
    :func:`saved_for_backward`; returns the time and the tensor memory: ``saved_bytes``, ``tensor_bytes`` (saved,
    parameters, gradients, optimizer state and their sum ``peak``), ``saved_top`` and ``saved_note``."""
    parameters = list(s.prepared.module.parameters())
    before = compile_counters() if s.compiled else None
    start = time.perf_counter()
    s.optimizer.zero_grad(set_to_none=True)
    loss, saved = saved_for_backward(lambda: F.cross_entropy(s.module(s.x), s.y), parameters)
    loss.backward()
    s.optimizer.step()
    seconds = time.perf_counter() - start
    if s.compiled and compile_counters() != before:
        note = "the step under saved_tensors_hooks recompiled or broke the compiled graph: not what is timed"
        return seconds, {"saved_bytes": None, "tensor_bytes": None, "saved_top": [], "saved_note": note}
    seen: set[int] = set()
    parts = {
        "saved": sum(storage.nbytes for storage in saved),  # disjoint from the rest: see saved_for_backward
        "parameters": storage_bytes(parameters, seen),
        "gradients": storage_bytes((p.grad for p in parameters if p.grad is not None), seen),
        "optimizer_state": storage_bytes(
            (t for state in s.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)), seen
        ),
    }
    memory = {
        "saved_bytes": parts["saved"],
        "tensor_bytes": {**parts, "peak": sum(parts.values())},
        "saved_top": [storage.as_json() for storage in saved[:SAVED_TOP]],
        "saved_note": "compiled: what the compiled autograd function saves" if s.compiled else None,
    }
    return seconds, memory


# ---- the worker ---------------------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(spec: dict[str, Any]) -> None:
    """Build, prepare and warm up one configuration (measuring its saved tensors in the last warm-up step), then
    answer commands, one JSON line each, on stdout: ``{"steps": k}`` -> ``{"times": [...]}`` (seconds);
    ``{"finish": true}`` -> the peak RSS and the method's report."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to stderr

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(spec["threads"])
        s = setup(spec["model"], spec["method"])

        def session(optimizer: torch.optim.Optimizer) -> None:
            s.optimizer = optimizer
            module, x, y = s.module, s.x, s.y
            baseline = resident_bytes()
            warmup = [train_step(module, optimizer, x, y) for _ in range(spec["warmup"] - 1)]
            memory = {"saved_bytes": None, "tensor_bytes": None, "saved_top": [], "saved_note": "--warmup 0: no step measured"}
            if spec["warmup"] > 0:
                seconds, memory = measured_step(s)
                warmup.append(seconds)
            send({"ready": True, "baseline_bytes": baseline, "warmup": warmup, "counts": s.prepared.counts, "memory": memory})
            for line in sys.stdin:
                command = json.loads(line)
                if "steps" in command:
                    send({"times": [train_step(module, optimizer, x, y) for _ in range(command["steps"])]})
                else:
                    with torch.no_grad():
                        loss = F.cross_entropy(module(x), y).item()
                    send({"peak_bytes": peak_resident_bytes(), "report": {**s.prepared.report(), "final_loss": loss}})
                    return

        if s.prepared.drive is None:
            session(s.optimizer)
        else:
            s.prepared.drive(session)
    except Exception as error:
        send({"error": f"{type(error).__name__}: {error}".strip(), "traceback": traceback.format_exc()})


# ---- the parent ---------------------------------------------------------------------------------------------------


class Worker:
    """One configuration's worker process, spoken to in JSON lines."""

    def __init__(self, model: str, method: str, threads: int, warmup: int, python: str = sys.executable) -> None:
        self.model, self.method = model, method
        spec = {"model": model, "method": method, "threads": threads, "warmup": warmup}
        env = None
        if method == "quantrain-pytorch-ops":
            env = {**os.environ, "QUANTRAIN_NATIVE": "0"}
        elif method == "nni":
            env = worker_env(with_quantrain_source=True)
        self.process = subprocess.Popen(
            [python, SCRIPT, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
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
            tensor_bytes = ready[w.model, w.method]["memory"]["tensor_bytes"]
            peak_tensor = None if tensor_bytes is None else tensor_bytes["peak"] / mib
            measured[w.model, w.method] = (statistics.median(w.times), train_peak, peak_tensor)
    rows = []
    for w in workers:
        if (w.model, w.method) not in measured:
            continue
        median, train_peak, peak_tensor = measured[w.model, w.method]
        float_median, float_peak, float_peak_tensor = measured.get((w.model, "float"), (None, None, None))
        start, end = ready[w.model, w.method], finished[w.model, w.method]
        memory = start["memory"]
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
                saved_mib=None if memory["saved_bytes"] is None else memory["saved_bytes"] / mib,
                peak_tensor_mib=peak_tensor,
                x_float_peak_tensor=None if peak_tensor is None else ratio(peak_tensor, float_peak_tensor),
                tensor_bytes=memory["tensor_bytes"],
                saved_top=memory["saved_top"],
                saved_note=memory["saved_note"],
                warmup_ms=[1000 * t for t in start["warmup"]],
                prepared={**start["counts"], **end["report"]},
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "| model | method | median ms/step | x float | saved MiB | peak tensor MiB | x float tensors "
        "| RSS train peak MiB | x float RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} ({row.batch}) | {row.method} | {row.median_ms:.2f} | {times(row.x_float)} "
            f"| {mib(row.saved_mib)} | {mib(row.peak_tensor_mib)} | {times(row.x_float_peak_tensor)} "
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
    parser.add_argument("--nni-python", default=None, help="interpreter with NNI 3.0 for the nni column (see the docstring)")
    parser.add_argument("--json", default="step_overhead.json", help="where to write the results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    methods = list(dict.fromkeys(args.methods + (list(COMPILED_METHODS) if args.compile else [])))
    nni_python = find_nni_python(args.nni_python) if "nni" in methods else None
    if nni_python is not None and nni_python.available:
        print(f"nni column: {nni_python.describe()}")
    skipped = {m: reason for m in methods if (reason := unavailable(m, nni_python))}
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
                python = nni_python.path if method == "nni" else sys.executable
                w = Worker(model, method, args.threads, warmup, python)
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
    for row in rows:
        if row.saved_mib is None:
            print(f"no saved MiB for {row.model} / {row.method}: {row.saved_note}")
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
        "quantrain_native": native.status(),
        "nni": None if nni_python is None else nni_python.describe(),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        report = {"args": vars(args), "environment": environment, "skipped": skipped, "errors": errors}
        json.dump({**report, "rows": [asdict(row) for row in rows]}, f, indent=1)
    # A compilation failure is a result; any other failure means the table is missing a column.
    return 1 if any(not e["method"].endswith("+compile") for e in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
