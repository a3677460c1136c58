"""NNI parity: the same models, data and config_lists run through NNI 3.0 and through quantrain, and the two
calibration_configs compared entry by entry.

Each case below is written once, as NNI's examples and documentation write such code (a ``training_func`` that
honours ``max_steps``/``max_epochs``, ``TorchEvaluator`` or ``LightningEvaluator``, ``quantizer.compress(...)``),
and runs twice, each time in its own process: in NNI 3.0's interpreter with NNI's classes, where the optimizers,
schedulers, ``Trainer`` and data module go through ``nni.trace`` as NNI requires, and in this interpreter with
quantrain's, the same code with only the imports changed and ``nni.trace`` dropped (``trace`` is the identity on
that side). Cases:

* ``qat-steps``: QATQuantizer, TorchEvaluator, one SGD optimizer (momentum, weight decay), ``track_forward`` on a
  batch, ``compress(40, None)``, ``quant_start_step=10``; int8 affine per-tensor convolutions, uint8 affine linear
  activations with int8 symmetric ``out_channel`` weights, uint8 symmetric ReLU6 outputs.
* ``qat-epochs``: the same with ``compress(None, 2)``, ``quant_start_step`` = one epoch of steps, a StepLR
  scheduler; int8 symmetric convolutions with ``out_channel`` weights, Linear with its default targets (bias
  included) int8 affine, uint8 affine MaxPool2d outputs.
* ``ptq-train``: PtqQuantizer through a TorchEvaluator whose ``training_func`` really trains (NNI's PtqQuantizer
  lets it train while it tracks ranges, then evaluates, then computes scales) and an ``evaluating_func``,
  ``compress(None, 2)``; a model with an (unfused) BatchNorm, as NNI's PTQ example has.
* ``ptq-then-qat``: PtqQuantizer ``compress(10, None)``, then ``QATQuantizer.from_compressor(ptq, config_list)`` and
  ``compress(20, None)``; one row per stage. With the same config_list NNI 3.0 gives the new QATQuantizer none of
  the targets (a target already configured keeps its first compressor, with a warning), so its second stage is the
  PtqQuantizer going on (running min/max, ``clamp_round``, scales recomputed after the loop); quantrain's QAT takes
  the targets over (moving averages from the PTQ ranges, ``qat_clamp_round``): that row differs.
* ``lightning-qat``: QATQuantizer through LightningEvaluator (a ``LightningModule`` around the model, a
  ``LightningDataModule``, ``pytorch_lightning``), ``Trainer(max_epochs=1)`` and ``compress(None, 2)``: an epoch
  budget, because for a step budget NNI 3.0 assigns ``trainer.fit_loop.max_steps``, which Lightning 2.x no longer
  allows (AttributeError); skipped, with the reason, on a side where ``pytorch_lightning`` does not import.
* ``fuse-names``: QAT with ``fuse_names=[("conv1", "batchnorm1")]``. Expected to differ: quantrain folds
  BatchNorm the paper's way (batch statistics with a correction while BatchNorm trains), NNI with its running
  statistics throughout.

Inputs: this process builds each model from a fixed seed, trains it five epochs in float (plain PyTorch, so QAT
starts from a trained model as in NNI's example) and saves the states together with the data (scikit-learn's
digits, 8x8, shuffled with a fixed seed, 1437 training / 360 test images) with ``torch.save``; both sides load that
file. Each side
runs on CPU with one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), so the results can be identical to
the bit. Every side writes, per case and stage, its calibration_config (tensors as nested lists, with their dtypes),
the trained parameters, the quantizer's step count and the test accuracy after ``compress`` to JSON.

Compared per entry (module, target): every key (scale, zero_point, tracked_min, tracked_max, quant_dtype,
quant_scheme, quant_bits); an entry is bit-identical when both sides have it with the same keys, the same tensor
shapes and dtypes and every value equal. Reported: max abs and max rel difference (``|a - b| / max(|a|, |b|)``) per
entry and per case; the notes compare the trained weights, step counts and accuracies too.

NNI's interpreter: ``--nni-python PATH``, else ``$QUANTRAIN_NNI_PYTHON``, else ``/opt/nni-venv/bin/python`` if it
exists, else this interpreter if ``import nni`` works (``benchmarks/nni_support.py``). Where there is none, the NNI
columns say ``skipped: <reason>`` and only the quantrain side runs (exit status 0).

    python benchmarks/nni_parity.py [--cases qat-steps ...] [--nni-python PATH] [--json nni_parity.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nni_support, next to this script
from nni_support import find_nni_python, worker_env

SCRIPT = os.path.abspath(__file__)
SIDES = ("nni", "quantrain")
TENSOR_KEYS = ("scale", "zero_point", "tracked_min", "tracked_max")
BATCH_SIZE = 64
PRETRAIN_EPOCHS = 5
THREADS = 1
NOTES_ENTRIES = 3  # differing entries named in a row's notes (the JSON has all)


# ---- data and models (both sides) -----------------------------------------------------------------------------


class NaiveModel(nn.Module):
    """NNI's example network, scaled to 8x8 digits: two 3x3 convolutions (16, 32 channels), each followed by ReLU6
    and 2x2 max pooling (the first by a BatchNorm too, with ``batch_norm``), then 128-64-10 fully connected layers
    (ReLU6 between), log-softmax out."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, 1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)
        self.relu1, self.relu2, self.relu3 = nn.ReLU6(), nn.ReLU6(), nn.ReLU6()
        self.max_pool1, self.max_pool2 = nn.MaxPool2d(2, 2), nn.MaxPool2d(2, 2)
        self.batchnorm1 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool1(self.relu1(self.batchnorm1(self.conv1(x))))
        x = self.max_pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


