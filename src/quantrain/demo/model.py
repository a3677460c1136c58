"""The demo's model and its config_list.

Each dataset has a factory that takes no arguments, so that ``quantrain parity --model`` can rebuild the float
model: ``quantrain.demo:build_digits_model`` and ``quantrain.demo:build_fashion_mnist_model``
(:data:`MODEL_FACTORIES`).

>>> build_digits_model()(torch.rand(2, 1, 8, 8)).shape
torch.Size([2, 10])
>>> build_fashion_mnist_model()(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests use it)
from torch import nn

from quantrain.config.presets import deployable_config_list
from quantrain.demo.data import DATASETS

__all__ = ["MODEL_FACTORIES", "build_digits_model", "build_fashion_mnist_model", "build_model", "demo_config_list"]

MODEL_FACTORIES = {
    "digits": "quantrain.demo:build_digits_model",
    "fashion-mnist": "quantrain.demo:build_fashion_mnist_model",
}
"""``MODULE:FACTORY`` of each dataset's model, as ``quantrain parity --model`` takes it."""


def build_model(dataset: str = "digits") -> nn.Module:
    """A small CNN: two conv-BN-ReLU blocks, max pooling and two fully connected layers.

    For ``digits`` (1x8x8) one pooling after both blocks; for ``fashion-mnist`` (1x28x28) one after each block.
    """
    if dataset == "digits":
        return build_digits_model()
    if dataset == "fashion-mnist":
        return build_fashion_mnist_model()
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def build_digits_model() -> nn.Module:
    """The demo's CNN for 1x8x8 digits (``build_model("digits")``)."""
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


def build_fashion_mnist_model() -> nn.Module:
    """The demo's CNN for 1x28x28 Fashion-MNIST (``build_model("fashion-mnist")``)."""
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


def demo_config_list(bits: int = 8) -> list[dict]:
    """The exactly deployable layout (:func:`quantrain.config.presets.deployable_config_list`) at ``bits`` bits."""
    return deployable_config_list(bits, bits)
