"""Every bad config_list fails with a ValueError/TypeError naming the entry and key, before the model is touched."""

import pytest
import torch
from torch import nn

import quantrain
from quantrain.config import parse_config_list, resolve


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 4)
        self.fc_relu = nn.ReLU()
        self.fc2 = nn.Linear(4, 3, bias=False)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc2(self.fc_relu(self.fc(x)))


GOOD = {"op_names": ["conv"], "quant_dtype": "int8"}

# (config_list, exception type, entry index, key as named in the message, another substring of the message)
CASES = [
    pytest.param([{"op_type": ["Linear"]}], ValueError, 0, "'op_type'", "did you mean 'op_types'?", id="unknown-key-op_type"),
    pytest.param([GOOD, {"op_types": ["Linear"], "bits": 8}], ValueError, 1, "'bits'", "unknown key", id="unknown-key"),
    pytest.param([{"target_names": ["weight"]}], ValueError, 0, "'op_types'", "at least one non-empty", id="no-selection-key"),
    pytest.param([{"op_types": "Linear"}], TypeError, 0, "'op_types'", "list of strings", id="op_types-str"),
    pytest.param([{"op_types": [nn.Linear]}], TypeError, 0, "'op_types'", "only strings", id="op_types-class"),
    pytest.param([{"op_names": "fc"}], TypeError, 0, "'op_names'", "list of strings", id="op_names-str"),
    pytest.param(
        [GOOD, {"op_names": ["fc"], "target_names": "weight"}], TypeError, 1, "'target_names'", "list", id="target_names-str"
    ),
    pytest.param([{"op_names": ["fc"], "target_names": []}], ValueError, 0, "'target_names'", "empty", id="target_names-empty"),
    pytest.param([{"op_names": ["fc"], "target_names": [0]}], TypeError, 0, "'target_names'", "strings", id="target_name-int"),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["_input_a-b"]}],
        ValueError,
        0,
        "'target_names'",
        "_input_a-b",
        id="target_name-bad",
    ),
    pytest.param([{"op_names": ["fc"], "quant_bits": "8"}], TypeError, 0, "'quant_bits'", "int", id="quant_bits-str"),
    pytest.param([{"op_names": ["fc"], "quant_bits": 9}], ValueError, 0, "'quant_bits'", "int9", id="quant_bits-9"),
    pytest.param(
        [{"op_names": ["fc"], "quant_bits": 8, "quant_dtype": "int8"}],
        ValueError,
        0,
        "'quant_bits'",
        "not both",
        id="bits-and-dtype",
    ),
    pytest.param([GOOD, "fc"], TypeError, 1, "", "must be a dict", id="entry-not-dict"),
    pytest.param([{"op_names": ["fc"], "quant_dtype": "int9"}], ValueError, 0, "'quant_dtype'", "int9", id="dtype-int9"),
    pytest.param([{"op_names": ["fc"], "quant_dtype": "float8"}], ValueError, 0, "'quant_dtype'", "float8", id="dtype-float8"),
    pytest.param([{"op_names": ["fc"], "quant_dtype": 8}], TypeError, 0, "'quant_dtype'", "int", id="dtype-int"),
    pytest.param(
        [{"op_names": ["fc"], "quant_scheme": "asymmetric"}], ValueError, 0, "'quant_scheme'", "asymmetric", id="scheme"
    ),
    pytest.param(
        [{"op_names": ["fc"], "granularity": "per_row"}], ValueError, 0, "'granularity'", "per_row", id="granularity-str"
    ),
    pytest.param(
        [{"op_names": ["fc"], "granularity": [0, -1]}], ValueError, 0, "'granularity'", "positive", id="granularity-zero"
    ),
    pytest.param([{"op_names": ["fc"], "granularity": []}], TypeError, 0, "'granularity'", "non-empty", id="granularity-empty"),
    pytest.param([{"op_names": ["fc"], "apply_method": "round"}], ValueError, 0, "'apply_method'", "round", id="apply_method"),
    pytest.param([{"op_names_re": ["fc("]}], ValueError, 0, "'op_names_re'", "regular expression", id="bad-regex"),
    pytest.param(
        [{"op_names": ["fc"], "target_settings": {"weight": {"quant_dtype": "int1"}}}],
        ValueError,
        0,
        "\"target_settings['weight'].quant_dtype\"",
        "int1",
        id="target-dtype",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_settings": {"weight": {"quant_dtyp": "int8"}}}],
        ValueError,
        0,
        "target_settings['weight'].quant_dtyp",
        "did you mean 'quant_dtype'?",
        id="target-unknown-setting",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_settings": {"weight": "int8"}}],
        TypeError,
        0,
        "\"target_settings['weight']\"",
        "dict",
        id="target-settings-not-dict",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["weight"], "target_settings": {"bias": {"quant_dtype": "int8"}}}],
        ValueError,
        0,
        "'target_settings'",
        "not one of target_names",
        id="target-settings-not-in-names",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_settings": {"_output_1": {"quant_dtype": "int8"}}}],
        ValueError,
        0,
        "'target_settings'",
        "not a default target",
        id="target-settings-not-default",
    ),
    pytest.param([GOOD, {"op_names": ["fc9"]}], ValueError, 1, "'op_names'", "'fc9'", id="op_names-missing"),
    pytest.param([{"op_types": ["Linaer"]}], ValueError, 0, "'op_types'", "did you mean 'Linear'?", id="op_types-unknown"),
    pytest.param(
        [GOOD, {"op_types": ["Linear"], "exclude_op_names": ["fc3"]}],
        ValueError,
        1,
        "'exclude_op_names'",
        "'fc3'",
        id="exclude-missing",
    ),
    pytest.param(
        [{"op_names": ["fc2"], "target_names": ["bias"]}],
        ValueError,
        0,
        "'target_names'",
        "no parameter 'bias'",
        id="bias-missing",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["running_mean"]}],
        ValueError,
        0,
        "'target_names'",
        "'running_mean'",
        id="no-such-param",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["_input_3"]}], ValueError, 0, "'target_names'", "'_input_3'", id="input-3"
    ),
    pytest.param([{"op_names": ["fc"], "target_names": ["_input_x"]}], ValueError, 0, "'target_names'", "'x'", id="input-no-arg"),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["weight"], "granularity": [3, -1]}],
        ValueError,
        0,
        "'granularity'",
        "does not divide",
        id="block-does-not-fit",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["weight"], "target_settings": {"weight": {"granularity": [-1, 3]}}}],
        ValueError,
        0,
        "\"target_settings['weight'].granularity\"",
        "does not divide",
        id="target-block-does-not-fit",
    ),
    pytest.param(
        [{"op_names": ["conv"], "target_names": ["weight"], "granularity": [1, -1]}],
        ValueError,
        0,
        "'granularity'",
        "has 2 entries",
        id="block-wrong-length",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["_input_"], "granularity": "out_channel"}],
        ValueError,
        0,
        "'granularity'",
        "'_input_0'",
        id="out_channel-on-input",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["_output_"], "granularity": [2, -1]}],
        ValueError,
        0,
        "'granularity'",
        "must start with -1",
        id="batch-block-on-output",
    ),
    pytest.param(
        [GOOD, {"op_types": ["Embedding"]}], ValueError, 1, "'target_names'", "no default targets", id="embedding-no-targets"
    ),
    pytest.param([{"op_names": ["pool"]}], ValueError, 0, "'target_names'", "AdaptiveAvgPool2d", id="pool-no-targets"),
    pytest.param([{"op_names": ["conv"], "fuse_names": "conv"}], TypeError, 0, "'fuse_names'", "list", id="fuse-str"),
    pytest.param([{"op_names": ["conv"], "fuse_names": [("conv",)]}], ValueError, 0, "'fuse_names'", "2 or 3", id="fuse-one"),
    pytest.param(
        [{"op_names": ["conv"], "fuse_names": [("conv", "bn9")]}], ValueError, 0, "'fuse_names'", "'bn9'", id="fuse-missing"
    ),
    pytest.param(
        [{"op_names": ["fc"], "fuse_names": [("fc", "fc_relu", "fc2")]}],
        ValueError,
        0,
        "'fuse_names'",
        "supported patterns",
        id="fuse-pattern",
    ),
    pytest.param(
        [{"op_names": ["fc"], "fuse_names": [("fc", "fc2")]}],
        ValueError,
        0,
        "'fuse_names'",
        "supported patterns",
        id="fuse-linear-linear",
    ),
    pytest.param(
        [{"op_names": ["fc"], "target_names": ["weight", "_input_"], "fuse_names": [("fc", "fc_relu")]}],
        ValueError,
        0,
        "'fuse_names'",
        "'_output_'",
        id="fuse-activation-no-output",
    ),
    pytest.param(
        [GOOD, {"op_names": ["fc"], "fuse_names": [("conv", "bn")]}],
        ValueError,
        1,
        "'fuse_names'",
        "must be one of the modules this entry selects",
        id="fuse-not-selected",
    ),
]


