"""The demo's training loop, its accuracy curves, and the untimed warm-up before its timed phases.

The loop is a ``training_func`` as NNI's documentation writes one, so ``QATQuantizer.compress()`` drives QAT with
the same code that trains the float model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from quantrain.demo.model import build_model, demo_config_list
from quantrain.qat import QATQuantizer

if TYPE_CHECKING:
    from quantrain.report import TrainingRecorder

__all__ = ["BATCH_SIZE", "Curves", "accuracy", "make_training_func", "progress_factory", "training_step", "warm_up"]

BATCH_SIZE = 64
EVAL_BATCH = 256  # test images per forward when measuring accuracy
CURVE_POINTS = 20  # test-accuracy evaluations per training phase when a report is written
CURVE_TEST_SIZE = 2000  # test images behind each curve point (all of them for the final numbers)
WARMUP_STEPS = 3  # full batches per warm-up run, then one of the last (smaller) batch's size

StepCallback = Callable[[int, nn.Module], None]
"""Called after each optimizer step with the number of steps taken so far in this training run and the model."""


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in % of ``model`` (in eval mode; its mode is restored) on ``(x, y)``, in batches of
    :data:`EVAL_BATCH` (on 2 cores 2.4 times faster than 2,000 Fashion-MNIST images at once)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + EVAL_BATCH]).argmax(dim=1) == y[i : i + EVAL_BATCH]).sum()) for i in range(0, len(y), EVAL_BATCH)
        )
    model.train(was_training)
    return 100.0 * correct / len(y)


def training_step(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def steps_per_epoch(train_size: int) -> int:
    return -(-train_size // BATCH_SIZE)


def _batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def make_training_func(
    x: torch.Tensor, y: torch.Tensor, seed: int, progress: Callable[..., Any], on_step: StepCallback | None = None
) -> Callable:
    """A ``training_func`` written as NNI's documentation writes one: it takes the single optimizer it is given and
    stops after max_steps steps and/or max_epochs epochs."""

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        generator = torch.Generator().manual_seed(seed)
        per_epoch = steps_per_epoch(len(y))
        epochs = max_epochs if max_epochs is not None else -(-max_steps // per_epoch)
        total = min(epochs * per_epoch, max_steps or epochs * per_epoch)
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


def warm_up(dataset: str, x: torch.Tensor, y: torch.Tensor, bits: int) -> float:
    """A few float and QAT training steps on throwaway models, before the demo starts its clocks; their seconds.

    The first steps of a process pay one-time costs: kernel selection and memory allocation for each new shape,
    libraries loaded on first use, the quantizer's graph capture and the native kernels' build (or load from the
    cache). Paid here, they stay out of the times the demo reports for each phase. Uses torch's global RNG only to
    build the throwaway models; the demo seeds it afterwards.
    """
    start = time.perf_counter()
    sizes = [BATCH_SIZE] * WARMUP_STEPS + [len(y) % BATCH_SIZE or BATCH_SIZE]
    for quantize in (False, True):
        model = build_model(dataset)
        quantizer = None
        if quantize:  # the demo's settings, with BatchNorm frozen for the last step: every code path QAT takes
            options = {"fuse": "auto", "integer_bias": True, "freeze_bn_step": WARMUP_STEPS, "example_inputs": x[:2]}
            quantizer = QATQuantizer(model, demo_config_list(bits), **options)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for size in sizes:
            optimizer.zero_grad(set_to_none=True)
            training_step((x[:size], y[:size]), model).backward()
            optimizer.step()
        accuracy(model, x[:BATCH_SIZE], y[:BATCH_SIZE])
        if quantizer is not None:
            quantizer.unwrap_model()
        del model, quantizer, optimizer
    gc.collect()  # the throwaway quantizer, so that it no longer looks at the demo's optimizer steps
    return time.perf_counter() - start


class Curves:
    """Test accuracy every few steps into a recorder, as one series per training phase (the report's first plot).

    Steps are counted from the start of float training: the float control and QAT both continue from its last step.
    ``seconds`` is the time spent evaluating, which the demo leaves out of its training times.
    """

    def __init__(self, recorder: TrainingRecorder, x_test: torch.Tensor, y_test: torch.Tensor, per_epoch: int) -> None:
        self.recorder = recorder
        self.x, self.y = x_test[:CURVE_TEST_SIZE], y_test[:CURVE_TEST_SIZE]
        self.per_epoch = per_epoch
        self.seconds = 0.0

    def phase(self, name: str, epochs: int, offset: int) -> StepCallback:
        total = epochs * self.per_epoch
        every = max(1, total // CURVE_POINTS)

        def on_step(step: int, model: nn.Module) -> None:
            if step % every == 0 or step == total:
                self.point(name, offset + step, model)

        return on_step

    def point(self, name: str, step: int, model: nn.Module) -> None:
        start = time.perf_counter()
        self.recorder.record_metric(name, step, accuracy(model, self.x, self.y))
        self.seconds += time.perf_counter() - start


def progress_factory(enabled: bool) -> Callable[[int, str], Any]:
    """``factory(total, label)``: a tqdm bar over ``total`` steps, or a silent stand-in. tqdm is imported now, not
    inside the first timed phase."""
    if not enabled:
        return lambda total, label: _NoBar()
    from tqdm import tqdm

    return lambda total, label: tqdm(total=total, desc=label, unit="step", leave=False)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None
