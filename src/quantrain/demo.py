"""The demo: train a small CNN in float, then quantization-aware train it to int8, export it and run it in ONNX Runtime.

Two datasets, neither downloaded at run time:

* ``digits``: scikit-learn's bundled 8x8 digits (1,437 training and 360 test images);
* ``fashion-mnist``: 28x28 Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (files under
  ``/usr/share/datasets/fashion-mnist``); to keep the demo fast it trains on a seeded subset of 6,000 of the 60,000
  training images (``train_size``) and tests on all 10,000 test images.

With ``out_dir`` it also writes a report there (:mod:`quantrain.report`): test accuracy over steps for float
training, the float control and QAT, the tracked activation ranges over QAT, per-layer SQNR, and the final table.
Run it with ``quantrain demo``.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantrain.config.presets import deployable_config_list
from quantrain.evaluator import TorchEvaluator
from quantrain.qat import QATQuantizer

if TYPE_CHECKING:
    from quantrain.report import TrainingRecorder

__all__ = [
    "DATASETS",
    "DemoResult",
    "build_model",
    "demo_config_list",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "run_demo",
]

BATCH_SIZE = 64
DATASETS = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_TRAIN_SIZE = 6000  # of 60,000: keeps `quantrain demo --dataset fashion-mnist` to seconds on 2 cores
CURVE_POINTS = 20  # test-accuracy evaluations per training phase when a report is written
CURVE_TEST_SIZE = 2000  # test images behind each curve point (all of them for the final numbers)
SQNR_IMAGES = 1000  # test images the per-layer SQNR is measured on
LATENCY_BATCH = 512  # ONNX Runtime latency: the median time for one batch of (at most) this many test images


@dataclass(frozen=True)
class Deployment:
    """The int8 model in ONNX Runtime next to the float control exported the same way."""

    int8_accuracy: float
    top1_agreement: float
    int8_latency_ms: float
    float_latency_ms: float
    int8_bytes: int
    float_bytes: int
    int8_path: str


@dataclass(frozen=True)
class DemoResult:
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
    report_path: str | None = None


Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_dataset(dataset: str = "digits", seed: int = 0, train_size: int | None = None) -> Split:
    """``(x_train, y_train, x_test, y_test)`` of ``dataset`` (see :data:`DATASETS`); ``train_size`` keeps a seeded
    subset of the training images (default: all digits, 6,000 Fashion-MNIST images)."""
    if dataset == "digits":
        x_train, y_train, x_test, y_test = load_digits(seed)
        return (*_subset(x_train, y_train, train_size, seed), x_test, y_test)
    if dataset == "fashion-mnist":
        return load_fashion_mnist(seed, FASHION_MNIST_TRAIN_SIZE if train_size is None else train_size)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def load_digits(seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``, pixels scaled to [0, 1], 20% test."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("the demo needs scikit-learn: pip install 'quantrain[demo]'") from None
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = len(y) * 4 // 5
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def load_fashion_mnist(seed: int = 0, train_size: int | None = FASHION_MNIST_TRAIN_SIZE, root: str = FASHION_MNIST_DIR) -> Split:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (gzipped IDX files under ``root``), pixels in [0, 1].

    ``train_size`` training images are drawn with ``seed`` (``None``: all 60,000); the test set is all 10,000.
    Raises ``FileNotFoundError`` naming the package when the files are absent: nothing is downloaded.
    """
    paths = [Path(root) / name for name in FASHION_MNIST_FILES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing); it comes from Debian's package: "
            "apt-get install dataset-fashion-mnist (quantrain downloads nothing)"
        )
    images_train, labels_train, images_test, labels_test = (torch.from_numpy(_read_idx(path)) for path in paths)
    x_train, x_test = (images.float().unsqueeze(1) / 255.0 for images in (images_train, images_test))
    x_train, y_train = _subset(x_train, labels_train.long(), train_size, seed)
    return x_train, y_train, x_test, labels_test.long()


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic ``0x00 0x00 0x08 ndim``, then ``ndim`` big-endian sizes, then the data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size >= len(y):
        return x, y
    if size < 1:
        raise ValueError(f"train_size must be positive, got {size}")
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 12345))[:size]
    return x[index], y[index]