def test_config_list_not_a_list():
    for bad in ({"op_types": ["Linear"]}, "op_types", None):
        with pytest.raises(TypeError, match="config_list must be a list"):
            parse_config_list(bad)


@pytest.mark.parametrize(("config_list", "exc_type", "index", "key", "detail"), CASES)
def test_bad_config_names_entry_and_key(config_list, exc_type, index, key, detail):
    with pytest.raises((ValueError, TypeError)) as info:
        resolve(Net(), parse_config_list(config_list))
    assert info.type is exc_type
    message = str(info.value)
    assert f"config_list[{index}]" in message
    assert key in message
    assert detail in message


def test_first_error_is_reported_by_its_own_index():
    config = [GOOD, {"op_names": ["fc"], "quant_dtype": "int9"}, {"op_names": ["fc"], "quant_scheme": "x"}]
    with pytest.raises(ValueError, match=r"^config_list\[1\]: key 'quant_dtype'"):
        parse_config_list(config)


# ---- a failed QATQuantizer leaves the model exactly as it was -----------------------------------------------


def snapshot(model, x):
    with torch.no_grad():
        output = model(x).clone()
    return {
        "modules": list(model.modules()),
        "classes": [type(m) for m in model.modules()],
        "named": [name for name, _ in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "training": model.training,
        "output": output,
    }


def assert_unchanged(model, x, before):
    after = snapshot(model, x)
    assert len(after["modules"]) == len(before["modules"])
    assert all(a is b for a, b in zip(after["modules"], before["modules"], strict=True))
    assert after["classes"] == before["classes"]
    assert after["named"] == before["named"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["params"] == before["params"]
    assert after["training"] == before["training"]
    assert torch.equal(after["output"], before["output"])
    assert not hasattr(model, "quantrain_step")
    assert all("fake_quant" not in m._modules for m in model.modules())


INVARIANCE_IDS = {
    "unknown-key-op_type",
    "op_types-str",
    "target_names-str",
    "quant_bits-str",
    "entry-not-dict",
    "dtype-int9",
    "scheme",
    "granularity-str",
    "op_names-missing",
    "exclude-missing",
    "bias-missing",
    "input-3",
    "block-does-not-fit",
    "out_channel-on-input",
    "embedding-no-targets",
    "fuse-missing",
    "fuse-pattern",
    "fuse-activation-no-output",
    "fuse-not-selected",
}
INVARIANCE_CASES = [case for case in CASES if case.id in INVARIANCE_IDS]


def test_invariance_subset_is_complete():
    assert {case.id for case in INVARIANCE_CASES} == INVARIANCE_IDS


@pytest.mark.parametrize(("config_list", "exc_type", "index", "key", "detail"), INVARIANCE_CASES)
def test_failed_quantizer_leaves_model_untouched(config_list, exc_type, index, key, detail):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 5, 5)
    before = snapshot(model, x)
    with pytest.raises(exc_type, match=rf"config_list\[{index}\]"):
        quantrain.QATQuantizer(model, config_list)
    assert_unchanged(model, x, before)


def test_failed_quantizer_with_non_list_config_leaves_model_untouched():
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 2, 5, 5)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.raises(TypeError, match="config_list must be a list"):
        quantrain.QATQuantizer(model, {"op_types": ["Linear"]})
    assert all(a is b for a, b in zip(model.modules(), modules, strict=True))
    assert model.state_dict().keys() == model_state.keys()
    assert all(torch.equal(v, model_state[k]) for k, v in model.state_dict().items())
    assert model.training
    assert model(x).shape == (2, 3)


def test_valid_config_after_a_failed_one_still_quantizes():
    model = Net()
    with pytest.raises(ValueError):
        quantrain.QATQuantizer(model, [GOOD, {"op_names": ["fc9"]}])
    quantizer = quantrain.QATQuantizer(model, [GOOD])
    assert list(quantizer.quantized_modules) == ["conv"]
    assert isinstance(model.conv, nn.Conv2d)
    assert type(model.conv) is not nn.Conv2d
    assert quantizer.unwrap_model() is model
    assert type(model.conv) is nn.Conv2d
