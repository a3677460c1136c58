"""run_demo: float training, a float control and QAT from the same model, then ONNX Runtime, then the files."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantrain.demo.artifacts import Artifacts, prepare_folder, write_model_files
from quantrain.demo.data import check_dataset, load_dataset
from quantrain.demo.model import build_model, demo_config_list
from quantrain.demo.table import LATENCY_BATCH
from quantrain.demo.training import (
    Curves,
    accuracy,
    make_training_func,
    progress_factory,
    steps_per_epoch,
    training_step,
    warm_up,
)
from quantrain.evaluator import TorchEvaluator
from quantrain.qat import QATQuantizer

if TYPE_CHECKING:
    from quantrain.report import TrainingRecorder

__all__ = ["DemoResult", "Deployment", "have_matplotlib", "have_onnx", "run_demo"]


@dataclass(frozen=True)
class Deployment:
    """The int8 model in ONNX Runtime next to the float control exported the same way."""

    int8_accuracy: float
    top1_agreement: float
    int8_latency_ms: float
    float_latency_ms: float
    int8_bytes: int
    float_bytes: int


@dataclass(frozen=True)
class DemoResult:
    """Test accuracies (%), training seconds per phase (after :attr:`warmup_seconds` of untimed warm-up), sizes."""

    float_accuracy: float
    control_accuracy: float
    qat_accuracy: float
    float_seconds: float
    control_seconds: float
    qat_seconds: float
    test_size: int
    bits: int
    qat_epochs: int
    calibration_config: dict
    deployment: Deployment | None = None
    dataset: str = "digits"
    train_size: int = 0
    epochs: int = 10
    warmup_seconds: float = 0.0
    artifacts: Artifacts | None = None

    @property
    def report_path(self) -> str | None:
        return self.artifacts.report if self.artifacts is not None else None


def run_demo(
    *,
    dataset: str = "digits",
    epochs: int = 10,
    qat_epochs: int = 3,
    bits: int = 8,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | None = None,
    train_size: int | None = None,
) -> DemoResult:
    """Train float, then QAT to int<bits>, then (with onnx and onnxruntime installed) export and run it in ONNX Runtime.

    The float control continues training the float model for the same epochs, data order and learning rate as QAT,
    so the QAT accuracy is compared with what those extra epochs alone would give. Before the timed phases a short
    untimed warm-up (:func:`quantrain.demo.training.warm_up`) pays the one-time costs of a first run.

    With ``out_dir`` (checked, and created, before any work) the demo writes its files there
    (:mod:`quantrain.demo.artifacts`: ONNX models, calibration config, checkpoint, quantizer spec, test inputs) and,
    with matplotlib installed, ``report.html``: test accuracy over steps (on up to 2,000 test images, about 20 points
    per phase), the tracked activation ranges at every QAT step and the per-layer SQNR of the final model. Without
    ``out_dir`` the ONNX models go to a temporary folder, removed afterwards. ``train_size`` keeps a seeded subset of
    the training images (default: all digits, 6,000 Fashion-MNIST images).
    """
    check_dataset(dataset)
    folder = prepare_folder(out_dir, "out_dir") if out_dir is not None else None
    recorder = _recorder() if folder is not None and have_matplotlib() else None
    x_train, y_train, x_test, y_test = load_dataset(dataset, seed, train_size)
    bar = progress_factory(progress)
    warmup_seconds = warm_up(dataset, x_train, y_train, bits)
    torch.manual_seed(seed)
    model = build_model(dataset)
    per_epoch = steps_per_epoch(len(y_train))
    phases = _Phases(x_train, y_train, bar, Curves(recorder, x_test, y_test, per_epoch) if recorder is not None else None)
    float_steps = epochs * per_epoch

    with phases.timer() as timed:
        phases.train("float", model, torch.optim.Adam(model.parameters(), lr=2e-3), epochs, 0, seed)
    float_seconds, float_accuracy = timed.seconds, accuracy(model, x_test, y_test)
    with phases.timer() as timed:
        control = copy.deepcopy(model)
        optimizer = torch.optim.Adam(control.parameters(), lr=5e-4)
        phases.train("float control", control, optimizer, qat_epochs, float_steps, seed + 1)
    control_seconds, control_accuracy = timed.seconds, accuracy(control, x_test, y_test)
    with phases.timer() as timed:
        quantizer, calibration_config = _qat(model, bits, qat_epochs, per_epoch, phases, float_steps, seed + 1)
    qat_seconds, qat_accuracy = timed.seconds, accuracy(model, x_test, y_test)

    deployment, onnx_paths = _deploy(model, control, x_test, y_test, folder, dataset) if have_onnx() else (None, (None, None))
    result = DemoResult(
        float_accuracy=float_accuracy,
        control_accuracy=control_accuracy,
        qat_accuracy=qat_accuracy,
        float_seconds=float_seconds,
        control_seconds=control_seconds,
        qat_seconds=qat_seconds,
        test_size=len(y_test),
        bits=bits,
        qat_epochs=qat_epochs,
        calibration_config=calibration_config,
        deployment=deployment,
        dataset=dataset,
        train_size=len(y_train),
        epochs=epochs,
        warmup_seconds=warmup_seconds,
    )
    if folder is None:
        return result
    return _with_files(result, folder, model, quantizer, x_test, onnx_paths, recorder, float_steps)


def _recorder() -> TrainingRecorder:
    from quantrain.report import TrainingRecorder

    return TrainingRecorder()


@dataclass
class _Phases:
    """What the three training phases share: the training data, the progress bars and the accuracy curves."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    bar: Callable
    curves: Curves | None

    def training_func(self, name: str, epochs: int, offset: int, seed: int, model: nn.Module) -> Callable:
        """The phase's training_func; with curves, the phase's first point (at step ``offset``) is recorded now."""
        if self.curves is not None:
            self.curves.point(name, offset, model)
        on_step = self.curves.phase(name, epochs, offset) if self.curves is not None else None
        return make_training_func(self.x_train, self.y_train, seed, lambda total: self.bar(total, name), on_step)

    def train(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, offset: int, seed: int) -> None:
        self.training_func(name, epochs, offset, seed, model)(model, optimizer, training_step, None, None, epochs)

    def timer(self) -> _Timer:
        return _Timer(self.curves)


