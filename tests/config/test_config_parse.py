"""parse_config_list: shortcuts, per-target overrides, legacy keys, canonical target names, regexes, fuse_names."""

import re

import pytest

from quantrain.config import (
    ConfigEntry,
    Granularity,
    GranularityKind,
    QuantDtype,
    QuantScheme,
    TargetSettings,
    canonical_target_name,
    parse_config_list,
)


def parse_one(entry: dict) -> ConfigEntry:
    (parsed,) = parse_config_list([entry])
    return parsed


def test_empty_config_list_parses_to_no_entries():
    assert parse_config_list([]) == ()


def test_entries_keep_their_index_and_selection_keys():
    entries = parse_config_list(
        (
            {"op_types": ["Linear", "Conv2d"]},
            {"op_names": ["fc1", "block.fc2"], "exclude_op_types": ["ReLU"], "exclude_op_names": ["fc3"]},
        )
    )
    assert [e.index for e in entries] == [0, 1]
    assert entries[0].op_types == ("Linear", "Conv2d")
    assert entries[0].op_names == ()
    assert entries[0].target_names is None
    assert entries[1].op_names == ("fc1", "block.fc2")
    assert entries[1].exclude_op_types == ("ReLU",)
    assert entries[1].exclude_op_names == ("fc3",)


def test_none_valued_keys_count_as_absent():
    entry = parse_one({"op_types": ["Linear"], "op_names": None, "target_names": None, "quant_dtype": None, "fuse_names": None})
    assert entry.op_names == ()
    assert entry.target_names is None
    assert entry.settings == TargetSettings()
    assert entry.fuse_names == ()


def test_no_settings_means_int8_symmetric_per_tensor():
    entry = parse_one({"op_types": ["Linear"]})
    assert entry.settings.dtype == QuantDtype(8, True)
    assert entry.settings.scheme is QuantScheme.SYMMETRIC
    assert entry.settings.granularity.kind is GranularityKind.PER_TENSOR
    assert dict(entry.target_settings) == {}


def test_shortcut_settings_apply_to_every_target():
    entry = parse_one(
        {
            "op_types": ["Linear"],
            "target_names": ["weight", "bias", "_input_", "_output_"],
            "quant_dtype": "uint4",
            "quant_scheme": "affine",
            "granularity": [1, -1],
            "apply_method": "bypass",
        }
    )
    expected = TargetSettings(
        dtype=QuantDtype(4, False),
        scheme=QuantScheme.AFFINE,
        granularity=Granularity(GranularityKind.BLOCK, (1, -1)),
        apply_method="bypass",
    )
    assert entry.settings == expected
    for target in ("weight", "bias", "_input_0", "_output_0"):
        assert entry.settings_for(target) == expected
    assert dict(entry.target_settings) == {}


def test_target_settings_override_per_key_and_inherit_the_rest():
    entry = parse_one(
        {
            "op_types": ["Linear"],
            "quant_dtype": "int4",
            "quant_scheme": "affine",
            "granularity": "default",
            "target_settings": {
                "weight": {"quant_dtype": "int8", "granularity": "out_channel"},
                "_input_": {"quant_scheme": "symmetric"},
            },
        }
    )
    weight = entry.settings_for("weight")
    assert weight.dtype == QuantDtype(8, True)
    assert weight.scheme is QuantScheme.AFFINE  # inherited
    assert weight.granularity == Granularity(GranularityKind.OUT_CHANNEL)
    inp = entry.settings_for("_input_0")
    assert inp.dtype == QuantDtype(4, True)  # inherited
    assert inp.scheme is QuantScheme.SYMMETRIC
    assert inp.granularity.kind is GranularityKind.PER_TENSOR
    # a target without its own settings gets the shortcuts
    bias = entry.settings_for("bias")
    assert (bias.dtype, bias.scheme) == (QuantDtype(4, True), QuantScheme.AFFINE)
    assert set(entry.target_settings) == {"weight", "_input_0"}


def test_target_settings_alone_leave_top_level_defaults():
    entry = parse_one({"op_types": ["Linear"], "target_settings": {"_output_": {"quant_dtype": "uint8"}}})
    assert entry.settings_for("_output_0").dtype == QuantDtype(8, False)
    assert entry.settings_for("weight").dtype == QuantDtype(8, True)


