"""The demo: train a small CNN in float, then quantization-aware train it to int8, export it and run it in ONNX Runtime.

Run it with ``quantrain demo`` (``--help`` for its options and how long it takes), or call :func:`run_demo`.

* :mod:`quantrain.demo.data`: the datasets, scikit-learn's bundled digits and Debian's Fashion-MNIST (never
  downloaded);
* :mod:`quantrain.demo.model`: the CNN (one factory per dataset, for ``quantrain parity --model``) and its config_list;
* :mod:`quantrain.demo.training`: the training loop, the accuracy curves, the untimed warm-up;
* :mod:`quantrain.demo.run`: :func:`run_demo`, which trains, times, exports and measures;
* :mod:`quantrain.demo.artifacts`: the files it writes (ONNX, calibration config, checkpoint, quantizer spec, test
  inputs, results JSON) and the ``quantrain inspect`` / ``parity`` commands that work on them;
* :mod:`quantrain.demo.table` and :mod:`quantrain.demo.report`: the printed table and the HTML report.
"""

from quantrain.demo.artifacts import DEFAULT_OUT, Artifacts
from quantrain.demo.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_TRAIN_SIZE,
    load_dataset,
    load_digits,
    load_fashion_mnist,
)
from quantrain.demo.model import MODEL_FACTORIES, build_digits_model, build_fashion_mnist_model, build_model, demo_config_list
from quantrain.demo.run import DemoResult, Deployment, run_demo
from quantrain.demo.table import format_table
from quantrain.demo.training import BATCH_SIZE, accuracy

__all__ = [
    "BATCH_SIZE",
    "DATASETS",
    "DEFAULT_OUT",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_TRAIN_SIZE",
    "MODEL_FACTORIES",
    "Artifacts",
    "DemoResult",
    "Deployment",
    "accuracy",
    "build_digits_model",
    "build_fashion_mnist_model",
    "build_model",
    "demo_config_list",
    "format_table",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "run_demo",
]
