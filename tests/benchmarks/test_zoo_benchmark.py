"""The zoo benchmark runs end to end on one model and reports step cost, latency ratios and parity."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo.py"


def test_one_model_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("zoo_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "zoo.json"
    assert module.main(["--models", "mnist_cnn", "--runs", "3", "--steps", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "mnist_cnn" and row["qat_x_float"] > 0
    assert row["quantrain_vs_ort_static"] == row["ort_static_ms"] / row["quantrain_ms"]
    int8_ms = row.get("quantrain_int8_ms", row["quantrain_ms"])  # a second file only where int8 weights saturate
    assert row["int8_weights_vs_ort_static"] == pytest.approx(row["ort_static_ms"] / int8_ms, rel=1e-12)
    assert row["top1_agreement"] == 1.0 and row["parity_steps"] <= 1.0 + 1e-4 and row["float_islands"] == 0
    assert row["pytorch_vs_float64_steps"] <= 1.0 + 1e-4 and row["onnx_vs_float64_steps"] <= 1.0 + 1e-4
    assert "| mnist_cnn |" in capsys.readouterr().out
