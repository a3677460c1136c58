"""The demo's datasets, neither downloaded at run time.

* ``digits``: scikit-learn's bundled 8x8 digits (1,437 training and 360 test images);
* ``fashion-mnist``: 28x28 Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (files under
  ``/usr/share/datasets/fashion-mnist``); the demo trains on a seeded subset of 6,000 of the 60,000 training images
  (``train_size``) and tests on all 10,000 test images.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_TRAIN_SIZE",
    "check_dataset",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
]

DATASETS = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_TRAIN_SIZE = 6000  # of 60,000: the demo's time on 2 cores is in `quantrain demo --help`

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def check_dataset(dataset: str, root: str | None = None) -> None:
    """Raise before any work what :func:`load_dataset` would raise: ``ValueError`` for an unknown name,
    ``FileNotFoundError`` (naming the Debian package) when Fashion-MNIST's files are absent from ``root``
    (default :data:`FASHION_MNIST_DIR`)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "fashion-mnist":
        _fashion_mnist_paths(root)


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


def load_fashion_mnist(seed: int = 0, train_size: int | None = FASHION_MNIST_TRAIN_SIZE, root: str | None = None) -> Split:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (gzipped IDX files under ``root``, default
    :data:`FASHION_MNIST_DIR`), pixels in [0, 1].

    ``train_size`` training images are drawn with ``seed`` (``None``: all 60,000); the test set is all 10,000.
    Raises ``FileNotFoundError`` naming the package when the files are absent: nothing is downloaded.
    """
    paths = _fashion_mnist_paths(root)
    images_train, labels_train, images_test, labels_test = (torch.from_numpy(_read_idx(path)) for path in paths)
    x_train, x_test = (images.float().unsqueeze(1) / 255.0 for images in (images_train, images_test))
    x_train, y_train = _subset(x_train, labels_train.long(), train_size, seed)
    return x_train, y_train, x_test, labels_test.long()


def _fashion_mnist_paths(root: str | None) -> list[Path]:
    paths = [Path(FASHION_MNIST_DIR if root is None else root) / name for name in FASHION_MNIST_FILES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing); it comes from Debian's package: "
            "apt-get install dataset-fashion-mnist (quantrain downloads nothing)"
        )
    return paths


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