MODELS = {"naive": False, "naive-bn": True}  # name -> batch_norm


def digits_tensors() -> dict[str, torch.Tensor]:
    """scikit-learn's digits in [-1, 1], shuffled with a fixed seed, split 80/20."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    split = len(y) * 4 // 5
    return {"x_train": x[order[:split]], "y_train": y[order[:split]], "x_test": x[order[split:]], "y_test": y[order[split:]]}


def make_inputs(path: str) -> None:
    """The data and each model's float-trained starting state, saved for both sides."""
    torch.set_num_threads(THREADS)
    data = digits_tensors()
    states = {}
    for index, (name, batch_norm) in enumerate(MODELS.items()):
        torch.manual_seed(index)
        model = NaiveModel(batch_norm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(PRETRAIN_EPOCHS):
            for x, y in DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=BATCH_SIZE):
                optimizer.zero_grad()
                F.nll_loss(model(x), y).backward()
                optimizer.step()
        states[name] = model.state_dict()
    torch.save({**data, "states": states}, path)


def load_model(inputs: dict[str, Any], name: str) -> NaiveModel:
    model = NaiveModel(MODELS[name])
    model.load_state_dict(inputs["states"][name])
    return model


@dataclass(frozen=True)
class Loops:
    """A case's training and evaluation code, as NNI's examples write it."""

    training_step: Callable[..., torch.Tensor]
    training_model: Callable[..., None]
    evaluating_model: Callable[[nn.Module], float]
    train_dataloader: DataLoader
    test_dataloader: DataLoader


def make_loops(inputs: dict[str, Any]) -> Loops:
    train_dataloader = DataLoader(TensorDataset(inputs["x_train"], inputs["y_train"]), batch_size=BATCH_SIZE)
    test_dataloader = DataLoader(TensorDataset(inputs["x_test"], inputs["y_test"]), batch_size=1000)

    def training_step(batch, model):
        x, y = batch
        return F.nll_loss(model(x), y)

    def evaluating_model(model):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_dataloader:
                correct += (model(x).argmax(dim=1) == y).sum().item()
        return correct / len(test_dataloader.dataset)

    def training_model(model, optimizer, training_step, scheduler=None, max_steps=None, max_epochs=None):
        # The budget rule of NNI's examples: max_epochs if given; else 1 epoch, or up to 100 when max_steps is given.
        epochs = max_epochs if max_epochs else (100 if max_steps else 1)
        steps = 0
        for _ in range(epochs):
            model.train()
            for batch in train_dataloader:
                optimizer.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizer.step()
                steps += 1
                if max_steps and steps == max_steps:
                    return
            if scheduler is not None:
                scheduler.step()

    return Loops(training_step, training_model, evaluating_model, train_dataloader, test_dataloader)


