"""The demo's datasets (digits, Fashion-MNIST from Debian's package) and its report, rendered in headless Chromium."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantrain import demo
from quantrain.demo import FASHION_MNIST_DIR, FASHION_MNIST_FILES, build_model, format_table, load_fashion_mnist, run_demo

HAVE_FASHION_MNIST = all((Path(FASHION_MNIST_DIR) / name).is_file() for name in FASHION_MNIST_FILES)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo")
    return run_demo(epochs=2, qat_epochs=1, progress=False, out_dir=str(out)), out


def test_demo_writes_its_report_next_to_the_onnx_files(demo_report):
    result, out = demo_report
    assert result.report_path == str(out / "report.html")
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "calibration.json",
        "checkpoint.pt",
        "digits_fp32.onnx",
        "digits_int8.onnx",
        "quant.json",
        "ranges.png",
        "report.html",
        "report.json",
        "sqnr.png",
        "test_inputs.npy",
    ]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<img src="([^"]+)"', page) == ["accuracy.png", "ranges.png", "sqnr.png"]
    deployed = result.deployment
    for value in (
        f"{result.float_accuracy:.2f}%",
        f"{result.qat_accuracy:.2f}%",
        f"{deployed.int8_accuracy:.2f}%",
        f"{deployed.int8_latency_ms:.2f} ms",
        f"{deployed.int8_bytes / 1024:.1f} KiB",
        "int8 in ONNX Runtime",
        "0 Conv2d+BatchNorm2d+ReLU",  # SQNR per layer, the folded chain named
    ):
        assert f"<td>{value}</td>" in page
    assert result.float_seconds > 0 and result.control_seconds > 0 and result.qat_seconds > 0
    assert f"<td>{result.epochs} + {result.qat_epochs} QAT</td>" in page  # the epochs column


STEPS_PER_EPOCH = 23  # 1437 digits training images in batches of 64
FLOAT_STEPS, QAT_STEPS = 2 * STEPS_PER_EPOCH, 1 * STEPS_PER_EPOCH  # the fixture's epochs=2, qat_epochs=1
EVENTS = [("quantization starts", FLOAT_STEPS), ("BatchNorm frozen", FLOAT_STEPS + QAT_STEPS * 4 // 5)]


@pytest.fixture(scope="module")
def report_data(demo_report):
    return json.loads((demo_report[1] / "report.json").read_text())


def test_demo_accuracy_plot_zooms_on_qat_and_the_control(report_data):
    metrics = report_data["metrics"]
    assert list(metrics) == ["float", "float control", "int8 QAT (fake-quant)"]
    assert [step for step, _ in metrics["int8 QAT (fake-quant)"]][::11] == [FLOAT_STEPS, FLOAT_STEPS + 11, FLOAT_STEPS + 22]
    whole, zoom = report_data["plots"]["accuracy.png"]["panels"]
    assert whole["xlabel"] == zoom["xlabel"] == "optimizer step" and whole["xlim"][0] < 0 < FLOAT_STEPS
    after = [value for points in metrics.values() for step, value in points if step >= FLOAT_STEPS]
    low, high = zoom["ylim"]
    assert low < min(after) and max(after) < high  # every point from the start of QAT on shows ...
    assert high - low <= 1.3 * max(1.0, max(after) - min(after)) + 1e-9  # ... on an axis zoomed to them
    assert low > 50.0 and whole["ylim"][0] < min(value for _, value in metrics["float"])  # not 0-100%: the data's
    assert FLOAT_STEPS - 1 < zoom["xlim"][0] < FLOAT_STEPS and zoom["xlim"][1] > FLOAT_STEPS + QAT_STEPS
    for panel in (whole, zoom):
        labels = [line["label"] for line in panel["lines"]]
        assert labels == ["float", "float control", "int8 QAT (fake-quant)"]
        for key in ("color", "linestyle", "marker"):  # QAT and the float control look different three ways
            assert len({line[key] for line in panel["lines"]}) == 3, key


def test_demo_plots_mark_the_schedule_on_one_step_axis(report_data):
    assert report_data["events"] == dict(EVENTS) and report_data["step_axis"] == "optimizer step"
    expected = [{"label": label, "step": step, "labelled": True} for label, step in EVENTS]
    panels = report_data["plots"]["accuracy.png"]["panels"] + report_data["plots"]["ranges.png"]["panels"]
    assert len(panels) == 2 + 5 and all(panel["events"] == expected for panel in panels)
    for label, history in report_data["ranges"].items():  # recorded at every QAT step, counted from float training
        assert history["steps"] == list(range(FLOAT_STEPS + 1, FLOAT_STEPS + QAT_STEPS + 1)), label
    ranges = report_data["plots"]["ranges.png"]["panels"]
    assert {panel["xlabel"] for panel in ranges} == {"", "optimizer step"}  # the lowest panel of each column
    assert all(FLOAT_STEPS - 2 < panel["xlim"][0] <= FLOAT_STEPS for panel in ranges)


def test_demo_report_does_not_change_the_results(demo_report):
    result, _ = demo_report
    plain = run_demo(epochs=2, qat_epochs=1, progress=False)
    assert plain.report_path is None
    assert (plain.float_accuracy, plain.control_accuracy, plain.qat_accuracy) == (
        result.float_accuracy,
        result.control_accuracy,
        result.qat_accuracy,
    )
    assert torch.equal(plain.calibration_config["3"]["_output_0"]["scale"], result.calibration_config["3"]["_output_0"]["scale"])


@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo_report, report_data, tmp_path):
    if CHROMIUM is None:
        print("headless Chromium not found (apt-get install chromium): report not rendered")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    image = pytest.importorskip("matplotlib.image")
    result, _ = demo_report
    screenshot = tmp_path / "report.png"
    command = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,2600",
        Path(result.report_path).as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and screenshot.is_file(), completed.stderr[-2000:]
    pixels = image.imread(str(screenshot))[..., :3]
    assert pixels.shape[:2] == (2600, 1200)
    assert pixels.std() > 0.05  # not blank
    assert (pixels.max(axis=2) - pixels.min(axis=2) > 0.1).mean() > 0.02  # coloured pixels: the plots were drawn
    for line in report_data["plots"]["accuracy.png"]["panels"][1]["lines"]:  # each curve's colour is on the page
        rgb = np.array([int(line["color"][i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=2) < 0.06).sum() > 200, line["label"]


# ---- datasets ----------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_loader_reads_debian_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28))
    for name, array in zip(FASHION_MNIST_FILES, (images, np.arange(7) % 10, images[:3], np.array([9, 0, 3])), strict=True):
        _write_idx(tmp_path / name, array)
    x_train, y_train, x_test, y_test = load_fashion_mnist(seed=0, train_size=5, root=str(tmp_path))
    assert x_train.shape == (5, 1, 28, 28) and x_test.shape == (3, 1, 28, 28)
    assert torch.equal(x_test[:, 0], torch.from_numpy(images[:3]).float() / 255.0)
    assert y_test.tolist() == [9, 0, 3] and y_train.dtype == torch.int64
    assert len(set(y_train.tolist())) == 5  # distinct images drawn
    (tmp_path / FASHION_MNIST_FILES[0]).unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=str(tmp_path))


def test_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="digits, fashion-mnist"):
        run_demo(dataset="cifar10", progress=False)
    with pytest.raises(ValueError, match="digits, fashion-mnist"):
        build_model("cifar10")


needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST, reason=f"Fashion-MNIST not under {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fashion_mnist():
    return load_fashion_mnist(seed=0)


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package(fashion_mnist):
    x_train, y_train, x_test, y_test = fashion_mnist
    assert x_train.shape == (6000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert torch.bincount(y_test).tolist() == [1000] * 10  # the standard test set
    assert torch.bincount(y_train, minlength=10).min() > 450  # a seeded draw covers every class


@pytest.mark.slow
@needs_fashion_mnist
def test_demo_on_fashion_mnist(fashion_mnist, monkeypatch, tmp_path, capsys):
    # The whole pipeline on 28x28 images; 1000 of the test images keep the test quick (the demo uses all 10000).
    from quantrain.cli import main

    x_train, y_train, x_test, y_test = fashion_mnist
    subset = (x_train[:640], y_train[:640], x_test[:1000], y_test[:1000])
    monkeypatch.setattr(demo.data, "load_fashion_mnist", lambda seed, train_size: subset)
    result = run_demo(dataset="fashion-mnist", epochs=1, qat_epochs=1, progress=False, out_dir=str(tmp_path))
    assert (result.dataset, result.train_size, result.test_size) == ("fashion-mnist", 640, 1000)
    assert result.float_accuracy > 50.0 and result.qat_accuracy > 50.0
    assert abs(result.deployment.int8_accuracy - result.qat_accuracy) <= 0.2
    assert result.artifacts.int8_onnx == str(tmp_path / "fashion-mnist_int8.onnx")
    assert "fashion-mnist: tested on 1000 images, trained on 640 of the 60000 training images." in format_table(result)
    parity = result.artifacts.commands()[-1]
    assert parity[1] == "parity" and "quantrain.demo:build_fashion_mnist_model" in parity
    assert main(parity[1:]) == 0  # the fashion-mnist factory rebuilds the model the checkpoint fits
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'fashion-mnist_int8.onnx'} in ONNX Runtime vs the fake-quant model")
