"""integer_bias: each quantized layer adds its bias on the int32 grid S_in * S_w, as integer inference does."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import PtqQuantizer, QATQuantizer
from quantrain.config.presets import deployable_config_list
from quantrain.demo import build_model
from quantrain.wrapping.fusion import fold_parameters

LINEAR_CONFIG = [
    {
        "op_types": ["Linear"],
        "target_names": ["_input_", "weight"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    }
]


def _on_grid(bias, step):
    units = bias / step  # float division of k * step by step: within float error of the integer k
    return bool((units - torch.round(units)).abs().max() < 1e-3)


def test_a_linear_layer_computes_the_integer_formula():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    QATQuantizer(layer, LINEAR_CONFIG, integer_bias=True)
    x = torch.randn(16, 6) * 2
    layer(x)  # one training forward calibrates both quantizers
    layer.eval()
    fq_in, fq_w = layer.fake_quant["_input_0"], layer.fake_quant["weight"]
    step = fq_in.scale * fq_w.scale.reshape(-1)
    expected_bias = torch.round(layer.bias / step) * step
    expected = F.linear(fq_in(x), fq_w(layer.weight), expected_bias)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        assert not torch.equal(expected_bias, layer.bias)  # the rounding changed something


def test_the_gradient_of_the_bias_passes_straight_through():
    torch.manual_seed(0)
    plain, rounded = nn.Linear(6, 3), None
    rounded = copy.deepcopy(plain)
    QATQuantizer(plain, LINEAR_CONFIG)
    QATQuantizer(rounded, LINEAR_CONFIG, integer_bias=True)
    x = torch.randn(16, 6)
    for layer in (plain, rounded):
        layer(x).pow(2).sum().backward()
    # The outputs differ slightly (rounded bias), so compare the bias gradient's formula: sum over the batch of 2 * y.
    with torch.no_grad():
        assert torch.allclose(rounded.bias.grad, 2 * rounded(x).sum(0), atol=1e-5)
        assert torch.allclose(plain.bias.grad, 2 * plain(x).sum(0), atol=1e-5)


def test_the_folded_bias_of_every_demo_layer_is_on_its_grid_in_eval():
    torch.manual_seed(0)
    model = build_model()
    example = torch.rand(32, 1, 8, 8) * 16
    quantizer = QATQuantizer(model, deployable_config_list(8, 8), fuse="auto", integer_bias=True, example_inputs=example)
    model(example)
    model.eval()
    seen = {}
    for name, module in quantizer.quantized_modules.items():
        source, weight = module._bias_scales
        seen[name] = source.label
        bn = module.fusion.bn if hasattr(module, "fusion") else None
        bias = module.bias if bn is None else fold_parameters(module.weight, module.bias, bn)[1]
        step = source.scale * weight.scale.reshape(-1)
        assert _on_grid(module.integer_bias(bias), step)
    assert seen == {"0": "0._input_0", "3": "0._output_0", "8": "3._output_0", "10": "8._output_0"}


def test_before_quantization_starts_the_bias_is_untouched():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    QATQuantizer(layer, LINEAR_CONFIG, quant_start_step=5, integer_bias=True)
    assert torch.equal(layer.integer_bias(layer.bias), layer.bias)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_unwrapping_forgets_the_link_and_from_compressor_keeps_the_option():
    torch.manual_seed(0)
    model = build_model()
    ptq = PtqQuantizer(model, deployable_config_list(8, 8), fuse="auto", integer_bias=True, example_inputs=torch.rand(1, 1, 8, 8))
    ptq.track_forward(torch.rand(8, 1, 8, 8))
    qat = QATQuantizer.from_compressor(ptq, deployable_config_list(8, 8), fuse="auto")
    assert qat.integer_bias and model[8]._bias_scales[0] is model[3].fake_quant["_output_0"]
    qat.unwrap_model()
    assert "_bias_scales" not in model[8].__dict__ and type(model[8]) is nn.Linear


def test_a_layer_whose_input_is_not_quantized_keeps_a_float_bias_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    config = [
        {"op_names": ["0"], "target_names": ["_input_", "weight", "_output_"]},
        {"op_names": ["2"], "target_names": ["weight"]},
    ]
    with pytest.warns(UserWarning, match="integer_bias: the input of 2 is not known"):
        QATQuantizer(model, config, integer_bias=True, example_inputs=torch.randn(1, 4))
    assert model[2]._bias_scales is None


def test_a_layer_whose_input_scale_needs_the_graph_without_an_example_is_refused_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = [{"op_types": ["Linear"], "target_names": ["weight", "_output_"]}]
    with pytest.raises(ValueError, match=r"^integer_bias finds which quantizer feeds 0, 2 in the model's graph.*example_inputs="):
        QATQuantizer(model, config, integer_bias=True)
    assert type(model[0]) is nn.Linear and not hasattr(model, "quantrain_step")
    QATQuantizer(model, config, integer_bias=True, example_inputs=torch.randn(1, 4))
    assert model[2]._bias_scales[0] is model[0].fake_quant["_output_0"] and model[0]._bias_scales is None


@pytest.mark.parametrize("value", [1, "yes", None])
def test_integer_bias_must_be_a_bool(value):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="integer_bias must be True or False"):
        QATQuantizer(model, LINEAR_CONFIG, integer_bias=value)
    assert type(model[0]) is nn.Linear
