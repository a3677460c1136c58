"""What an NNI 3.0 user brings to a quantizer, written the way NNI's examples write it, plus NNI's formulas to check by.

The models are NNI's MNIST models scaled down to scikit-learn's bundled 8x8 digits: ``Net`` is the LeNet-like model of
NNI's MNIST examples (``conv1``/``conv2``/``fc1``/``fc2`` with functional ``relu`` and ``max_pool2d``), ``Mnist`` the
model of NNI's quantization quick start and PTQ example (ReLU6 and max-pooling modules, ``batchnorm1`` after
``conv1``). The loops follow NNI's documentation: ``training_step(batch, model, *args, **kwargs)`` returns the loss,
``training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs)`` uses the single optimizer it
is given directly, ``evaluating_func(model)`` returns a float accuracy.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import reference_qparams

ENTRY_KEYS = {"scale", "zero_point", "quant_dtype", "quant_scheme", "quant_bits", "tracked_min", "tracked_max"}
BATCH_SIZE = 64


# ---- data -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits split as ``quantrain.demo.load_digits`` splits them: ``(x_train, y_train,
    x_test, y_test)``, 1x8x8 images with pixels in [0, 1], a seeded 80/20 split.

    The bundled CSV is read directly (importing ``sklearn.datasets`` alone takes seconds on this machine).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn is not installed: its bundled digits are the data of these tests")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits

        data = load_digits()
        images, labels = data.images.astype(np.float32), data.target
    x = torch.from_numpy(images).unsqueeze(1) / 16.0
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = len(y) * 4 // 5
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def digits_loaders(train_size: int | None = None) -> tuple[DataLoader, DataLoader]:
    """``(train_dataloader, test_dataloader)`` over the digits, unshuffled as in NNI's examples."""
    x_train, y_train, x_test, y_test = digits()
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    return (
        DataLoader(TensorDataset(x_train, y_train), batch_size=BATCH_SIZE),
        DataLoader(TensorDataset(x_test, y_test), batch_size=1000),
    )


# ---- models -----------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """The LeNet-like model of NNI's MNIST examples, for 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 16 * 2 * 2)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class Mnist(nn.Module):
    """The model of NNI's quantization quick start (and PTQ example), for 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, padding=1)
        self.fc1 = nn.Linear(2 * 2 * 16, 32)
        self.fc2 = nn.Linear(32, 10)
        self.relu1 = nn.ReLU6()
        self.relu2 = nn.ReLU6()
        self.relu3 = nn.ReLU6()
        self.max_pool1 = nn.MaxPool2d(2, 2)
        self.max_pool2 = nn.MaxPool2d(2, 2)
        self.batchnorm1 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.batchnorm1(self.conv1(x)))
        x = self.max_pool1(x)
        x = self.relu2(self.conv2(x))
        x = self.max_pool2(x)
        x = x.view(-1, 2 * 2 * 16)
        x = self.relu3(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


# ---- training and evaluation, as NNI's documentation writes them --------------------------------------------------


def training_step(batch, model, *args, **kwargs) -> torch.Tensor:
    x, y = batch[0], batch[1]
    logits = model(x)
    loss: torch.Tensor = F.nll_loss(logits, y)
    return loss


class DocTrainingFunc:
    """NNI's documented ``training_func`` over ``train_dataloader``; records what each call received.

    ``calls`` gets one ``dict`` per call: the objects passed in and the optimizer steps the loop made.
    """

    def __init__(self, train_dataloader) -> None:
        self.train_dataloader = train_dataloader
        self.calls: list[dict] = []

    def __call__(self, model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        call = {
            "model": model,
            "optimizers": optimizers,
            "training_step": training_step,
            "lr_schedulers": lr_schedulers,
            "max_steps": max_steps,
            "max_epochs": max_epochs,
            "steps": 0,
        }
        self.calls.append(call)
        model.train()
        total_epochs = max_epochs if max_epochs else 20
        total_steps = max_steps if max_steps else 1000000
        current_steps = 0
        for _ in range(total_epochs):
            for batch in self.train_dataloader:
                optimizers.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                current_steps += 1
                call["steps"] = current_steps
                if current_steps >= total_steps:
                    return
            if lr_schedulers is not None:
                lr_schedulers.step()


def make_evaluating_func(test_dataloader):
    """NNI's ``evaluating_func``: the model's accuracy on ``test_dataloader`` as a float."""

    def evaluating_func(model: nn.Module) -> float:
        model.eval()
        correct = 0
        total = 0
        with torch.no_grad():
            for x, y in test_dataloader:
                preds = torch.argmax(model(x), dim=1)
                correct += preds.eq(y.view_as(preds)).sum().item()
                total += len(y)
        return correct / total

    return evaluating_func


@functools.lru_cache(maxsize=4)
def _pretrained_state(model_class: type[nn.Module], epochs: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():  # the caller's random state is the same whether the cache is hit or not
        torch.manual_seed(0)
        model = model_class()
        train_dataloader, _ = digits_loaders()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        DocTrainingFunc(train_dataloader)(model, optimizer, training_step, None, None, epochs)
    return {key: value.clone() for key, value in model.state_dict().items()}


def pretrained(model_class: type[nn.Module], epochs: int = 6) -> nn.Module:
    """A float model pre-trained on the digits, as NNI's examples pre-train before quantizing (cached per class)."""
    state = _pretrained_state(model_class, epochs)
    model = model_class()
    model.load_state_dict(state)
    return model


