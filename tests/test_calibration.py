"""calibration_config JSON: exact round trip, and clear errors for damaged files."""

import json

import pytest
import torch
from torch import nn

from helpers import reference_qparams
from quantrain import QATQuantizer, load_calibration_config, save_calibration_config


def _config():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU())
    config_list = [
        {
            "op_types": ["Conv2d"],
            "quant_scheme": "affine",
            "quant_dtype": "uint8",
            "target_settings": {"weight": {"quant_dtype": "int4", "quant_scheme": "symmetric", "granularity": "out_channel"}},
        }
    ]
    quantizer = QATQuantizer(model, config_list)
    for _ in range(3):
        model(torch.randn(4, 2, 6, 6))
    return quantizer.get_calibration_config()


def test_json_round_trip_is_exact(tmp_path):
    config = _config()
    path = tmp_path / "calibration.json"
    save_calibration_config(config, path)
    loaded = load_calibration_config(path)
    assert loaded.keys() == config.keys()
    for module, targets in config.items():
        assert loaded[module].keys() == targets.keys()
        for target, entry in targets.items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(loaded[module][target][key], value), (module, target, key)
                    assert loaded[module][target][key].shape == value.shape
                else:
                    assert loaded[module][target][key] == value
    assert loaded["0"]["weight"]["quant_dtype"] == "int4" and loaded["0"]["weight"]["scale"].shape == (3, 1, 1, 1)