class _Timer:
    """Wall time of a ``with`` block less the time the curves spent evaluating in it (``seconds``)."""

    def __init__(self, curves: Curves | None) -> None:
        self.curves = curves
        self.seconds = 0.0

    def _evaluating(self) -> float:
        return self.curves.seconds if self.curves is not None else 0.0

    def __enter__(self) -> _Timer:
        self._start = time.perf_counter() - self._evaluating()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start - self._evaluating()


def _qat(
    model: nn.Module, bits: int, qat_epochs: int, per_epoch: int, phases: _Phases, offset: int, seed: int
) -> tuple[QATQuantizer, dict]:
    """QAT of ``model`` in place, driven by ``compress()``; returns the quantizer and its calibration config."""
    name = f"int{bits} QAT (fake-quant)"
    evaluator = TorchEvaluator(
        phases.training_func(name, qat_epochs, offset, seed, model),
        torch.optim.Adam(model.parameters(), lr=5e-4),
        training_step,
        dummy_input=phases.x_train[:2],  # the example from which quantrain captures the model's graph
    )
    # fuse="auto" folds each BatchNorm (and the ReLU after it) into its convolution, as an integer engine runs it;
    # BatchNorm statistics freeze for the last fifth of QAT, so the end of training sees the deployed arithmetic;
    # integer_bias adds each bias on the int32 grid ONNX Runtime uses, so the exported model computes the same logits.
    steps = qat_epochs * per_epoch
    quantizer = QATQuantizer(
        model, demo_config_list(bits), evaluator, fuse="auto", freeze_bn_step=steps * 4 // 5, integer_bias=True
    )
    recorder = phases.curves.recorder if phases.curves is not None else None
    if recorder is not None:
        recorder.watch(quantizer, step_offset=offset)  # tracked ranges at every QAT step, on the curves' step axis
    try:
        _, calibration_config = quantizer.compress(max_steps=None, max_epochs=qat_epochs)
    finally:
        if recorder is not None:
            recorder.close()
    return quantizer, calibration_config


def _with_files(
    result: DemoResult,
    folder: str,
    model: nn.Module,
    quantizer: QATQuantizer,
    x_test: torch.Tensor,
    onnx_paths: tuple[str | None, str | None],
    recorder: TrainingRecorder | None,
    qat_start: int,
) -> DemoResult:
    """``result`` with the files written into ``folder`` (the report last: it shows the finished table)."""
    from quantrain.demo.report import write_demo_report

    files = write_model_files(folder, result.dataset, model, quantizer, result.calibration_config, x_test, result.bits)
    files = dataclasses.replace(files, int8_onnx=onnx_paths[0], fp32_onnx=onnx_paths[1])
    result = dataclasses.replace(result, artifacts=files)
    if recorder is None:
        return result
    report = write_demo_report(folder, result, recorder, quantizer, x_test, qat_start)
    return dataclasses.replace(result, artifacts=dataclasses.replace(files, report=report))


def have_onnx() -> bool:
    """Whether onnx and onnxruntime are installed (the ONNX export and its rows need both)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (the report's plots need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _deploy(
    model: nn.Module, control: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, folder: str | None, dataset: str
) -> tuple[Deployment, tuple[str | None, str | None]]:
    """Export the QAT model (int8 QDQ) and the float control (fp32), run both in ONNX Runtime on the test set.

    Returns the numbers and the two files' paths (``None`` without ``folder``: a temporary folder, removed)."""
    with contextlib.ExitStack() as stack:
        where = folder if folder is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="quantrain-demo-"))
        paths = os.path.join(where, f"{dataset}_int8.onnx"), os.path.join(where, f"{dataset}_fp32.onnx")
        deployment = _export_and_measure(model, control, x_test, y_test, *paths)
    return deployment, (paths if folder is not None else (None, None))


def _export_and_measure(
    model: nn.Module, control: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, int8_path: str, float_path: str
) -> Deployment:
    import warnings

    import onnxruntime as ort

    from quantrain.deploy import check_parity, export_onnx

    export_onnx(model, x_test[:2], int8_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            control.eval(),
            (x_test[:2],),
            float_path,
            dynamo=False,
            input_names=["input_0"],
            output_names=["output_0"],
            dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}},
        )
    sessions = [ort.InferenceSession(path, providers=["CPUExecutionProvider"]) for path in (int8_path, float_path)]
    feed = {"input_0": x_test[:LATENCY_BATCH].numpy()}
    times: list[list[float]] = [[], []]
    for run in range(40):  # interleaved, so that drift on a shared machine hits both alike
        for index in (run % 2, 1 - run % 2):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append(time.perf_counter() - start)
    logits = sessions[0].run(None, {"input_0": x_test.numpy()})[0]
    parity = check_parity(model, int8_path, x_test).outputs[0]
    return Deployment(
        int8_accuracy=100.0 * float((logits.argmax(1) == y_test.numpy()).mean()),
        top1_agreement=100.0 * (parity.top1_agreement or 0.0),
        int8_latency_ms=1000 * statistics.median(times[0][4:]),
        float_latency_ms=1000 * statistics.median(times[1][4:]),
        int8_bytes=os.path.getsize(int8_path),
        float_bytes=os.path.getsize(float_path),
    )