# ---- NNI's quantization formulas ----------------------------------------------------------------------------------


def quant_range(quant_dtype: str) -> tuple[int, int]:
    """NNI's integer range: ``intN`` is narrow, [-(2^(N-1) - 1), 2^(N-1) - 1]; ``uintN`` is [0, 2^N - 1]."""
    if quant_dtype.startswith("uint"):
        bits = int(quant_dtype[4:])
        return 0, 2**bits - 1
    bits = int(quant_dtype[3:])
    return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1


def nni_scale_zero_point(tracked_min, tracked_max, quant_dtype: str, quant_scheme: str):
    """NNI's scale and zero point from a tracked range (the range widened to include 0, the scale floored at eps),
    by the test suite's independent reference of NNI's formulas."""
    qmin, qmax = quant_range(quant_dtype)
    return reference_qparams(tracked_min, tracked_max, qmin, qmax, symmetric=quant_scheme == "symmetric")


def fake_quantize(x: torch.Tensor, entry: dict) -> torch.Tensor:
    """``x`` quantized and dequantized with a calibration_config entry's scale and zero point."""
    qmin, qmax = quant_range(entry["quant_dtype"])
    scale, zero_point = entry["scale"], entry["zero_point"]
    return (torch.round(torch.clamp(x / scale + zero_point, qmin, qmax)) - zero_point) * scale


def check_entry(entry: dict, quant_dtype: str = "int8", quant_scheme: str = "affine", shape: tuple | None = None) -> None:
    """A calibration_config entry has NNI's keys and types, and its scale and zero point are NNI's formulas applied to
    its own tracked range."""
    assert set(entry) == ENTRY_KEYS
    for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
        value = entry[key]
        assert isinstance(value, torch.Tensor), key
        assert value.device.type == "cpu", key
        assert value.dtype == torch.float32, key
        if shape is not None:
            assert tuple(value.shape) == shape, (key, value.shape)
    assert entry["quant_dtype"] == quant_dtype
    assert entry["quant_scheme"] == quant_scheme
    assert type(entry["quant_bits"]) is int
    assert entry["quant_bits"] == int(quant_dtype.removeprefix("u").removeprefix("int"))
    assert torch.all(entry["tracked_min"] <= entry["tracked_max"])
    scale, zero_point = nni_scale_zero_point(entry["tracked_min"], entry["tracked_max"], quant_dtype, quant_scheme)
    torch.testing.assert_close(entry["scale"], scale)
    assert torch.equal(entry["zero_point"], zero_point)
    qmin, qmax = quant_range(quant_dtype)
    assert torch.equal(entry["zero_point"], entry["zero_point"].round())
    assert torch.all((qmin <= entry["zero_point"]) & (entry["zero_point"] <= qmax))


def ema(values: list[torch.Tensor], decay: float = 0.99) -> torch.Tensor:
    """NNI's moving average of a tracked range: seeded by the first value, then ``old * decay + (1 - decay) * new``."""
    average = values[0]
    for value in values[1:]:
        average = average * decay + (1 - decay) * value
    return average


def example_training_model(train_dataloader, calls=None, *, default_epochs=None, default_steps=None):
    """The ``training_model`` of NNI's QAT example and quick-start tutorial (``calls``, when given, records what it
    receives). Without a budget it trains one epoch; with only ``max_steps``, at most 100 epochs. NNI's test assets'
    variant stops at ``default_epochs`` epochs and ``default_steps`` steps unless told otherwise."""

    def training_model(model, optimizer, training_step, scheduler=None, max_steps=None, max_epochs=None):
        if calls is not None:
            calls.append((optimizer, scheduler, max_steps, max_epochs))
        model.train()
        if default_epochs is not None:
            max_epochs = max_epochs if max_epochs else default_epochs
            max_steps = max_steps if max_steps else default_steps
        else:
            max_epochs = max_epochs if max_epochs else 1 if max_steps is None else 100
        current_steps = 0
        for _ in range(max_epochs):
            for batch in train_dataloader:
                optimizer.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizer.step()
                current_steps += 1
                if max_steps and current_steps == max_steps:
                    return
            if scheduler is not None:
                scheduler.step()

    return training_model
