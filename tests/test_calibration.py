"""calibration_config JSON: exact round trip, and clear errors for damaged files."""

import json

import pytest
import torch
from torch import nn

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
