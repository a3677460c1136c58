"""The command line and the demo."""

import json
import subprocess
import sys

import pytest

from quantrain import load_calibration_config
from quantrain.cli import build_parser, main
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
    assert main(["demo", "--epochs", "1", "--qat-epochs", "1", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert f"{summary['qat_accuracy']:.2f}%" in printed
    assert summary["onnx_runtime"]["int8_bytes"] > 0
    calibration = load_calibration_config(tmp_path / "result.calibration.json")

    assert calibration["0"]["weight"]["scale"].shape == (16, 1, 1, 1)


@pytest.mark.parametrize("argv", [["demo", "--bits", "9"], ["demo", "--epochs", "0"], ["nonsense"], []])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "quantrain", "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--qat-epochs" in result.stdout
