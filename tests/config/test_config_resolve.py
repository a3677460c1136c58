"""resolve: which modules an entry selects, which targets they get, and the plans built for them."""

import warnings

import pytest
import torch
from torch import nn

from quantrain.config import (
    DEFAULT_TARGETS,
    GranularityKind,
    QuantDtype,
    QuantScheme,
    TargetKind,
    parse_config_list,
    register_default_targets,
    resolve,
)

P, IN, OUT = TargetKind.PARAMETER, TargetKind.INPUT, TargetKind.OUTPUT


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    """Modules in order: '', fc1, relu, block, block.fc1, block.act, block.fc2, head, conv."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.relu = nn.ReLU()
        self.block = Block()
        self.head = nn.Linear(4, 2, bias=False)
        self.conv = nn.Conv1d(2, 5, 3)

    def forward(self, x):
        return self.head(self.block(self.relu(self.fc1(x))))


class TwoInputs(nn.Module):
    def forward(self, x, y=None):
        return x if y is None else x + y


class KeywordOnly(nn.Module):
    def forward(self, x, *, scale=None):
        return x if scale is None else x * scale


class VarArgs(nn.Module):
    def forward(self, *xs, **options):
        return sum(xs)


class MultiOutput(nn.Module):
    def forward(self, x):
        return x, 2 * x


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, 4))

    def forward(self, x):
        return x * self.scale


class MyLinear(nn.Linear):
    pass


def plans_for(model, config_list):
    return resolve(model, parse_config_list(config_list))


def selected(model, entry):
    return [plan.name for plan in plans_for(model, [entry])]


def targets(plan):
    return [(t.name, t.kind) for t in plan.targets]


def by_name(plans):
    return {plan.name: plan for plan in plans}


# ---- selection ---------------------------------------------------------------------------------------------


def test_op_types_alone_selects_every_module_of_those_types_in_model_order():
    assert selected(Net(), {"op_types": ["ReLU"]}) == ["relu", "block.act"]
    assert selected(Net(), {"op_types": ["Linear"]}) == ["fc1", "block.fc1", "block.fc2", "head"]
    assert selected(Net(), {"op_types": ["Conv1d", "ReLU"]}) == ["relu", "block.act", "conv"]


def test_op_names_select_exactly_the_named_modules():
    assert selected(Net(), {"op_names": ["head", "block.act"]}) == ["block.act", "head"]


def test_op_names_and_op_names_re_are_united():
    entry = {"op_names": ["relu"], "op_names_re": [r"block\.fc"], "target_names": ["_output_"]}
    assert selected(Net(), entry) == ["relu", "block.fc1", "block.fc2"]


def test_names_are_intersected_with_op_types():
    entry = {"op_names": ["relu", "head"], "op_names_re": [r"block\.fc"], "op_types": ["Linear"]}
    assert selected(Net(), entry) == ["block.fc1", "block.fc2", "head"]


def test_op_names_re_uses_re_match_anchored_at_the_start():
    # 'fc' matches 'fc1' but not 'block.fc1' (re.match, not re.search)
    assert selected(Net(), {"op_names_re": ["fc"]}) == ["fc1"]
    assert selected(Net(), {"op_names_re": [".*fc"]}) == ["fc1", "block.fc1", "block.fc2"]


def test_exclude_op_names_removes_modules():
    assert selected(Net(), {"op_types": ["Linear"], "exclude_op_names": ["fc1", "block.fc2"]}) == ["block.fc1", "head"]


def test_exclude_op_names_re_removes_modules():
    assert selected(Net(), {"op_types": ["Linear"], "exclude_op_names_re": [r"block\."]}) == ["fc1", "head"]


def test_exclude_op_types_removes_modules():
    entry = {"op_names": ["fc1", "relu", "block.act", "conv"], "exclude_op_types": ["ReLU"]}
    assert selected(Net(), entry) == ["fc1", "conv"]


def test_all_exclusions_combine():
    entry = {
        "op_names_re": [".*"],
        "exclude_op_types": ["Net", "Block", "Conv1d"],
        "exclude_op_names": ["relu"],
        "exclude_op_names_re": [r".*fc2"],
    }
    assert selected(Net(), entry) == ["fc1", "block.fc1", "block.act", "head"]


def test_op_types_match_custom_class_names():
    model = nn.Sequential(nn.Linear(2, 2), TwoInputs())
    assert selected(model, {"op_types": ["TwoInputs"], "target_names": ["_input_"]}) == ["1"]


def test_op_types_match_a_subclass_by_its_own_name_unless_subclasses_are_included():
    model = nn.Sequential(nn.Linear(2, 2), MyLinear(2, 2), nn.ReLU())
    assert selected(model, {"op_types": ["Linear"]}) == ["0"]  # as NNI: the class's own name
    assert selected(model, {"op_types": ["MyLinear"]}) == ["1"]
    assert selected(model, {"op_types": ["Linear"], "include_subclasses": True}) == ["0", "1"]
    assert selected(model, {"op_types": ["MyLinear"], "include_subclasses": True}) == ["1"]  # not its base
    entry = {"op_names_re": [".*"], "exclude_op_types": ["Linear", "Sequential"], "include_subclasses": True}
    assert selected(model, entry) == ["2"]
    assert selected(model, {**entry, "include_subclasses": False}) == ["1", "2"]
    with pytest.warns(UserWarning, match=r"config_list\[0\] selects no module"):  # nn.Module itself matches nothing
        assert plans_for(model, [{"op_types": ["Module"], "include_subclasses": True}]) == ()


def test_entry_that_selects_nothing_warns_and_plans_nothing():
    with pytest.warns(UserWarning, match=r"config_list\[0\] selects no module of Net"):
        assert plans_for(Net(), [{"op_types": ["Conv3d"]}]) == ()


@pytest.mark.parametrize("key", ["op_names", "op_types", "op_names_re"])
def test_empty_selection_list_is_rejected_not_read_as_everything(key):
    with pytest.raises(ValueError, match=r"config_list\[0\]: key 'op_types': .*non-empty"):
        plans_for(Net(), [{key: [], "target_names": ["_output_"]}])


# ---- first entry wins ----------------------------------------------------------------------------------------


def test_first_entry_claiming_a_target_wins_with_a_warning():
    config = [
        {"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": "int4"},
        {"op_types": ["Linear"], "quant_dtype": "uint8"},
    ]
    with pytest.warns(UserWarning) as record:
        plans = by_name(plans_for(Net(), config))
    wins = [str(w.message) for w in record if "first entry wins" in str(w.message)]
    assert len(wins) == 1
    assert "config_list[1]" in wins[0]
    assert "'fc1'" in wins[0]
    assert "'weight'" in wins[0]
    assert "config_list[0]" in wins[0]
    fc1 = {t.name: t for t in plans["fc1"].targets}
    assert fc1["weight"].entry_index == 0
    assert fc1["weight"].settings.dtype == QuantDtype(4, True)
    for name in ("bias", "_input_0", "_output_0"):
        assert fc1[name].entry_index == 1
        assert fc1[name].settings.dtype == QuantDtype(8, False)
    assert {t.entry_index for t in plans["block.fc1"].targets} == {1}


def test_disjoint_entries_do_not_warn():
    config = [{"op_names": ["fc1"], "target_names": ["weight"]}, {"op_names": ["fc1"], "target_names": ["_output_"]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (plan,) = plans_for(Net(), config)
    assert [(t.name, t.entry_index) for t in plan.targets] == [("weight", 0), ("_output_0", 1)]


# ---- default and explicit targets --------------------------------------------------------------------------


def test_linear_default_targets_parameters_first_then_input_then_output():
    (plan,) = plans_for(Net(), [{"op_names": ["fc1"]}])
    assert targets(plan) == [("weight", P), ("bias", P), ("_input_0", IN), ("_output_0", OUT)]


def test_bias_is_dropped_from_defaults_when_the_module_has_none():
    (plan,) = plans_for(Net(), [{"op_names": ["head"]}])
    assert targets(plan) == [("weight", P), ("_input_0", IN), ("_output_0", OUT)]


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv1d(2, 3, 3),
        nn.Conv2d(2, 3, 3),
        nn.Conv3d(2, 3, 3),
        nn.ConvTranspose2d(2, 3, 3),
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3),
    ],
)
def test_layer_default_targets(module):
    (plan,) = plans_for(nn.Sequential(module), [{"op_names": ["0"]}])
    assert targets(plan) == [("weight", P), ("bias", P), ("_input_0", IN), ("_output_0", OUT)]


def test_conv_without_bias_drops_bias():
    (plan,) = plans_for(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False)), [{"op_names": ["0"]}])
    assert [t.name for t in plan.targets] == ["weight", "_input_0", "_output_0"]


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(), nn.MaxPool2d(2)])
def test_activation_default_targets(module):
    (plan,) = plans_for(nn.Sequential(module), [{"op_names": ["0"]}])
    assert targets(plan) == [("_input_0", IN), ("_output_0", OUT)]


def test_subclass_inherits_default_targets():
    (plan,) = plans_for(nn.Sequential(MyLinear(2, 3)), [{"op_types": ["MyLinear"]}])
    assert [t.name for t in plan.targets] == ["weight", "bias", "_input_0", "_output_0"]


def test_explicit_target_names_restrict_the_targets():
    (plan,) = plans_for(Net(), [{"op_names": ["fc1"], "target_names": ["_output_", "bias"]}])
    assert targets(plan) == [("bias", P), ("_output_0", OUT)]


def test_embedding_with_explicit_targets():
    model = nn.Sequential(nn.Embedding(10, 4))
    (plan,) = plans_for(model, [{"op_types": ["Embedding"], "target_names": ["weight", "_output_"]}])
    assert targets(plan) == [("weight", P), ("_output_0", OUT)]
    assert plan.targets[1].key == 0


def test_layer_norm_with_explicit_targets():
    model = nn.Sequential(nn.LayerNorm(4))
    config = [{"op_types": ["LayerNorm"], "target_names": ["weight", "bias", "_input_"], "granularity": "default"}]
    (plan,) = plans_for(model, config)
    assert targets(plan) == [("weight", P), ("bias", P), ("_input_0", IN)]
    inp = plan.targets[2]
    assert (inp.position, inp.key) == (0, "input")


def test_custom_module_with_explicit_targets():
    model = nn.Sequential(Custom())
    (plan,) = plans_for(model, [{"op_types": ["Custom"], "target_names": ["scale", "_input_", "_output_"]}])
    assert targets(plan) == [("scale", P), ("_input_0", IN), ("_output_0", OUT)]


def test_registered_default_targets_let_a_custom_type_omit_target_names():
    class Registered(Custom):
        pass

    register_default_targets(Registered, ("scale", "_output_0"))
    try:
        (plan,) = plans_for(nn.Sequential(Registered()), [{"op_types": ["Registered"]}])
    finally:
        del DEFAULT_TARGETS[Registered]
    assert targets(plan) == [("scale", P), ("_output_0", OUT)]


# ---- inputs and outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "name", "position", "key"),
    [
        ("_input_", "_input_0", 0, "x"),
        ("_input_0", "_input_0", 0, "x"),
        ("_input_1", "_input_1", 1, "y"),
        ("_input_x", "_input_x", 0, "x"),
        ("_input_y", "_input_y", 1, "y"),
    ],
)
def test_input_target_resolves_position_and_keyword(target, name, position, key):
    (plan,) = plans_for(nn.Sequential(TwoInputs()), [{"op_names": ["0"], "target_names": [target]}])
    (t,) = plan.targets
    assert (t.name, t.kind, t.position, t.key) == (name, IN, position, key)
    assert t.blocks is None


def test_keyword_only_input_has_no_position():
    (plan,) = plans_for(nn.Sequential(KeywordOnly()), [{"op_names": ["0"], "target_names": ["_input_scale"]}])
    (t,) = plan.targets
    assert (t.position, t.key) == (None, "scale")


def test_var_args_accept_any_position_and_var_kwargs_any_keyword():
    config = [{"op_names": ["0"], "target_names": ["_input_3", "_input_mask"]}]
    (plan,) = plans_for(nn.Sequential(VarArgs()), config)
    assert [(t.name, t.position, t.key) for t in plan.targets] == [("_input_3", 3, None), ("_input_mask", None, "mask")]


def test_linear_input_keyword_is_its_argument_name():
    (plan,) = plans_for(Net(), [{"op_names": ["fc1"], "target_names": ["_input_input"]}])
    (t,) = plan.targets
    assert (t.position, t.key) == (0, "input")


@pytest.mark.parametrize(("target", "key"), [("_output_", 0), ("_output_1", 1), ("_output_logits", "logits")])
def test_output_targets_resolve_their_key(target, key):
    (plan,) = plans_for(nn.Sequential(MultiOutput()), [{"op_names": ["0"], "target_names": [target]}])
    (t,) = plan.targets
    assert t.kind is OUT
    assert t.key == key
    assert t.position is None


# ---- settings and blocks in the plans ----------------------------------------------------------------------


def test_plans_carry_each_targets_merged_settings():
    config = [
        {
            "op_names": ["fc1"],
            "quant_dtype": "int4",
            "target_settings": {"weight": {"quant_scheme": "affine"}, "_output_": {"quant_dtype": "uint8"}},
        }
    ]
    (plan,) = plans_for(Net(), config)
    settings = {t.name: t.settings for t in plan.targets}
    assert (settings["weight"].dtype, settings["weight"].scheme) == (QuantDtype(4, True), QuantScheme.AFFINE)
    assert (settings["bias"].dtype, settings["bias"].scheme) == (QuantDtype(4, True), QuantScheme.SYMMETRIC)
    assert settings["_input_0"].dtype == QuantDtype(4, True)
    assert settings["_output_0"].dtype == QuantDtype(8, False)
    assert {t.entry_index for t in plan.targets} == {0}


def test_out_channel_blocks_for_conv_weight_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    (plan,) = plans_for(model, [{"op_names": ["0"], "target_names": ["weight", "bias"], "granularity": "out_channel"}])
    blocks = {t.name: t.blocks for t in plan.targets}
    assert blocks == {"weight": (1, -1, -1, -1), "bias": (1,)}


def test_out_channel_weight_with_per_tensor_activations_via_target_settings():
    config = [
        {
            "op_names": ["fc1"],
            "granularity": "out_channel",
            "target_settings": {"_input_": {"granularity": "default"}, "_output_": {"granularity": "per_channel"}},
        }
    ]
    (plan,) = plans_for(Net(), config)
    by_target = {t.name: t for t in plan.targets}
    assert by_target["weight"].blocks == (1, -1)  # fc1.weight is (4, 3)
    assert by_target["bias"].blocks == (1,)
    assert by_target["_input_0"].settings.granularity.kind is GranularityKind.PER_TENSOR
    assert by_target["_output_0"].settings.granularity.kind is GranularityKind.PER_CHANNEL
    assert by_target["_output_0"].blocks is None


@pytest.mark.parametrize(
    ("granularity", "blocks"), [("default", None), ("in_channel", (-1, 1)), ([2, -1], (2, -1)), ([-1, 3], (-1, 3))]
)
def test_weight_blocks_for_other_granularities(granularity, blocks):
    (plan,) = plans_for(Net(), [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": granularity}])
    assert plan.targets[0].blocks == blocks


def test_valid_fuse_names_are_accepted_and_leave_the_targets_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (plan,) = plans_for(model, [{"op_names": ["0"], "fuse_names": [("0", "1", "2")]}])
    assert plan.fusion is None  # fusions are planned after resolution (quantrain.config.fusion)

    assert plan.name == "0"
    assert [t.name for t in plan.targets] == ["weight", "bias", "_input_0", "_output_0"]


def test_resolve_leaves_the_model_untouched():
    model = Net()
    before = [(m, type(m)) for m in model.modules()]
    keys = list(model.state_dict())
    plans = plans_for(
        model, [{"op_types": ["Linear"], "granularity": "out_channel", "target_names": ["weight"]}, {"op_types": ["ReLU"]}]
    )
    assert len(plans) == 6
    assert [(m, type(m)) for m in model.modules()] == before
    assert list(model.state_dict()) == keys