def build_model(dataset: str = "digits") -> nn.Module:
    """A small CNN: two conv-BN-ReLU blocks, max pooling and two fully connected layers.

    For ``digits`` (1x8x8) one pooling after both blocks; for ``fashion-mnist`` (1x28x28) one after each block.
    """
    if dataset == "fashion-mnist":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    if dataset != "digits":
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def demo_config_list(bits: int = 8) -> list[dict]:
    """The exactly deployable layout (:func:`quantrain.config.presets.deployable_config_list`) at ``bits`` bits."""
    return deployable_config_list(bits, bits)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(y)


def _batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def _training_step(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


StepCallback = Callable[[int, nn.Module], None]
"""Called after each optimizer step with the number of steps taken so far in this training run and the model."""


def _make_training_func(
    x: torch.Tensor, y: torch.Tensor, seed: int, progress: Callable[..., Iterator], on_step: StepCallback | None = None
) -> Callable:
    """A ``training_func`` written as NNI's documentation writes one: it takes the single optimizer it is given and
    stops after max_steps steps and/or max_epochs epochs."""

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(y) // BATCH_SIZE)
        epochs = max_epochs if max_epochs is not None else -(-max_steps // steps_per_epoch)
        total = min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)
        model.train()
        step = 0
        with progress(total=total) as bar:
            for _ in range(epochs):
                for batch in _batches(x, y, BATCH_SIZE, generator):
                    if max_steps is not None and step >= max_steps:
                        return
                    optimizers.zero_grad(set_to_none=True)
                    training_step(batch, model).backward()
                    optimizers.step()
                    step += 1
                    bar.update(1)
                    if on_step is not None:
                        on_step(step, model)
                if lr_schedulers is not None:
                    lr_schedulers.step()

    return training_func


class _Curves:
    """Test accuracy every few steps into a recorder, as one series per training phase (the report's first plot).

    Steps are counted from the start of float training: the float control and QAT both continue from its last step.
    ``seconds`` is the time spent evaluating, which the demo leaves out of its training times.
    """

    def __init__(self, recorder: TrainingRecorder, x_test: torch.Tensor, y_test: torch.Tensor, steps_per_epoch: int) -> None:
        self.recorder = recorder
        self.x, self.y = x_test[:CURVE_TEST_SIZE], y_test[:CURVE_TEST_SIZE]
        self.steps_per_epoch = steps_per_epoch
        self.seconds = 0.0

    def phase(self, name: str, epochs: int, offset: int) -> StepCallback:
        total = epochs * self.steps_per_epoch
        every = max(1, total // CURVE_POINTS)

        def on_step(step: int, model: nn.Module) -> None:
            if step % every == 0 or step == total:
                self.point(name, offset + step, model)

        return on_step

    def point(self, name: str, step: int, model: nn.Module) -> None:
        start = time.perf_counter()
        self.recorder.record_metric(name, step, accuracy(model, self.x, self.y))
        self.seconds += time.perf_counter() - start


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
    """Train float, then QAT to int<bits>, then (with onnxruntime installed) export and run it in ONNX Runtime.

    The float control continues training the float checkpoint for the same epochs, data order and learning rate
    as QAT, so the QAT accuracy is compared with what those extra epochs alone would give. ONNX files go to
    ``out_dir`` (a temporary folder when ``None``). With ``out_dir`` the demo also records test accuracy over steps
    (on up to 2,000 test images, about 20 points per phase), the tracked activation ranges at every QAT step and
    the per-layer SQNR of the final model, and writes ``report.html`` with its plots there (needs matplotlib).
    ``train_size`` keeps a seeded subset of the training images (default: all digits, 6,000 Fashion-MNIST images).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if out_dir is not None:
        from quantrain.report import TrainingRecorder
        from quantrain.report.plots import require_matplotlib

        require_matplotlib()  # fail now, not after training, when matplotlib is missing
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_dataset(dataset, seed, train_size)
    model = build_model(dataset)
    bar = _progress_factory(progress)
    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)
    recorder = TrainingRecorder() if out_dir is not None else None
    curves = _Curves(recorder, x_test, y_test, steps_per_epoch) if recorder is not None else None
    float_steps = epochs * steps_per_epoch
    # time spent evaluating for the curves is left out of the training times (start - eval so far, end - eval so far)
    evaluating = (lambda: curves.seconds) if curves is not None else (lambda: 0.0)

    start = time.perf_counter() - evaluating()
    if curves is not None:
        curves.point("float", 0, model)
    float_optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    on_step = curves.phase("float", epochs, 0) if curves is not None else None
    train = _make_training_func(x_train, y_train, seed, lambda total: bar(total, "float"), on_step)
    train(model, float_optimizer, _training_step, None, None, epochs)
    float_seconds = time.perf_counter() - start - evaluating()
    float_accuracy = accuracy(model, x_test, y_test)

    start = time.perf_counter() - evaluating()
    control = copy.deepcopy(model)
    on_step = curves.phase("float control", qat_epochs, float_steps) if curves is not None else None
    if curves is not None:
        curves.point("float control", float_steps, control)
    control_train = _make_training_func(x_train, y_train, seed + 1, lambda total: bar(total, "float control"), on_step)
    control_train(control, torch.optim.Adam(control.parameters(), lr=5e-4), _training_step, None, None, qat_epochs)
    control_seconds = time.perf_counter() - start - evaluating()
    control_accuracy = accuracy(control, x_test, y_test)

    start = time.perf_counter() - evaluating()
    qat_name = f"int{bits} QAT (fake-quant)"
    if curves is not None:
        curves.point(qat_name, float_steps, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    on_step = curves.phase(qat_name, qat_epochs, float_steps) if curves is not None else None
    evaluator = TorchEvaluator(
        _make_training_func(x_train, y_train, seed + 1, lambda total: bar(total, f"QAT int{bits}"), on_step),
        optimizer,
        _training_step,
        evaluating_func=lambda m: accuracy(m, x_test, y_test),
    )
    # fuse="auto" folds each BatchNorm (and the ReLU after it) into its convolution, as an integer engine runs it;
    # BatchNorm statistics freeze for the last fifth of QAT, so the end of training sees the deployed arithmetic;
    # integer_bias adds each bias on the int32 grid ONNX Runtime uses, so the exported model computes the same logits.
    steps = qat_epochs * steps_per_epoch
    quantizer = QATQuantizer(
        model, demo_config_list(bits), evaluator, fuse="auto", freeze_bn_step=steps * 4 // 5, integer_bias=True
    )
    if recorder is not None:
        recorder.watch(quantizer)  # tracked ranges at every QAT step
    try:
        _, calibration_config = quantizer.compress(max_steps=None, max_epochs=qat_epochs)
    finally:
        if recorder is not None:
            recorder.close()
    qat_seconds = time.perf_counter() - start - evaluating()
    qat_accuracy = evaluator.evaluate()
    deployment = _deploy(model, control, x_test, y_test, out_dir, dataset) if _have_onnxruntime() else None
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
    )
    if out_dir is None:
        return result
    return dataclasses.replace(result, report_path=_write_demo_report(out_dir, result, recorder, quantizer, x_test))


def _write_demo_report(
    out_dir: str, result: DemoResult, recorder: TrainingRecorder, quantizer: QATQuantizer, x_test: torch.Tensor
) -> str:
    """The report: accuracy curves, ranges over QAT, SQNR of each layer against its own weights unquantized, the table."""
    from quantrain.report import activation_sqnr, write_report

    sqnr = _labelled(activation_sqnr(None, quantizer, x_test[:SQNR_IMAGES]), quantizer, result.dataset)
    header, *rows = _table_rows(result)
    deployment = _deployment_note(result)
    notes = [
        f"{result.dataset}: trained on {result.train_size} images, tested on {result.test_size}; int{result.bits} weights "
        f"(symmetric, per channel) and activations (affine, per tensor), BatchNorm folded, {result.qat_epochs} QAT "
        "epochs after float training.",
        _curves_note(result.test_size)
        + " SQNR compares each layer of the QAT model with the same model, same weights, with fake quantization off, "
        f"on {min(SQNR_IMAGES, result.test_size)} test images.",
        deployment[:1].upper() + deployment[1:] + ".",
    ]
    table = [dict(zip(header, row, strict=True)) for row in rows]
    path = write_report(
        out_dir, recorder=recorder, sqnr=sqnr, table=table, title=f"quantrain demo: {result.dataset}", notes=notes
    )
    return str(path)


def _curves_note(test_size: int) -> str:
    if test_size <= CURVE_TEST_SIZE:
        return f"Accuracy curves and the table use all {test_size} test images."
    return f"Accuracy curves use the first {CURVE_TEST_SIZE} test images; the table uses all {test_size}."


def _labelled(sqnr: dict[str, float], quantizer: QATQuantizer, dataset: str) -> dict[str, float]:
    """Each layer named with the float modules it computes: ``0 Conv2d+BatchNorm2d+ReLU`` for a folded chain."""
    kinds = {name: type(module).__name__ for name, module in build_model(dataset).named_modules()}
    groups = {fusion.group[0]: fusion.group for fusion in quantizer.fusions()}
    return {f"{name} {'+'.join(kinds[n] for n in groups.get(name, (name,)))}": value for name, value in sqnr.items()}


def _have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _deploy(
    model: nn.Module, control: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, out_dir: str | None, dataset: str = "digits"
) -> Deployment:
    """Export the QAT model (int8 QDQ) and the float control (fp32), run both in ONNX Runtime on the test set."""
    import tempfile
    import warnings

    import onnxruntime as ort

    from quantrain.deploy import check_parity, export_onnx

    folder = out_dir or tempfile.mkdtemp(prefix="quantrain-demo-")
    os.makedirs(folder, exist_ok=True)
    int8_path, float_path = os.path.join(folder, f"{dataset}_int8.onnx"), os.path.join(folder, f"{dataset}_fp32.onnx")
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
        int8_path=int8_path,
    )


def _progress_factory(enabled: bool) -> Callable:
    def factory(total: int, label: str):
        if not enabled:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=label, unit="step", leave=False)

    return factory


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def format_table(result: DemoResult) -> str:
    rows = _table_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines) + "\n" + _footer(result)


def _table_rows(result: DemoResult) -> list[tuple[str, ...]]:
    """The header and the rows of the final table (the printed table and the report's)."""
    rows = [
        ("model", "test accuracy", "train time", "ORT latency", "size"),
        ("float32", f"{result.float_accuracy:.2f}%", f"{result.float_seconds:.1f} s", "", ""),
        (
            f"float32 + {result.qat_epochs} epochs (control)",
            f"{result.control_accuracy:.2f}%",
            f"{result.control_seconds:.1f} s",
            *_deployed(result, "float"),
        ),
        (f"int{result.bits} QAT (fake-quant)", f"{result.qat_accuracy:.2f}%", f"{result.qat_seconds:.1f} s", "", ""),
    ]
    if result.deployment is not None:
        rows.append(
            (f"int{result.bits} in ONNX Runtime", f"{result.deployment.int8_accuracy:.2f}%", "", *_deployed(result, "int8"))
        )
    return rows


def _footer(result: DemoResult) -> str:
    footer = f"({result.dataset} test set: {result.test_size} images"
    if result.dataset == "fashion-mnist":
        footer += f"; trained on {result.train_size} of the 60000 training images"
    return f"{footer}; {_deployment_note(result)})"


def _deployment_note(result: DemoResult) -> str:
    if result.deployment is None:
        return "install onnxruntime (pip install 'quantrain[demo]') for the ONNX Runtime rows"
    return (
        f"ORT latency is the median for {_latency_batch(result)} in one batch; the int8 model agrees with its "
        f"fake-quant twin on {result.deployment.top1_agreement:.2f}% of images"
    )


def _latency_batch(result: DemoResult) -> str:
    return "the whole test set" if result.test_size <= LATENCY_BATCH else f"{LATENCY_BATCH} test images"


def _deployed(result: DemoResult, which: str) -> tuple[str, str]:
    deployment = result.deployment
    if deployment is None:
        return "", ""
    latency, size = (
        (deployment.int8_latency_ms, deployment.int8_bytes)
        if which == "int8"
        else (deployment.float_latency_ms, deployment.float_bytes)
    )
    return f"{latency:.2f} ms", f"{size / 1024:.1f} KiB"
