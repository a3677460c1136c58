"""The NNI parity benchmark runs its quantrain side without NNI, and its comparison finds exactly what differs."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nni_parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("nni_parity_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quantrain_side_of_the_qat_steps_case(parity, tmp_path):
    inputs = tmp_path / "inputs.pt"
    threads = torch.get_num_threads()
    try:
        parity.make_inputs(str(inputs))
        result = parity.run_side("quantrain", ["qat-steps"], str(inputs))
    finally:
        torch.set_num_threads(threads)
    assert result["side"] == "quantrain" and result["environment"]["threads"] == 1
    case = result["cases"]["qat-steps"]
    assert "error" not in case, case.get("traceback")
    stage = case["stages"]["qat"]
    assert stage["current_step"] == 40 and 0.0 < stage["accuracy"] <= 1.0
    config = stage["calibration_config"]
    assert {module: sorted(targets) for module, targets in config.items()} == {
        "conv1": ["_input_0", "_output_0", "weight"],
        "conv2": ["_input_0", "_output_0", "weight"],
        "fc1": ["_input_0", "_output_0", "weight"],
        "fc2": ["_input_0", "_output_0", "weight"],
        "relu1": ["_output_0"],
        "relu2": ["_output_0"],
        "relu3": ["_output_0"],
    }
    weight = config["fc1"]["weight"]
    assert (weight["quant_dtype"], weight["quant_scheme"], weight["quant_bits"]) == ("int8", "symmetric", 8)
    assert len(weight["scale"]) == 64 and len(weight["scale"][0]) == 1  # one scale per output channel, as nested lists
    assert config["relu1"]["_output_0"]["zero_point"] == 128.0  # uint8 symmetric
    assert stage["dtypes"]["fc1"]["weight"] == dict.fromkeys(("scale", "zero_point", "tracked_min", "tracked_max"), "float32")
    assert set(stage["parameters"]) == {f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")}
    same = parity.compare_configs(config, config, stage["dtypes"], stage["dtypes"])
    assert same["count"] == same["identical"] == 15 and same["max_abs"] == 0.0


def entry(scale, zero_point=0.0, tracked_min=-1.0, tracked_max=1.0):
    return {
        "scale": scale,
        "zero_point": zero_point,
        "quant_dtype": "int8",
        "quant_scheme": "symmetric",
        "quant_bits": 8,
        "tracked_min": tracked_min,
        "tracked_max": tracked_max,
    }


def test_comparison_of_hand_made_configs(parity):
    nni = {"fc": {"weight": entry([[0.25], [0.5]], [[0.0], [0.0]], [[-1.0], [-2.0]], [[1.0], [2.0]]), "_output_0": entry(0.5)}}
    quantrain = copy.deepcopy(nni)
    quantrain["fc"]["_output_0"]["scale"] = 0.5 + 2**-20
    result = parity.compare_configs(nni, quantrain)
    assert (result["count"], result["identical"]) == (2, 1)
    output, weight = result["entries"]  # sorted by target name
    assert (output["target"], weight["target"]) == ("_output_0", "weight")
    assert weight["identical"] and weight["max_abs"] == 0.0 and all(k["identical"] for k in weight["keys"].values())
    assert not output["identical"] and output["max_abs"] == result["max_abs"] == 2**-20
    assert output["keys"]["scale"]["max_rel"] == pytest.approx(2**-20 / (0.5 + 2**-20))
    assert output["keys"]["scale"]["nni"] == 0.5 and output["keys"]["scale"]["quantrain"] == 0.5 + 2**-20
    assert [key for key, k in output["keys"].items() if not k["identical"]] == ["scale"]


def test_comparison_reports_missing_entries_shapes_and_dtypes(parity):
    nni = {"fc": {"weight": entry([[0.25], [0.5]])}, "conv": {"_input_0": entry(0.1)}}
    quantrain = {"fc": {"weight": entry(0.25)}}
    result = parity.compare_configs(nni, quantrain)
    assert result["identical"] == 0 and result["count"] == 2
    missing, weight = result["entries"]
    assert missing["missing_in"] == "quantrain"
    assert weight["keys"]["scale"]["shape"] == {"nni": (2, 1), "quantrain": ()}
    dtypes = {"fc": {"weight": {"scale": "float32"}}}
    same = {"fc": {"weight": entry(0.25)}}
    typed = parity.compare_configs(same, same, dtypes, {"fc": {"weight": {"scale": "float64"}}})
    assert typed["identical"] == 0 and typed["entries"][0]["keys"]["scale"]["dtype"]["quantrain"] == "float64"


def test_rows_without_nni(parity):
    stage = {"calibration_config": {"fc": {"weight": entry(0.5)}}, "current_step": 3, "accuracy": 0.5}
    (row,) = parity.compare_sides(["qat-steps"], None, {"cases": {"qat-steps": {"stages": {"qat": stage}}}}, "no NNI here")
    assert (row.case, row.entries, row.identical, row.max_abs) == (
        "qat-steps / qat",
        "1",
        "skipped: no NNI here",
        "skipped: no NNI here",
    )
    assert "| qat-steps / qat | 1 | skipped: no NNI here |" in parity.format_table([row])
    missing = parity.find_nni_python(str(Path(__file__).parent / "no-such-python"))
    assert not missing.available and "does not exist" in missing.describe()
