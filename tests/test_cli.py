"""The command line and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantrain import load_calibration_config
from quantrain.cli import main
from quantrain.demo import build_model, demo_config_list, format_table, load_digits, run_demo


def test_demo_trains_float_and_int8_to_high_accuracy():
    result = run_demo(epochs=4, qat_epochs=1, progress=False)
    assert result.test_size == 360
    assert result.float_accuracy > 90.0
    assert result.qat_accuracy > 90.0
    assert result.control_accuracy > 90.0
    assert abs(result.qat_accuracy - result.control_accuracy) < 3.0
    layers = {name for name, module in build_model().named_modules() if type(module).__name__ in ("Conv2d", "Linear")}
    assert set(result.calibration_config) == layers
    table = format_table(result)
    assert "int8 QAT (fake-quant)" in table and f"{result.qat_accuracy:.2f}%" in table
    assert "float32 + 1 epochs (control)" in table and f"{result.control_accuracy:.2f}%" in table
    deployed = result.deployment
    assert abs(deployed.int8_accuracy - result.qat_accuracy) <= 0.3 and deployed.top1_agreement >= 99.7
    assert deployed.int8_bytes < 0.35 * deployed.float_bytes and deployed.int8_latency_ms > 0
    assert f"int8 in ONNX Runtime         | {deployed.int8_accuracy:.2f}%" in table


def test_digits_split_is_deterministic_and_disjoint():
    x_train, y_train, x_test, _ = load_digits(seed=0)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    again = load_digits(seed=0)
    assert (again[1] == y_train).all()


def test_demo_config_is_int_weights_and_uint_activations_each_quantized_once():
    first, layers = demo_config_list(4)
    assert first == {"op_names": ["0"], "target_names": ["_input_"], "quant_dtype": "uint4", "quant_scheme": "affine"}
    assert layers["target_names"] == ["weight", "_output_"] and layers["quant_dtype"] == "uint4"
    assert layers["target_settings"]["weight"]["quant_dtype"] == "int4"


def test_cli_demo_writes_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["demo", "--dataset", "digits", "--epochs", "1", "--qat-epochs", "1", "--quiet", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(out.read_text())
    assert f"{summary['qat_accuracy']:.2f}%" in captured.out
    assert summary["dataset"] == "digits" and captured.err == ""  # --quiet: no progress bars
    assert summary["onnx_runtime"]["int8_bytes"] > 0
    calibration = load_calibration_config(tmp_path / "result.calibration.json")

    assert calibration["0"]["weight"]["scale"].shape == (16, 1, 1, 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bits", "9"],
        ["demo", "--epochs", "0"],
        ["demo", "--dataset", "cifar10"],
        ["inspect"],
        ["inspect", "a.onnx", "--tables"],
        ["parity", "model.onnx"],
        ["nonsense"],
        [],
    ],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "quantrain" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["inspect"], ["parity"]])
def test_help_for_every_command_lists_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes:" in text
    assert all(f"  {code} " in text for code in ("0", "1", "2", "3", "4", "130"))
    assert command == [] or "--quiet" in text


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in ("demo", "inspect", "parity"))


def test_version(capsys):
    from quantrain import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"quantrain {__version__}\n"


def test_demo_flags_reach_run_demo(monkeypatch, capsys, tmp_path):
    import quantrain.demo

    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before training; also checks the exit code for Ctrl-C

    monkeypatch.setattr(quantrain.demo, "run_demo", fake_run_demo)
    argv = [
        "demo",
        "--dataset",
        "fashion-mnist",
        "--bits",
        "4",
        "--epochs",
        "2",
        "--qat-epochs",
        "3",
        "--out",
        str(tmp_path),
        "-q",
    ]
    assert main(argv) == 130
    assert capsys.readouterr().err == "quantrain: interrupted\n"
    assert seen == {
        "dataset": "fashion-mnist",
        "epochs": 2,
        "qat_epochs": 3,
        "bits": 4,
        "seed": 0,
        "progress": False,
        "out_dir": str(tmp_path),
    }


def test_demo_without_scikit_learn_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--epochs", "1", "--qat-epochs", "1", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("quantrain: error: ") and "pip install 'quantrain[demo]'" in err and "Traceback" not in err


def test_demo_with_missing_dataset_files_exits_4(monkeypatch, capsys):
    import quantrain.demo

    def missing(**kwargs):
        raise FileNotFoundError("Fashion-MNIST not found; apt-get install dataset-fashion-mnist")

    monkeypatch.setattr(quantrain.demo, "run_demo", missing)
    assert main(["demo", "--dataset", "fashion-mnist"]) == 4
    assert capsys.readouterr().err == "quantrain: error: Fashion-MNIST not found; apt-get install dataset-fashion-mnist\n"


@pytest.mark.slow
def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "quantrain", "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--qat-epochs" in result.stdout


@pytest.mark.slow
def test_module_entry_point_exit_code_and_error_line(tmp_path):
    missing = str(tmp_path / "missing.onnx")
    result = subprocess.run([sys.executable, "-m", "quantrain", "inspect", missing], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"quantrain: error: {missing}: no such file\n")