def test_target_settings_keys_are_canonicalised():
    entry = parse_one(
        {
            "op_types": ["Linear"],
            "target_settings": {"_input_": {"quant_dtype": "int2"}, "_output_": {"quant_dtype": "int3"}},
        }
    )
    assert set(entry.target_settings) == {"_input_0", "_output_0"}
    assert entry.settings_for("_input_0").dtype.bits == 2
    assert entry.settings_for("_output_0").dtype.bits == 3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_legacy_quant_bits_means_signed_int(bits):
    entry = parse_one({"op_types": ["Linear"], "quant_bits": bits})
    assert entry.settings.dtype == QuantDtype(bits, True)
    assert entry.settings.dtype.name == f"int{bits}"


def test_legacy_quant_bits_in_target_settings_overrides_top_level_dtype():
    entry = parse_one(
        {
            "op_types": ["Linear"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_bits": 4}},
        }
    )
    assert entry.settings_for("weight").dtype == QuantDtype(4, True)
    assert entry.settings_for("weight").scheme is QuantScheme.AFFINE
    assert entry.settings_for("bias").dtype == QuantDtype(8, False)


def test_target_quant_dtype_overrides_top_level_legacy_quant_bits():
    entry = parse_one({"op_types": ["Linear"], "quant_bits": 4, "target_settings": {"weight": {"quant_dtype": "uint8"}}})
    assert entry.settings_for("weight").dtype == QuantDtype(8, False)
    assert entry.settings_for("_input_0").dtype == QuantDtype(4, True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("_input_", "_input_0"),
        ("_output_", "_output_0"),
        ("_input_0", "_input_0"),
        ("_input_1", "_input_1"),
        ("_output_2", "_output_2"),
        ("_input_mask", "_input_mask"),
        ("weight", "weight"),
    ],
)
def test_canonical_target_name(name, expected):
    assert canonical_target_name(name) == expected


def test_target_names_are_canonicalised_and_deduplicated_in_order():
    entry = parse_one(
        {
            "op_types": ["Linear"],
            "target_names": ["_output_", "weight", "_input_", "_input_0", "_input_1", "_output_logits", "weight"],
        }
    )
    assert entry.target_names == ("_output_0", "weight", "_input_0", "_input_1", "_output_logits")


def test_regexes_are_compiled():
    entry = parse_one({"op_names_re": [r"block\.fc\d+", "conv"], "exclude_op_names_re": [r".*\.act$"]})
    assert all(isinstance(p, re.Pattern) for p in (*entry.op_names_re, *entry.exclude_op_names_re))
    assert [p.pattern for p in entry.op_names_re] == [r"block\.fc\d+", "conv"]
    assert entry.op_names_re[0].match("block.fc12") is not None
    assert entry.op_names_re[0].match("block.fcx") is None
    assert entry.exclude_op_names_re[0].pattern == r".*\.act$"


def test_fuse_names_become_tuples_of_tuples():
    entry = parse_one({"op_types": ["Conv2d", "Linear"], "fuse_names": [["conv1", "bn1", "relu1"], ("fc1", "relu2")]})
    assert entry.fuse_names == (("conv1", "bn1", "relu1"), ("fc1", "relu2"))
    assert all(type(group) is tuple for group in entry.fuse_names)


@pytest.mark.parametrize(
    ("fuse_names", "exc_type"),
    [
        ("conv1", TypeError),
        ([("conv1",)], ValueError),
        ([("conv1", "bn1", "relu1", "x")], ValueError),
        (["conv1"], TypeError),
        ([("conv1", 2)], TypeError),
    ],
)
def test_malformed_fuse_names_are_rejected(fuse_names, exc_type):
    with pytest.raises(exc_type, match=r"config_list\[0\]: key 'fuse_names'"):
        parse_config_list([{"op_types": ["Conv2d"], "fuse_names": fuse_names}])


def test_parsed_entry_is_frozen():
    entry = parse_one({"op_types": ["Linear"], "target_settings": {"weight": {"quant_dtype": "int4"}}})
    with pytest.raises(AttributeError):
        entry.op_types = ("Conv2d",)
    with pytest.raises(TypeError):
        entry.target_settings["bias"] = TargetSettings()


def test_config_list_is_not_mutated():
    config = [{"op_types": ["Linear"], "target_names": ["_input_"], "target_settings": {"_input_": {"quant_bits": 4}}}]
    parse_config_list(config)
    assert config == [{"op_types": ["Linear"], "target_names": ["_input_"], "target_settings": {"_input_": {"quant_bits": 4}}}]
