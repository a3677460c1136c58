"""Accuracy benchmark: quantrain QAT vs PTQ vs torch.ao eager QAT vs NNI 3.0 QAT vs a float control, at W8A8 down
to W2A8.

Protocol, per dataset, model and seed: train a float checkpoint; then, from that checkpoint and with the same data
order, learning rate and step budget, fine-tune (a) a float control, (b) quantrain QAT, (c) torch.ao eager QAT,
(e) NNI 3.0 QAT, and calibrate (d) quantrain PTQ. Every accuracy is reported as a drop against the float control of
the same seed (never against the starting checkpoint: the extra epoch alone moves accuracy). Weights are int<W>
symmetric per output channel (narrow range, e.g. [-7, 7] at 4 bits, for every library), activations uint<A> affine
per tensor, each quantized once. quantrain and torch.ao fold BatchNorm and freeze BatchNorm statistics and ranges for
the last 20% of steps; quantrain tracks weight ranges as the paper does (min/max of the current weights), torch.ao as
moving averages.

NNI 3.0 (``NNI QAT``) gets quantrain's config_list with the conv-BN-ReLU groups as ``fuse_names`` (it folds BatchNorm
with its running statistics and has no BatchNorm or range freezing, nor min/max weight ranges: it trains the whole
epoch as it is), through NNI's ``TorchEvaluator``: the same loop, with Adam and the cosine schedule built by
``nni.trace`` and re-created by NNI. It runs in a subprocess of an interpreter with NNI (``--nni-python PATH``, else
``$QUANTRAIN_NNI_PYTHON``, else ``/opt/nni-venv/bin/python`` if it exists, else this one if ``import nni`` works; see
``benchmarks/nni_support.py``), which loads the checkpoint saved here and the same data; its time is measured there,
without the process start. Where no such interpreter is found, the column is skipped with the reason printed.

Datasets: scikit-learn's digits (always) and Fashion-MNIST from Debian's package, if installed::

    apt-get install dataset-fashion-mnist     # files under /usr/share/datasets/fashion-mnist

Nothing is downloaded. Run ``python benchmarks/accuracy.py --help`` for the options; it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import PtqQuantizer, QATQuantizer
from quantrain.config.presets import deployable_config_list

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nni_support, next to this script
from nni_support import NniPython, find_nni_python, worker_env

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
AGREEMENT = "ORT agrees with fake-quant"  # a row of top-1 agreement %, not of accuracy
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A8": (2, 8)}
METHODS = ("ptq", "quantrain", "torch.ao", "nni")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    pretrain_epochs: int
    batch_size: int


@dataclass(frozen=True)
class Result:
    dataset: str
    model: str
    setting: str
    method: str
    seed: int
    accuracy: float
    seconds: float


# ---- data ---------------------------------------------------------------------------------------------------


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    split = len(y) * 4 // 5
    x, y = (x - 0.5) / 0.5, y
    return Dataset("digits", x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]], 20, 32)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(train_subset: int | None) -> Dataset | None:
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if not all((FASHION_DIR / f).exists() for f in files):
        print(f"Fashion-MNIST skipped: not found under {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
        return None
    xtr, ytr, xte, yte = (torch.from_numpy(_idx(FASHION_DIR / f).copy()) for f in files)
    normalize = lambda x: ((x.float() / 255.0) - 0.2860) / 0.3530  # noqa: E731
    xtr, xte = normalize(xtr).unsqueeze(1), normalize(xte).unsqueeze(1)
    if train_subset:
        xtr, ytr = xtr[:train_subset], ytr[:train_subset]
    return Dataset("fashion-mnist", xtr, ytr.long(), xte, yte.long(), 2, 128)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


# ---- models -------------------------------------------------------------------------------------------------


def _cbr(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def plain_cnn() -> nn.Sequential:
    """Conv-BN-ReLU x3 (16/32/64 channels), global average pooling, a linear classifier."""
    return nn.Sequential(
        *_cbr(1, 16, 3), *_cbr(16, 32, 3, 2), *_cbr(32, 64, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)
    )


def depthwise_cnn() -> nn.Sequential:
    """MobileNet-style: a stem conv, then depthwise 3x3 + pointwise 1x1 blocks, each with BN and ReLU."""
    layers = _cbr(1, 16, 3)
    for cin, cout, stride in ((16, 32, 2), (32, 64, 2), (64, 128, 1)):
        layers += _cbr(cin, cin, 3, stride, groups=cin) + _cbr(cin, cout, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


MODELS: dict[str, Callable[[], nn.Sequential]] = {"plain": plain_cnn, "depthwise": depthwise_cnn}


# ---- training -----------------------------------------------------------------------------------------------


def accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.y_test), 1000):
            x, y = data.x_test[start : start + 1000], data.y_test[start : start + 1000]
            correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / len(data.y_test)


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, int], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """Adam with a cosine learning rate over ``epochs``; ``on_step(step, total)`` runs before each step. An
    ``optimizer`` and ``scheduler`` given (NNI's, re-created from the traced ones) are used instead of new ones."""
    torch.manual_seed(seed)
    total = epochs * (len(data.y_train) // data.batch_size)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    step = 0
    model.train()
    for epoch in range(epochs):
        for x, y in batches(data.x_train, data.y_train, data.batch_size, seed * 1000 + epoch):
            if on_step is not None:
                on_step(step, total)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            step += 1


def quantrain_config(weight_bits: int, activation_bits: int) -> list[dict]:
    """Each activation quantized once, where an integer engine would (the pooled output too); weights per channel."""
    return deployable_config_list(weight_bits, activation_bits, output_op_types=("AdaptiveAvgPool2d",))


def run_quantrain_qat(model: nn.Module, data: Dataset, bits: tuple[int, int], seed: int, lr: float) -> nn.Module:
    steps = len(data.y_train) // data.batch_size
    freeze = steps * 4 // 5
    QATQuantizer(
        model,
        quantrain_config(*bits),
        fuse="auto",
        example_inputs=data.x_train[:2],
        weight_range="minmax",
        freeze_bn_step=freeze,
        freeze_range_step=freeze,
        integer_bias=True,
    )
    train(model, data, 1, lr, seed)
    return model


def run_quantrain_ptq(
    model: nn.Module, data: Dataset, bits: tuple[int, int], seed: int, calibration_batches: int = 32
) -> nn.Module:
    ptq = PtqQuantizer(model, quantrain_config(*bits), fuse="auto", integer_bias=True, example_inputs=data.x_train[:2])

    model.eval()
    for index, (x, _) in enumerate(batches(data.x_train, data.y_train, data.batch_size, seed)):
        if index == calibration_batches:
            break
        ptq.track_forward(x)
    ptq.compress()
    return model


def run_torch_ao_qat(model: nn.Sequential, data: Dataset, bits: tuple[int, int], seed: int, lr: float) -> nn.Module:
    """torch.ao eager-mode QAT: fused Conv-BN-ReLU modules, fake quant with quantrain's integer ranges."""
    from torch.ao import quantization as tq

    weight_bits, activation_bits = bits
    weight_max = 2 ** (weight_bits - 1) - 1
    qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=2**activation_bits - 1,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        ),
        weight=tq.FakeQuantize.with_args(
            observer=tq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-weight_max,
            quant_max=weight_max,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
        ),
    )
    groups = [[str(i), str(i + 1), str(i + 2)] for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    model.train()
    fused = tq.fuse_modules_qat(model, groups)
    wrapped = nn.Sequential(tq.QuantStub(), fused, tq.DeQuantStub())
    wrapped.qconfig = qconfig
    tq.prepare_qat(wrapped, inplace=True)
    freeze = (len(data.y_train) // data.batch_size) * 4 // 5

    def on_step(step: int, total: int) -> None:
        if step == freeze:
            wrapped.apply(tq.disable_observer)
            wrapped.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)

    train(wrapped, data, 1, lr, seed, on_step)
    return wrapped


def conv_bn_relu_groups(model: nn.Sequential) -> list[tuple[str, str, str]]:
    """The (conv, BatchNorm, ReLU) names of each convolution, for NNI's ``fuse_names``."""
    return [(str(i), str(i + 1), str(i + 2)) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]


def run_nni_qat(model: nn.Sequential, data: Dataset, bits: tuple[int, int], seed: int, lr: float) -> nn.Module:
    """NNI 3.0's QATQuantizer through its TorchEvaluator, one epoch of :func:`train` (runs in NNI's interpreter)."""
    import nni
    from nni.compression.base.setting import QuantizationSetting
    from nni.compression.quantization import QATQuantizer
    from nni.compression.utils import TorchEvaluator

    if "AdaptiveAvgPool2d" not in QuantizationSetting.registry:  # NNI quantizes only the module types it has settings for
        QuantizationSetting.register("AdaptiveAvgPool2d", QuantizationSetting.activation_setting)
    config_list = quantrain_config(*bits)
    config_list[1]["fuse_names"] = conv_bn_relu_groups(model)  # the conv/linear entry
    optimizer = nni.trace(torch.optim.Adam)(model.parameters(), lr=lr)
    scheduler = nni.trace(torch.optim.lr_scheduler.CosineAnnealingLR)(optimizer, len(data.y_train) // data.batch_size)

    def training_func(model, optimizer, training_step, scheduler, max_steps, max_epochs):
        train(model, data, max_epochs, lr, seed, optimizer=optimizer, scheduler=scheduler)

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    evaluator = TorchEvaluator(training_func, optimizer, training_step, scheduler)
    QATQuantizer(model, config_list, evaluator).compress(None, 1)
    return model


def nni_worker(spec: dict) -> None:
    """One NNI QAT fine-tune in NNI's interpreter: the dataset loaded again, the checkpoint from the parent; prints
    ``{"accuracy": %, "seconds": s}`` as the last line of stdout."""
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    data = load_digits() if spec["dataset"] == "digits" else load_fashion_mnist(spec["train_subset"])
    model = MODELS[spec["model"]]()
    model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
    start = time.perf_counter()
    run_nni_qat(model, data, SETTINGS[spec["setting"]], spec["seed"], spec["lr"])
    seconds = time.perf_counter() - start
    print(json.dumps({"accuracy": accuracy(model, data), "seconds": seconds}))


def run_in_nni(nni_python: NniPython, spec: dict) -> tuple[float, float]:
    """:func:`nni_worker` in a subprocess of NNI's interpreter: (accuracy %, seconds)."""
    done = subprocess.run(
        [nni_python.path, os.path.abspath(__file__), "--nni-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=worker_env(with_quantrain_source=True),  # this script imports quantrain at its top; NNI's run never calls it
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"the NNI worker exited with code {done.returncode}:\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["accuracy"], result["seconds"]


# ---- the benchmark ------------------------------------------------------------------------------------------


def onnx_runtime_accuracy(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """Export the QAT model, run it in ONNX Runtime on the test set: (int8 accuracy %, top-1 agreement % with the
    fake-quant model)."""
    import tempfile

    import onnxruntime as ort

    from quantrain import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(model.eval(), data.x_test[:2], path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = np.concatenate(
            [session.run(None, {"input_0": data.x_test[i : i + 1000].numpy()})[0] for i in range(0, len(data.y_test), 1000)]
        )
    with torch.no_grad():
        reference = torch.cat([model(data.x_test[i : i + 1000]) for i in range(0, len(data.y_test), 1000)]).argmax(1).numpy()
    predicted = logits.argmax(1)
    return 100.0 * float((predicted == data.y_test.numpy()).mean()), 100.0 * float((predicted == reference).mean())


def benchmark(
    data: Dataset,
    model_name: str,
    seed: int,
    settings: list[str],
    methods: list[str],
    onnx: bool = False,
    nni_python: NniPython | None = None,
    train_subset: int | None = None,
) -> list[Result]:
    results = []
    torch.manual_seed(seed)
    checkpoint = MODELS[model_name]()
    train(checkpoint, data, data.pretrain_epochs, 2e-3, seed)
    fine_tune_lr = 5e-4
    folder = tempfile.TemporaryDirectory() if "nni" in methods else None
    if folder is not None:
        checkpoint_path = os.path.join(folder.name, "checkpoint.pt")
        torch.save(checkpoint.state_dict(), checkpoint_path)

    def record(setting: str, method: str, run: Callable[..., nn.Module], *args: object) -> nn.Module:
        start = time.perf_counter()
        model = run(copy.deepcopy(checkpoint), *args)
        add(setting, method, accuracy(model, data), time.perf_counter() - start)
        return model

    def add(setting: str, method: str, value: float, seconds: float) -> None:
        results.append(Result(data.name, model_name, setting, method, seed, value, seconds))
        print(
            f"  {data.name:13s} {model_name:9s} seed {seed} {setting:5s} {method:24s} {value:6.2f}%  ({seconds:.1f} s)",
            flush=True,
        )

    record("float", "checkpoint", lambda m: m)
    record("float", "float control", lambda m: (train(m, data, 1, fine_tune_lr, seed), m)[1])
    for setting in settings:
        bits = SETTINGS[setting]
        if "ptq" in methods:
            record(setting, "quantrain PTQ", run_quantrain_ptq, data, bits, seed)
        if "quantrain" in methods:
            model = record(setting, "quantrain QAT", run_quantrain_qat, data, bits, seed, fine_tune_lr)
            if onnx:
                start = time.perf_counter()
                int8_accuracy, agreement = onnx_runtime_accuracy(model, data)
                add(setting, "quantrain QAT, ORT int8", int8_accuracy, time.perf_counter() - start)
                add(setting, AGREEMENT, agreement, 0.0)
        if "torch.ao" in methods:
            record(setting, "torch.ao QAT", run_torch_ao_qat, data, bits, seed, fine_tune_lr)
        if "nni" in methods:
            spec = {"dataset": data.name, "train_subset": train_subset, "model": model_name, "seed": seed}
            spec |= {"setting": setting, "lr": fine_tune_lr, "checkpoint": checkpoint_path, "threads": torch.get_num_threads()}
            try:
                add(setting, "NNI QAT", *run_in_nni(nni_python, spec))
            except RuntimeError as error:  # a result missing from the table, not the end of the run
                print(f"  {data.name} {model_name} seed {seed} {setting}: NNI QAT failed: {error}", flush=True)
    if folder is not None:
        folder.cleanup()
    return results


def summarize(results: list[Result]) -> list[dict]:
    """Mean and spread over seeds of each accuracy and of its drop against the float control of the same seed."""
    control = {(r.dataset, r.model, r.seed): r.accuracy for r in results if r.method == "float control"}
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.model, r.setting, r.method), []).append(r)
    rows = []
    for (dataset, model, setting, method), runs in groups.items():
        accuracies = [r.accuracy for r in runs]
        drops = [control[(r.dataset, r.model, r.seed)] - r.accuracy for r in runs]
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "setting": setting,
                "method": method,
                "seeds": len(runs),
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_min": min(accuracies),
                "accuracy_max": max(accuracies),
                "drop_mean": statistics.mean(drops),
                "drop_spread": (max(drops) - min(drops)) if len(drops) > 1 else 0.0,
                "seconds_median": statistics.median(r.seconds for r in runs),
            }
        )
    return rows


def format_table(rows: list[dict], test_sizes: dict[str, int]) -> str:
    header = (
        "| dataset (test images) | model | setting | method | accuracy % (mean, min-max) "
        "| drop vs float control (spread) | time s |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]

    for row in rows:
        drop = "-" if row["method"] == AGREEMENT else f"{row['drop_mean']:+.2f} ({row['drop_spread']:.2f})"
        lines.append(
            f"| {row['dataset']} ({test_sizes[row['dataset']]}) | {row['model']} | {row['setting']} | {row['method']} | "
            f"{row['accuracy_mean']:.2f} ({row['accuracy_min']:.2f}-{row['accuracy_max']:.2f}) | "
            f"{drop} | {row['seconds_median']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"], choices=["digits", "fashion-mnist"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N Fashion-MNIST training images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx", action="store_true", help="also run each quantrain QAT model in ONNX Runtime (int8)")
    parser.add_argument("--nni-python", default=None, help="interpreter with NNI 3.0 for the NNI column (see the docstring)")
    parser.add_argument("--json", default="accuracy.json", help="where to write the results (default accuracy.json)")
    parser.add_argument("--nni-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nni_worker:
        nni_worker(json.loads(args.nni_worker))
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    methods, skipped = list(args.methods), {}
    nni_python = find_nni_python(args.nni_python) if "nni" in methods else None
    if nni_python is not None:
        print(f"NNI column: {nni_python.describe()}")
        if not nni_python.available:
            methods.remove("nni")
            skipped["nni"] = nni_python.reason
    datasets = [
        d
        for d in (
            load_digits() if "digits" in args.datasets else None,
            load_fashion_mnist(args.train_subset) if "fashion-mnist" in args.datasets else None,
        )
        if d
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = [
        r
        for data in datasets
        for model in args.models
        for seed in args.seeds
        for r in benchmark(data, model, seed, args.settings, methods, args.onnx, nni_python, args.train_subset)
    ]
    rows = summarize(results)
    test_sizes = {d.name: len(d.y_test) for d in datasets}
    print()
    print(format_table(rows, test_sizes))
    print(
        f"\n{torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s in all, "
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    with open(args.json, "w", encoding="utf-8") as f:
        report = {"args": vars(args), "skipped": skipped, "nni": None if nni_python is None else nni_python.describe()}
        json.dump({**report, "rows": rows, "runs": [asdict(r) for r in results], "test_sizes": test_sizes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