def test_a_bare_dict_of_lists_loads(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(
        json.dumps(
            {
                "fc1": {
                    "weight": {
                        "scale": [[0.5], [0.25]],
                        "zero_point": [[0.0], [0.0]],
                        "quant_dtype": "int8",
                        "quant_scheme": "symmetric",
                    }
                }
            }
        )
    )
    entry = load_calibration_config(path)["fc1"]["weight"]
    assert torch.equal(entry["scale"], torch.tensor([[0.5], [0.25]]))
    assert entry["quant_bits"] == 8


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "quantrain.calibration_config", "version": 99, "modules": {}}', "version"),
        ("[1, 2]", "expected an object"),
        ('{"fc": [1]}', "must be an object of targets"),
        ('{"fc": {"weight": {"scale": 0.5}}}', "lacks"),
        ('{"fc": {"weight": {"scale": "x", "zero_point": 0}}}', "not a number"),
        ('{"fc": {"weight": {"scale": -1.0, "zero_point": 0}}}', "positive"),
        ('{"fc": {"weight": {"scale": [1.0, 2.0], "zero_point": 0}}}', "shape"),
        ('{"fc": {"weight": {"scale": 1.0, "zero_point": 0, "quant_dtype": "int9"}}}', "int9"),
        ('{"fc": {"weight": {"scale": NaN, "zero_point": 0}}}', "NaN"),
    ],
)
def test_damaged_files_raise_value_errors_naming_the_entry(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_calibration_config(path)
    assert str(path) in str(info.value)


# ---- loading a calibration_config into a quantizer --------------------------------------------------------------

LINEAR_CONFIG = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _nni_entry(lo: float, hi: float) -> dict:
    """What NNI 3.0's get_calibration_config() gives for an int8 affine target, its tensors as lists (JSON)."""
    scale, zero_point = reference_qparams(torch.tensor(lo), torch.tensor(hi), -127, 127, symmetric=False)
    return {
        "scale": scale.tolist(),
        "zero_point": zero_point.tolist(),
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "quant_bits": 8,
        "tracked_min": lo,
        "tracked_max": hi,
    }


def _nni_calibration() -> dict:
    return {
        "0": {"_input_0": _nni_entry(-2.5, 2.4), "weight": _nni_entry(-0.49, 0.5), "_output_0": _nni_entry(-1.3, 1.6)},
        "2": {"_input_0": _nni_entry(0.0, 1.6), "weight": _nni_entry(-0.35, 0.33), "_output_0": _nni_entry(-0.9, 0.8)},
    }


def test_a_trained_calibration_config_loads_into_a_fresh_quantizer_exactly(tmp_path):
    trained = _mlp()
    quantizer = QATQuantizer(trained, LINEAR_CONFIG)
    for _ in range(5):
        trained(torch.randn(16, 4))
    save_calibration_config(quantizer.get_calibration_config(), tmp_path / "calibration.json")

    fresh = _mlp()
    fresh_quantizer = QATQuantizer(fresh, LINEAR_CONFIG)
    uncovered = fresh_quantizer.set_calibration_config(load_calibration_config(tmp_path / "calibration.json"))
    assert uncovered == []
    expected, loaded = quantizer.get_calibration_config(), fresh_quantizer.get_calibration_config()
    for module, targets in expected.items():
        for target, entry in targets.items():
            for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
                assert torch.equal(loaded[module][target][key], entry[key]), (module, target, key)
    x = torch.randn(8, 4)
    assert torch.equal(trained.eval()(x), fresh.eval()(x))  # the same weights (same seed), the same qparams


def test_an_nni_calibration_json_loads_and_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export check runs the model in ONNX Runtime")
    import onnx
    from onnx import numpy_helper

    from quantrain import check_parity, export_onnx

    path = tmp_path / "nni_calibration.json"
    path.write_text(json.dumps(_nni_calibration()))
    model = _mlp()
    quantizer = QATQuantizer(model, LINEAR_CONFIG)
    assert quantizer.set_calibration_config(load_calibration_config(path)) == []
    config = quantizer.get_calibration_config()
    nni = _nni_calibration()
    assert config["0"]["weight"]["scale"].item() == pytest.approx(nni["0"]["weight"]["scale"], rel=1e-7)
    assert config["2"]["_output_0"]["zero_point"].item() == nni["2"]["_output_0"]["zero_point"]
    assert config["0"]["_input_0"]["tracked_max"].item() == pytest.approx(2.4)

    model.eval()
    report = export_onnx(model, torch.randn(1, 4), tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node if node.op_type == "Constant"}
    constants.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
    scales = [float(constants[n.input[1]]) for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for module in nni.values():
        for entry in module.values():
            assert any(abs(s - entry["scale"]) <= 1e-9 for s in scales), entry["scale"]
    assert report.notes  # int8 activations export as ONNX int8, whose range is [-128, 127]: the report says so
    parity = check_parity(model, tmp_path / "model.onnx", torch.randn(256, 4) * 0.6)
    assert parity.outputs[0].top1_agreement >= 0.99


def test_a_missing_range_is_the_one_the_scale_represents():
    model = _mlp()
    quantizer = QATQuantizer(
        model, [{"op_names": ["0"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "affine"}]
    )
    quantizer.set_calibration_config({"0": {"_output_0": {"scale": 0.02, "zero_point": 10.0}}})
    fq = model[0].fake_quant["_output_0"]
    assert fq.observer.tracked_min.item() == pytest.approx(-0.2) and fq.observer.tracked_max.item() == pytest.approx(4.9)
    assert fq.is_calibrated and fq.observer.is_seeded


@pytest.mark.parametrize(
    "calibration, match",
    [
        ({"9": {"weight": {"scale": 0.1, "zero_point": 0.0}}}, r"\['9'\]\['weight'\]: no such target \('9' is not a quantized"),
        ({"0": {"bias": {"scale": 0.1, "zero_point": 0.0}}}, r"\['0'\]\['bias'\]: no such target"),
        ({"0": {"weight": {"scale": 0.1, "zero_point": 0.0, "quant_dtype": "uint8"}}}, "quant_dtype is 'uint8', but .* 'int8'"),
        ({"0": {"weight": {"scale": 0.1, "zero_point": 0.0, "quant_scheme": "symmetric"}}}, "quant_scheme is 'symmetric'"),
        (
            {"0": {"weight": {"scale": [0.1, 0.2], "zero_point": [0.0, 0.0]}}},
            "0.weight: a per-tensor target takes one scale, got 2",
        ),
        ({"0": {"weight": {"scale": -0.1, "zero_point": 0.0}}}, "0.weight: scale must be finite and positive"),
        ({"0": {"weight": {"scale": 0.1, "zero_point": 0.5}}}, r"0.weight: zero_point must hold integers in \[-127, 127\]"),
        ({"0": {"weight": {"scale": 0.1, "zero_point": 200.0}}}, "zero_point must hold integers"),
        ({"0": {"weight": {"scale": 0.1}}}, "expected a dict with 'scale' and 'zero_point'"),
        ({"0": {"weight": {"scale": "big", "zero_point": 0.0}}}, "scale is not a number"),
    ],
)
def test_a_calibration_that_does_not_fit_changes_nothing(calibration, match):
    model = _mlp()
    quantizer = QATQuantizer(model, LINEAR_CONFIG)
    good = {"2": {"weight": {"scale": 0.01, "zero_point": 0.0}}}  # valid, listed first: must not be applied either
    with pytest.raises(ValueError, match=match):
        quantizer.set_calibration_config({**good, **calibration})
    assert quantizer.get_calibration_config() == {}


def test_strict_false_skips_unknown_targets_and_lists_what_is_not_covered():
    model = _mlp()
    quantizer = QATQuantizer(model, LINEAR_CONFIG)
    uncovered = quantizer.set_calibration_config(
        {"0": {"weight": {"scale": 0.01, "zero_point": 0.0}, "bias": {"scale": 0.1, "zero_point": 0.0}}, "9": {}}, strict=False
    )
    assert sorted(uncovered) == ["0._input_0", "0._output_0", "2._input_0", "2._output_0", "2.weight"]
    assert quantizer.get_calibration_config()["0"]["weight"]["scale"].item() == pytest.approx(0.01)


def test_per_channel_scales_take_the_targets_shape_from_any_layout():
    model = _mlp()
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["weight"],
            "quant_dtype": "int8",
            "quant_scheme": "symmetric",
            "granularity": "out_channel",
        }
    ]
    quantizer = QATQuantizer(model, config)
    quantizer.set_calibration_config(
        {"0": {"weight": {"scale": [[0.01 * (i + 1)] for i in range(8)], "zero_point": [0.0] * 8}}}, strict=False
    )
    scale = model[0].fake_quant["weight"].scale
    assert scale.shape == (8, 1) and torch.allclose(scale.flatten(), torch.arange(1, 9) * 0.01)
    with pytest.raises(ValueError, match="symmetric int8 target has zero_point 0"):
        quantizer.set_calibration_config({"2": {"weight": {"scale": [0.1, 0.1, 0.1], "zero_point": [1.0, 0.0, 0.0]}}})
