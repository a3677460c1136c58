"""The step-overhead benchmark runs its workers end to end on digits and reports step times and memory against float;
its saved-tensor measurement matches what autograd saves, counted by hand."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("step_overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_rows(benchmark, tmp_path, capsys):
    out = tmp_path / "step_overhead.json"
    methods = ["float", "quantrain", "torch.ao", "nni"]
    argv = ["--models", "digits", "--methods", *methods, "--rounds", "2", "--steps", "2", "--warmup", "1", "--threads", "1"]
    no_nni = str(tmp_path / "no-such-python")  # the NNI column is skipped, with the reason, where NNI is not found
    assert benchmark.main([*argv, "--nni-python", no_nni, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"float", "quantrain", "torch.ao"} and report["errors"] == []
    assert "does not exist" in report["skipped"]["nni"]
    for row in rows.values():
        assert row["model"] == "digits" and row["steps"] == 4
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["x_float"] > 0
        assert row["train_peak_mib"] >= 0 and row["peak_mib"] >= row["baseline_mib"]
        parts = row["tensor_bytes"]
        assert row["saved_mib"] > 0 and row["peak_tensor_mib"] > row["saved_mib"] and row["x_float_peak_tensor"] > 0
        assert parts["saved"] == row["saved_mib"] * 2**20 and parts["peak"] == row["peak_tensor_mib"] * 2**20
        assert parts["peak"] == parts["saved"] + parts["parameters"] + parts["gradients"] + parts["optimizer_state"]
        assert parts["parameters"] == parts["gradients"] == parts["optimizer_state"] > 0  # SGD: one momentum each
        assert row["saved_top"][0]["nbytes"] > 0 and row["saved_top"][0]["saved_by"] and row["saved_note"] is None
    assert rows["float"]["x_float"] == 1.0 and rows["float"]["x_float_memory"] in (1.0, None)
    assert rows["float"]["x_float_peak_tensor"] == 1.0  # deterministic, unlike the RSS ratio
    assert rows["quantrain"]["saved_mib"] > rows["float"]["saved_mib"]
    quantrain = rows["quantrain"]["prepared"]
    assert quantrain["quantized_modules"] == 4 and quantrain["fake_quantizers"] > 0
    assert quantrain["quantizer_steps"] == 1 + 4  # the quantizer counted every optimizer step: QAT was on
    assert rows["torch.ao"]["prepared"]["fake_quantizers"] > 0
    assert report["environment"]["threads"] == 1
    output = capsys.readouterr().out
    assert "| digits (64) | quantrain |" in output and "nni column skipped" in output
    assert "| saved MiB | peak tensor MiB | x float tensors | RSS train peak MiB |" in output


def test_nni_column_where_nni_is_found(benchmark, tmp_path):
    if not os.environ.get("QUANTRAIN_NNI_PYTHON"):  # NNI lives in its own venv: opt in (it takes a while)
        pytest.skip("set QUANTRAIN_NNI_PYTHON to an interpreter with NNI 3.0 to run the NNI column")
    nni_python = benchmark.find_nni_python()
    if not nni_python.available:
        pytest.skip(f"no interpreter with NNI 3.0: {nni_python.reason}")
    out = tmp_path / "step_overhead.json"
    argv = ["--models", "mlp", "--methods", "float", "quantrain", "nni", "--rounds", "1", "--steps", "2", "--warmup", "1"]
    assert benchmark.main([*argv, "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"float", "quantrain", "nni"} and report["errors"] == [] and report["skipped"] == {}
    nni, quantrain = rows["nni"]["prepared"], rows["quantrain"]["prepared"]
    assert nni["quantizer_steps"] == 1 + 2  # NNI counted every step of the worker's loop, inside its compress()
    for key in ("quantized_modules", "fake_quantizers", "folded_batchnorms", "calibrated_modules"):
        assert nni[key] == quantrain[key]
    assert nni["final_loss"] == quantrain["final_loss"]  # no BatchNorm to fold: the same numbers, step for step
    assert rows["nni"]["saved_mib"] > rows["float"]["saved_mib"] and rows["nni"]["x_float"] > 0


def test_saved_bytes_of_a_linear_layer_by_hand(benchmark):
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])

    def saved_bytes(x, exclude):
        loss, saved = benchmark.saved_for_backward(lambda: F.cross_entropy(linear(x), y), exclude)
        loss.backward()
        return sum(storage.nbytes for storage in saved)

    # linear = addmm(bias, x, weight.t()): it saves x (mat1, 2x4 float32 = 32 bytes) for the weight's gradient, and
    # weight.t() (mat2) only when x needs a gradient; never the bias. cross_entropy = log_softmax, which saves its
    # result (2x3 float32 = 24), + nll_loss, which saves that same tensor (counted once), the target (2 int64 = 16)
    # and total_weight (a 0-dim float32 = 4): 32 + 24 + 16 + 4 = 76 bytes.
    assert saved_bytes(x, linear.parameters()) == 76
    x_grad = x.clone().requires_grad_()
    assert saved_bytes(x_grad, linear.parameters()) == 76  # weight.t() shares the weight's storage: excluded
    assert saved_bytes(x_grad, ()) == 76 + 3 * 4 * 4  # the weight counted: 12 float32 more


def test_mlp_saved_bytes(benchmark):
    memory = {}
    for method in ("float", "quantrain"):
        _, memory[method] = benchmark.measured_step(benchmark.setup("mlp", method))  # as a worker's first step
    parts = memory["float"]["tensor_bytes"]
    # Float 784-1024-1024-10, batch 256: the input (256x784 float32), each ReLU's output (256x1024, kept by the ReLU and
    # the next addmm), the log-softmax output (256x10), the targets (256 int64) and nll_loss's total weight (4 bytes).
    assert memory["float"]["saved_bytes"] == 4 * 256 * 784 + 2 * 4 * 256 * 1024 + 4 * 256 * 10 + 8 * 256 + 4
    assert parts["parameters"] == 4 * (785 * 1024 + 1025 * 1024 + 1025 * 10) == parts["gradients"] == parts["optimizer_state"]
    # QAT also keeps fake-quantized copies (weights, activations) and the straight-through estimator's masks.
    assert memory["quantrain"]["saved_bytes"] > memory["float"]["saved_bytes"]
    assert memory["quantrain"]["tensor_bytes"]["parameters"] == parts["parameters"]