# ---- the config_lists -----------------------------------------------------------------------------------------

QAT_STEPS_CONFIG = [
    {
        "op_names": ["conv1", "conv2"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
    {
        "op_names": ["fc1", "fc2"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    },
    {"op_names": ["relu1", "relu2", "relu3"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "symmetric"},
]

QAT_EPOCHS_CONFIG = [
    {
        "op_types": ["Conv2d"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "symmetric",
        "target_settings": {"weight": {"quant_dtype": "int8", "granularity": "out_channel"}},  # NNI requires quant_dtype here
    },
    {"op_types": ["Linear"], "quant_dtype": "int8", "quant_scheme": "affine"},  # default targets: bias too
    {"op_types": ["MaxPool2d"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "affine"},
]

PTQ_CONFIG = [
    {"op_names": ["conv2"], "target_names": ["_input_", "weight"], "quant_dtype": "int8", "quant_scheme": "affine"},
    {"op_names": ["relu1", "relu2"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "affine"},
    {"op_names": ["max_pool2"], "target_names": ["_output_"], "quant_dtype": "int8", "quant_scheme": "affine"},
    {
        "op_names": ["conv1"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "symmetric",
        "target_settings": {"weight": {"quant_dtype": "int8", "granularity": "out_channel"}},  # NNI requires quant_dtype here
    },
    {"op_names": ["fc1", "fc2"], "target_names": ["weight", "_output_"], "quant_dtype": "uint8", "quant_scheme": "affine"},
]

PTQ_QAT_CONFIG = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
    }
]

LIGHTNING_CONFIG = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    }
]

FUSE_CONFIG = [
    {
        "op_names": ["conv1"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "fuse_names": [("conv1", "batchnorm1")],
    },
    {
        "op_names": ["conv2", "fc1", "fc2"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
    },
]


# ---- the cases (both sides; `api` holds one library's classes) -------------------------------------------------

Record = Callable[[str, Any, Any, nn.Module, Callable[[nn.Module], float]], None]


class Skip(Exception):
    """A case that cannot run on this side (a missing optional package); the message says why."""


def case_qat_steps(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    loops = make_loops(inputs)
    model = load_model(inputs, "naive")
    loops.evaluating_model(model)  # the float model's accuracy first, as NNI's QAT example does
    optimizer = api.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    evaluator = api.TorchEvaluator(loops.training_model, optimizer, loops.training_step)
    quantizer = api.QATQuantizer(model, QAT_STEPS_CONFIG, evaluator, 10)
    quantizer.track_forward(next(iter(loops.train_dataloader))[0])
    _, calibration_config = quantizer.compress(40, None)
    record("qat", quantizer, calibration_config, model, loops.evaluating_model)


def case_qat_epochs(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    loops = make_loops(inputs)
    model = load_model(inputs, "naive")
    optimizer = api.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = api.trace(torch.optim.lr_scheduler.StepLR)(optimizer, step_size=1, gamma=0.5)
    evaluator = api.TorchEvaluator(loops.training_model, optimizer, loops.training_step, scheduler)
    quantizer = api.QATQuantizer(model, QAT_EPOCHS_CONFIG, evaluator, len(loops.train_dataloader))
    quantizer.track_forward(next(iter(loops.train_dataloader))[0])
    _, calibration_config = quantizer.compress(None, 2)
    record("qat", quantizer, calibration_config, model, loops.evaluating_model)


def case_ptq_train(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    loops = make_loops(inputs)
    model = load_model(inputs, "naive-bn")
    optimizer = api.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.5)
    evaluator = api.TorchEvaluator(loops.training_model, optimizer, loops.training_step, evaluating_func=loops.evaluating_model)
    quantizer = api.PtqQuantizer(model, PTQ_CONFIG, evaluator)
    model, calibration_config = quantizer.compress(None, 2)
    record("ptq", quantizer, calibration_config, model, loops.evaluating_model)


def case_ptq_then_qat(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    loops = make_loops(inputs)
    model = load_model(inputs, "naive")
    optimizer = api.trace(torch.optim.SGD)(model.parameters(), lr=0.05)
    evaluator = api.TorchEvaluator(loops.training_model, optimizer, loops.training_step, evaluating_func=loops.evaluating_model)
    ptq = api.PtqQuantizer(model, PTQ_QAT_CONFIG, evaluator)
    model, calibration_config = ptq.compress(10, None)
    record("ptq", ptq, calibration_config, model, loops.evaluating_model)
    qat = api.QATQuantizer.from_compressor(ptq, PTQ_QAT_CONFIG, quant_start_step=0)
    model, calibration_config = qat.compress(20, None)
    record("qat", qat, calibration_config, model, loops.evaluating_model)


def lightning_classes(pl: Any, inputs: dict[str, Any], trace: Callable) -> tuple[type, type]:
    """A LightningModule around :class:`NaiveModel` and a LightningDataModule of the digits."""

    class DigitsModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = load_model(inputs, "naive")

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.nll_loss(self(x), y)

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("default", (self(x).argmax(dim=1) == y).float().mean())

        def configure_optimizers(self):
            return trace(torch.optim.SGD)(self.parameters(), lr=0.01, momentum=0.9)

    class DigitsDataModule(pl.LightningDataModule):
        def __init__(self, batch_size: int = BATCH_SIZE) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(TensorDataset(inputs["x_train"], inputs["y_train"]), batch_size=self.batch_size)

        def test_dataloader(self):
            return DataLoader(TensorDataset(inputs["x_test"], inputs["y_test"]), batch_size=1000)

    return DigitsModule, DigitsDataModule


def case_lightning_qat(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise Skip(f"pytorch_lightning is not importable in {sys.executable}: {error}") from None
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    loops = make_loops(inputs)
    DigitsModule, DigitsDataModule = lightning_classes(pl, inputs, api.trace)
    model = DigitsModule()
    trainer = api.trace(pl.Trainer)(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    evaluator = api.LightningEvaluator(trainer, api.trace(DigitsDataModule)(batch_size=BATCH_SIZE))
    quantizer = api.QATQuantizer(model, LIGHTNING_CONFIG, evaluator)
    # An epoch budget: NNI 3.0's LightningEvaluator sets trainer.fit_loop.max_steps for a step budget, which Lightning
    # 2.x no longer allows (AttributeError); max_epochs it can still set.
    _, calibration_config = quantizer.compress(None, 2)
    record("qat", quantizer, calibration_config, model, loops.evaluating_model)


def case_fuse_names(api: SimpleNamespace, inputs: dict[str, Any], record: Record) -> None:
    loops = make_loops(inputs)
    model = load_model(inputs, "naive-bn")
    optimizer = api.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)
    evaluator = api.TorchEvaluator(loops.training_model, optimizer, loops.training_step)
    quantizer = api.QATQuantizer(model, FUSE_CONFIG, evaluator)
    _, calibration_config = quantizer.compress(20, None)
    record("qat", quantizer, calibration_config, model, loops.evaluating_model)


CASES: dict[str, Callable[[SimpleNamespace, dict[str, Any], Record], None]] = {
    "qat-steps": case_qat_steps,
    "qat-epochs": case_qat_epochs,
    "ptq-train": case_ptq_train,
    "ptq-then-qat": case_ptq_then_qat,
    "lightning-qat": case_lightning_qat,
    "fuse-names": case_fuse_names,
}
EXPECTED_TO_DIFFER = {
    "fuse-names": "expected to differ: quantrain folds BatchNorm the paper's way, NNI with running statistics",
}


# ---- one side ---------------------------------------------------------------------------------------------------


def load_api(side: str) -> SimpleNamespace:
    """One library's classes under the same names; ``trace`` is ``nni.trace`` for NNI and the identity for
    quantrain, which needs no tracing."""
    if side == "nni":
        import nni
        from nni.compression.quantization import PtqQuantizer, QATQuantizer
        from nni.compression.utils import LightningEvaluator, TorchEvaluator

        logging.getLogger("nni").setLevel(logging.ERROR)
        return SimpleNamespace(
            QATQuantizer=QATQuantizer,
            PtqQuantizer=PtqQuantizer,
            TorchEvaluator=TorchEvaluator,
            LightningEvaluator=LightningEvaluator,
            trace=nni.trace,
            version=nni.__version__,
        )
    import quantrain
    from quantrain import PtqQuantizer, QATQuantizer, TorchEvaluator

    class Lazy(SimpleNamespace):
        @property
        def LightningEvaluator(self):
            return quantrain.LightningEvaluator

    return Lazy(
        QATQuantizer=QATQuantizer,
        PtqQuantizer=PtqQuantizer,
        TorchEvaluator=TorchEvaluator,
        trace=lambda cls: cls,
        version=quantrain.__version__,
    )


def to_json(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def stage_record(quantizer: Any, calibration_config: Any, model: nn.Module, evaluate: Callable[[nn.Module], float]) -> dict:
    """What a stage produced, in JSON form. Read at once: NNI's calibration_config tensors are its live buffers,
    which later training overwrites in place. The accuracy is measured last (on NNI's PtqQuantizer it is one more
    forward whose ranges it tracks)."""
    config = {
        m: {t: {k: to_json(v) for k, v in entry.items()} for t, entry in targets.items()}
        for m, targets in calibration_config.items()
    }
    dtypes = {
        m: {
            t: {k: str(v.dtype).removeprefix("torch.") for k, v in entry.items() if isinstance(v, torch.Tensor)}
            for t, entry in targets.items()
        }
        for m, targets in calibration_config.items()
    }
    parameters: dict[str, Any] = {}
    for name, parameter in model.named_parameters():
        parameters.setdefault(name.replace("_nni_wrapper.", ""), parameter.detach().tolist())  # NNI moves them there
    return {
        "calibration_config": config,
        "dtypes": dtypes,
        "parameters": parameters,
        "current_step": getattr(quantizer, "current_step", None),
        "accuracy": evaluate(model),
    }


def run_side(side: str, case_names: list[str], inputs_path: str) -> dict[str, Any]:
    """Run the cases with one library in this process; returns ``{"side", "environment", "cases"}``."""
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    api = load_api(side)
    inputs = torch.load(inputs_path, weights_only=True)
    cases: dict[str, Any] = {}
    for name in case_names:
        stages: dict[str, Any] = {}

        def record(stage, quantizer, calibration_config, model, evaluate, stages=stages):
            stages[stage] = stage_record(quantizer, calibration_config, model, evaluate)

        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            CASES[name](api, inputs, record)
            cases[name] = {"stages": stages}
        except Skip as reason:
            cases[name] = {"skipped": str(reason)}
        except Exception as error:
            cases[name] = {"stages": stages, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        cases[name]["seconds"] = time.perf_counter() - start
    environment = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        side: api.version,
        "threads": torch.get_num_threads(),
    }
    if side == "quantrain":
        from quantrain.ops import native

        environment["quantrain_native"] = native.status()
    return {"side": side, "environment": environment, "cases": cases}


def run_worker(python: str, side: str, case_names: list[str], inputs_path: str, folder: str, timeout: float) -> dict[str, Any]:
    """:func:`run_side` in a subprocess of ``python``; a side that fails as a whole comes back as ``{"failed": ...}``."""
    out = os.path.join(folder, f"{side}.json")
    command = [python, SCRIPT, "--side", side, "--inputs", inputs_path, "--out", out, "--cases", *case_names]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=worker_env(threads=THREADS))
    except subprocess.TimeoutExpired:
        return {"failed": f"{side} side ran past --timeout {timeout:.0f} s"}
    if done.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"failed": f"{side} side exited with code {done.returncode}", "stderr": tail}
    with open(out, encoding="utf-8") as f:
        return json.load(f)


# ---- the comparison ---------------------------------------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def _flat(value: Any) -> list[float]:
    if isinstance(value, list):
        return [x for item in value for x in _flat(item)]
    return [float(value)]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def compare_values(a: Any, b: Any) -> dict[str, Any]:
    """One key of an entry, ``a`` from NNI and ``b`` from quantrain: numbers (nested lists) by value and shape,
    anything else by equality."""
    numeric = all(isinstance(v, list | int | float) and not isinstance(v, bool) for v in (a, b))
    if not numeric:
        return {"identical": a == b and type(a) is type(b), "nni": a, "quantrain": b}
    shape_a, shape_b = _shape(a), _shape(b)
    if shape_a != shape_b:
        return {"identical": False, "shape": {"nni": shape_a, "quantrain": shape_b}, "max_abs": None, "max_rel": None}
    pairs = list(zip(_flat(a), _flat(b), strict=True))
    identical = all(_same(x, y) for x, y in pairs)
    differences = [(abs(x - y), max(abs(x), abs(y))) for x, y in pairs if not _same(x, y)]
    result = {
        "identical": identical,
        "shape": list(shape_a),
        "max_abs": max((d for d, _ in differences), default=0.0),
        "max_rel": max((d / m if m else math.inf for d, m in differences), default=0.0),
    }
    if not identical:
        result |= {"nni": a, "quantrain": b}
    return result


def compare_configs(
    nni: dict[str, Any], quantrain: dict[str, Any], nni_dtypes: dict | None = None, quantrain_dtypes: dict | None = None
) -> dict[str, Any]:
    """Compare two calibration_configs in JSON form (``{module: {target: {key: value}}}``, tensors as nested lists),
    entry by entry; ``*_dtypes`` (``{module: {target: {key: dtype}}}``), when given, must agree too."""
    entries = []
    for module in sorted(set(nni) | set(quantrain)):
        a_targets, b_targets = nni.get(module, {}), quantrain.get(module, {})
        for target in sorted(set(a_targets) | set(b_targets)):
            entry: dict[str, Any] = {"module": module, "target": target}
            if target not in a_targets or target not in b_targets:
                entry |= {"identical": False, "missing_in": "nni" if target not in a_targets else "quantrain", "keys": {}}
                entries.append(entry)
                continue
            a, b = a_targets[target], b_targets[target]
            keys = {}
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b:
                    keys[key] = {"identical": False, "missing_in": "nni" if key not in a else "quantrain"}
                else:
                    keys[key] = compare_values(a[key], b[key])
            if nni_dtypes is not None and quantrain_dtypes is not None:
                a_types = nni_dtypes.get(module, {}).get(target, {})
                b_types = quantrain_dtypes.get(module, {}).get(target, {})
                for key in set(a_types) | set(b_types):
                    if key in keys and a_types.get(key) != b_types.get(key):
                        keys[key] = {
                            **keys[key],
                            "identical": False,
                            "dtype": {"nni": a_types.get(key), "quantrain": b_types.get(key)},
                        }
            tensor_diffs = [k for k in keys.values() if k.get("max_abs") is not None]
            entry |= {
                "identical": all(k["identical"] for k in keys.values()),
                "max_abs": max((k["max_abs"] for k in tensor_diffs), default=0.0),
                "max_rel": max((k["max_rel"] for k in tensor_diffs), default=0.0),
                "keys": keys,
            }
            entries.append(entry)
    return {
        "entries": entries,
        "count": len(entries),
        "identical": sum(e["identical"] for e in entries),
        "max_abs": max((e.get("max_abs") or 0.0 for e in entries), default=0.0),
        "max_rel": max((e.get("max_rel") or 0.0 for e in entries), default=0.0),
    }


def compare_parameters(nni: dict[str, Any], quantrain: dict[str, Any]) -> dict[str, Any]:
    """The trained weights after ``compress`` (NNI's names without ``_nni_wrapper.``)."""
    names = sorted(set(nni) & set(quantrain))
    compared = {name: compare_values(nni[name], quantrain[name]) for name in names}
    return {
        "identical": all(c["identical"] for c in compared.values()) and set(nni) == set(quantrain),
        "max_abs": max((c["max_abs"] or 0.0 for c in compared.values()), default=0.0),
        "only_nni": sorted(set(nni) - set(quantrain)),
        "only_quantrain": sorted(set(quantrain) - set(nni)),
        "differing": [name for name, c in compared.items() if not c["identical"]],
    }


@dataclass
class Row:
    case: str
    entries: str
    identical: str
    max_abs: str
    notes: str
    comparison: dict[str, Any] | None = None


def _number(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def stage_notes(comparison: dict[str, Any], parameters: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    notes = []
    differing = [e for e in comparison["entries"] if not e["identical"]]
    for entry in differing[:NOTES_ENTRIES]:
        if "missing_in" in entry:
            notes.append(f"{entry['module']}.{entry['target']} missing in {entry['missing_in']}")
        else:
            keys = [key for key, k in entry["keys"].items() if not k["identical"]]
            notes.append(f"{entry['module']}.{entry['target']}: {', '.join(keys)} (rel {_number(entry['max_rel'])})")
    if len(differing) > NOTES_ENTRIES:
        notes.append(f"{len(differing) - NOTES_ENTRIES} more differing entries")
    if comparison["entries"] and not differing:
        notes.append("every key of every entry equal")
    if parameters["identical"]:
        notes.append("trained weights identical")
    else:
        extra = [*parameters["only_nni"], *parameters["only_quantrain"]]
        notes.append(
            f"weights differ in {len(parameters['differing'])} tensors (max abs {_number(parameters['max_abs'])})"
            + (f", unmatched {extra}" if extra else "")
        )
    steps = (a["current_step"], b["current_step"])
    if None not in steps:  # NNI's PtqQuantizer counts no steps
        notes.append(f"steps {steps[0]}" if steps[0] == steps[1] else f"steps NNI {steps[0]}, quantrain {steps[1]}")
    accuracy = (a["accuracy"], b["accuracy"])
    notes.append(
        f"accuracy {accuracy[0]:.4f} both"
        if accuracy[0] == accuracy[1]
        else f"accuracy NNI {accuracy[0]:.4f}, quantrain {accuracy[1]:.4f}"
    )
    return notes


def quantrain_only_notes(stage: dict[str, Any]) -> str:
    step = "" if stage["current_step"] is None else f"steps {stage['current_step']}, "
    return f"quantrain only: {step}accuracy {stage['accuracy']:.4f}"


def compare_sides(
    case_names: list[str], nni: dict[str, Any] | None, quantrain: dict[str, Any], nni_skipped: str | None
) -> list[Row]:
    """One table row per case and stage."""
    rows = []
    for name in case_names:
        q_case = quantrain.get("cases", {}).get(name, {})
        n_case = (nni or {}).get("cases", {}).get(name, {})
        label = name + (" (expected to differ)" if name in EXPECTED_TO_DIFFER else "")
        why_not = None
        if "failed" in quantrain:
            why_not = f"quantrain side failed: {quantrain['failed']}"
        elif "skipped" in q_case or "error" in q_case:
            why_not = f"quantrain: {q_case.get('skipped') or q_case['error']}"
        stages = list(q_case.get("stages", {}))
        counts = {stage: str(sum(map(len, q_case["stages"][stage]["calibration_config"].values()))) for stage in stages}
        if nni_skipped is not None or nni is None or "failed" in (nni or {}):
            reason = nni_skipped or (nni or {}).get("failed") or "no NNI results"
            for stage in stages or [""]:
                notes = why_not or quantrain_only_notes(q_case["stages"][stage])
                rows.append(
                    Row(
                        f"{label} / {stage}" if stage else label,
                        counts.get(stage, "-"),
                        f"skipped: {reason}",
                        f"skipped: {reason}",
                        notes,
                    )
                )
            continue
        if why_not is None and ("skipped" in n_case or "error" in n_case):
            why_not = f"NNI: {n_case.get('skipped') or n_case['error']}"
        if why_not is not None:
            rows.append(Row(label, "-", "-", "-", why_not))
            continue
        for stage in stages:
            if stage not in n_case.get("stages", {}):
                rows.append(Row(f"{label} / {stage}", counts[stage], "-", "-", f"NNI produced no {stage!r} stage"))
                continue
            a, b = n_case["stages"][stage], q_case["stages"][stage]
            comparison = compare_configs(a["calibration_config"], b["calibration_config"], a["dtypes"], b["dtypes"])
            parameters = compare_parameters(a["parameters"], b["parameters"])
            notes = stage_notes(comparison, parameters, a, b)
            if name in EXPECTED_TO_DIFFER:
                notes.insert(0, EXPECTED_TO_DIFFER[name])
            rows.append(
                Row(
                    f"{label} / {stage}",
                    str(comparison["count"]),
                    f"{comparison['identical']}/{comparison['count']}",
                    f"{_number(comparison['max_abs'])} (rel {_number(comparison['max_rel'])})",
                    "; ".join(notes),
                    {"calibration_config": comparison, "parameters": parameters},
                )
            )
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| case | entries | bit-identical | max abs diff | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r.case} | {r.entries} | {r.identical} | {r.max_abs} | {r.notes} |" for r in rows]
    return "\n".join(lines)


def format_differences(rows: list[Row], limit: int = 12) -> list[str]:
    """Each differing entry and key of each row, with its largest differences (at most ``limit`` per row)."""
    lines = []
    for row in rows:
        if row.comparison is None:
            continue
        differing = [e for e in row.comparison["calibration_config"]["entries"] if not e["identical"]]
        for entry in differing[:limit]:
            for key, k in entry["keys"].items():
                if not k["identical"]:
                    detail = f"abs {_number(k['max_abs'])}, rel {_number(k['max_rel'])}" if k.get("max_abs") is not None else ""
                    if k.get("max_abs") is None or k.get("shape") == []:
                        detail = f"NNI {k.get('nni')!r}, quantrain {k.get('quantrain')!r}" + (f" ({detail})" if detail else "")
                    lines.append(f"  {row.case}: {entry['module']}.{entry['target']}.{key}: {detail}")
            if "missing_in" in entry:
                lines.append(f"  {row.case}: {entry['module']}.{entry['target']}: missing in {entry['missing_in']}")
        if len(differing) > limit:
            lines.append(f"  {row.case}: {len(differing) - limit} more differing entries (see --json)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--nni-python", default=None, help="interpreter with NNI 3.0 (default: see the module docstring)")
    parser.add_argument("--json", default="nni_parity.json", help="where to write the full comparison")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each side may run")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a worker: one library, in this interpreter
        result = run_side(args.side, args.cases, args.inputs)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    started = time.perf_counter()
    interpreter = find_nni_python(args.nni_python)
    print(f"NNI: {interpreter.describe()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        inputs_path = os.path.join(folder, "inputs.pt")
        make_inputs(inputs_path)
        quantrain = run_worker(sys.executable, "quantrain", args.cases, inputs_path, folder, args.timeout)
        nni = None
        if interpreter.available:
            nni = run_worker(interpreter.path, "nni", args.cases, inputs_path, folder, args.timeout)
    rows = compare_sides(args.cases, nni, quantrain, None if interpreter.available else interpreter.reason)
    print()
    print(format_table(rows))
    differences = format_differences(rows)
    if differences:
        print("\nDiffering entries:")
        print("\n".join(differences))
    for side, result in (("quantrain", quantrain), ("nni", nni)):
        if result and "failed" in result:
            print(f"\n{side} side failed: {result['failed']}\n{result.get('stderr', '')}")
        for name, case in (result or {}).get("cases", {}).items():
            if "error" in case:
                print(f"\n{side} / {name}: {case['error']}\n{case['traceback']}")
    environments = {side: (result or {}).get("environment") for side, result in (("nni", nni), ("quantrain", quantrain))}
    print(
        f"\n{THREADS} thread per side, {time.perf_counter() - started:.0f} s in all; "
        + "; ".join(f"{side}: {env}" for side, env in environments.items() if env)
    )
    with open(args.json, "w", encoding="utf-8") as f:
        report = {"args": vars(args), "nni_interpreter": interpreter.describe(), "environments": environments}
        rows_json = [
            {"case": r.case, "entries": r.entries, "bit_identical": r.identical, "max_abs": r.max_abs, "notes": r.notes}
            for r in rows
        ]
        json.dump(
            {
                **report,
                "rows": rows_json,
                "comparisons": {r.case: r.comparison for r in rows},
                "sides": {"nni": nni, "quantrain": quantrain},
            },
            f,
            indent=1,
        )
    failed = any(
        "failed" in (result or {}) or any("error" in case for case in (result or {}).get("cases", {}).values())
        for result in (quantrain, nni)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
