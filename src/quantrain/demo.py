"""The demo: train a small CNN on scikit-learn's bundled digits in float, then quantization-aware train it to int8.

Everything ships with the packages (no download). Run it with ``quantrain demo``.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantrain.config.presets import deployable_config_list
from quantrain.evaluator import TorchEvaluator
from quantrain.qat import QATQuantizer

__all__ = ["DemoResult", "build_model", "demo_config_list", "load_digits", "run_demo"]

BATCH_SIZE = 64


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


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


def build_model() -> nn.Module:
    """A small CNN for 1x8x8 images: two conv-BN-ReLU blocks, a pooling layer and two fully connected layers."""

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


def _make_training_func(x: torch.Tensor, y: torch.Tensor, seed: int, progress: Callable[..., Iterator]) -> Callable:
    """A ``training_func`` in the reference's convention that honours max_steps and max_epochs."""

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
                    for optimizer in optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    training_step(batch, model).backward()
                    for optimizer in optimizers:
                        optimizer.step()
                    step += 1
                    bar.update(1)
                for scheduler in lr_schedulers or ():
                    scheduler.step()

    return training_func


def run_demo(
    *, epochs: int = 10, qat_epochs: int = 3, bits: int = 8, seed: int = 0, progress: bool = True, out_dir: str | None = None
) -> DemoResult:
    """Train float, then QAT to int<bits>, then (with onnxruntime installed) export and run it in ONNX Runtime.

    The float control continues training the float checkpoint for the same epochs, data order and learning rate
    as QAT, so the QAT accuracy is compared with what those extra epochs alone would give. ONNX files go to
    ``out_dir`` (a temporary folder when ``None``).
    """
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    model = build_model()
    bar = _progress_factory(progress)

    start = time.perf_counter()
    float_optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train = _make_training_func(x_train, y_train, seed, lambda total: bar(total, "float"))
    train(model, [float_optimizer], _training_step, None, None, epochs)
    float_seconds = time.perf_counter() - start
    float_accuracy = accuracy(model, x_test, y_test)

    start = time.perf_counter()
    control = copy.deepcopy(model)
    control_train = _make_training_func(x_train, y_train, seed + 1, lambda total: bar(total, "float control"))
    control_train(control, [torch.optim.Adam(control.parameters(), lr=5e-4)], _training_step, None, None, qat_epochs)
    control_seconds = time.perf_counter() - start
    control_accuracy = accuracy(control, x_test, y_test)

    start = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    evaluator = TorchEvaluator(
        _make_training_func(x_train, y_train, seed + 1, lambda total: bar(total, f"QAT int{bits}")),
        optimizer,
        _training_step,
        evaluating_func=lambda m: accuracy(m, x_test, y_test),
    )
    # fuse="auto" folds each BatchNorm (and the ReLU after it) into its convolution, as an integer engine runs it;
    # BatchNorm statistics freeze for the last fifth of QAT, so the end of training sees the deployed arithmetic;
    # integer_bias adds each bias on the int32 grid ONNX Runtime uses, so the exported model computes the same logits.
    steps = qat_epochs * -(-len(y_train) // BATCH_SIZE)
    quantizer = QATQuantizer(
        model, demo_config_list(bits), evaluator, fuse="auto", freeze_bn_step=steps * 4 // 5, integer_bias=True
    )

    _, calibration_config = quantizer.compress(max_steps=None, max_epochs=qat_epochs)
    qat_seconds = time.perf_counter() - start
    qat_accuracy = evaluator.evaluate()
    deployment = _deploy(model, control, x_test, y_test, out_dir) if _have_onnxruntime() else None
    return DemoResult(
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
    )


def _have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _deploy(model: nn.Module, control: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, out_dir: str | None) -> Deployment:
    """Export the QAT model (int8 QDQ) and the float control (fp32), run both in ONNX Runtime on the test set."""
    import tempfile
    import warnings

    import onnxruntime as ort

    from quantrain.deploy import check_parity, export_onnx

    folder = out_dir or tempfile.mkdtemp(prefix="quantrain-demo-")
    os.makedirs(folder, exist_ok=True)
    int8_path, float_path = os.path.join(folder, "digits_int8.onnx"), os.path.join(folder, "digits_fp32.onnx")
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
    feed = {"input_0": x_test.numpy()}
    times: list[list[float]] = [[], []]
    for run in range(40):  # interleaved, so that drift on a shared machine hits both alike
        for index in (run % 2, 1 - run % 2):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append(time.perf_counter() - start)
    logits = sessions[0].run(None, feed)[0]
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    footer = f"(digits test set: {result.test_size} images"
    if result.deployment is not None:
        footer += (
            f"; ORT latency is the median for the whole test set in one batch; the int8 model agrees with its "
            f"fake-quant twin on {result.deployment.top1_agreement:.2f}% of images"
        )
    else:
        footer += "; install onnxruntime (pip install 'quantrain[demo]') for the ONNX Runtime rows"
    return "\n".join(lines) + "\n" + footer + ")"


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
