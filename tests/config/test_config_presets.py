"""The deployable preset is the layout the exporter maps exactly onto ONNX Runtime's integer kernels."""

from quantrain.config import parse_config_list
from quantrain.config.presets import deployable_config_list


def test_deployable_preset_layout():
    config = deployable_config_list(4, 8, input_module="stem", output_op_types=("Add",))
    entries = parse_config_list(config)
    first, layers, adds = entries
    assert first.op_names == ("stem",) and first.target_names == ("_input_0",)
    assert first.settings_for("_input_0").dtype.name == "uint8" and first.settings_for("_input_0").scheme.value == "affine"
    weight = layers.settings_for("weight")
    assert (weight.dtype.name, weight.scheme.value, weight.granularity.spec) == ("int4", "symmetric", "out_channel")
    assert layers.target_names == ("weight", "_output_0") and layers.op_types == ("Conv2d", "Linear")
    assert adds.op_types == ("Add",) and adds.target_names == ("_output_0",)
    assert len(deployable_config_list()) == 2
