"""Where each layer's input scale comes from (for integer_bias): its own input quantizer or the one upstream."""

import torch
import torch.nn.functional as F
from torch import nn

from quantrain.config import parse_config_list
from quantrain.config.bias import BiasSource, plan_bias_sources
from quantrain.config.fusion import plan_fusions
from quantrain.config.presets import deployable_config_list
from quantrain.config.resolve import resolve
from quantrain.demo import build_model
from quantrain.graph import capture


def _sources(model, config, example, auto=True):
    entries = parse_config_list(config)
    plans = resolve(model, entries)
    graph = capture(model, example, units=frozenset(plan.name for plan in plans))
    plans = plan_fusions(model, entries, plans, auto=auto, graph=graph)
    return plan_bias_sources(model, plans, graph)


def test_the_demo_model_finds_every_source_through_folded_bn_pooling_and_flatten():
    sources, missing = _sources(build_model(), deployable_config_list(8, 8), torch.randn(1, 1, 8, 8))
    assert missing == ()
    assert sources == (
        BiasSource("0", "0", "_input_0"),  # the first conv: its own input quantizer
        BiasSource("3", "0", "_output_0"),  # through the folded BN and the re-applied ReLU
        BiasSource("8", "3", "_output_0"),  # through ReLU, MaxPool2d and Flatten
        BiasSource("10", "8", "_output_0"),
    )


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = self.fc(self.pool(x).view(x.shape[0], -1))
        return self.head(torch.sigmoid(x))


def test_functional_grid_preserving_ops_are_followed_and_others_stop_the_search():
    config = deployable_config_list(8, 8, input_module="conv", op_types=("Conv2d", "Linear"))
    sources, missing = _sources(_Functional(), config, torch.randn(2, 1, 10, 10))
    # fc reads an average pool nobody quantizes, head reads a sigmoid: both keep a float bias.
    assert sources == (BiasSource("conv", "conv", "_input_0"),) and missing == ("fc", "head")
    with_pool = deployable_config_list(8, 8, input_module="conv", output_op_types=("AdaptiveAvgPool2d",))
    sources, missing = _sources(_Functional(), with_pool, torch.randn(2, 1, 10, 10))
    assert BiasSource("fc", "pool", "_output_0") in sources and missing == ("head",)


def test_layers_without_a_bias_or_with_their_own_bias_quantizer_need_no_source():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4))
    config = [
        {"op_names": ["0"], "target_names": ["_input_", "weight"]},
        {"op_names": ["1"], "target_names": ["_input_", "weight", "bias"]},
    ]

    assert _sources(model, config, torch.randn(1, 4)) == ((), ())


def test_a_per_channel_input_quantizer_is_not_a_source():
    model = nn.Sequential(nn.Linear(4, 4))
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight"],
            "target_settings": {"_input_": {"granularity": "per_channel"}},
        }
    ]
    assert _sources(model, config, torch.randn(1, 4)) == ((), ("0",))
