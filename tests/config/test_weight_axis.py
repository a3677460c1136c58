"""Granularity 'out_channel' follows each module type's output-channel axis: scale shapes, scale values, the integer
bias of a weight stored (in, out), and the registry that custom module types declare theirs in."""

import pytest
import torch
from torch import nn

import quantrain
from quantrain import QATQuantizer, deployable_config_list, register_weight_axis
from quantrain.config.resolve import WEIGHT_AXES, out_channel_axis

transformers = pytest.importorskip("transformers", reason="GPT-2's Conv1D comes from transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

OUT_CHANNEL_WEIGHT = [{"op_names": ["0"], "target_names": ["weight"], "granularity": "out_channel"}]
ACTIVATIONS = {"quant_dtype": "uint8", "quant_scheme": "affine"}


@pytest.fixture
def registry():
    """Restore the registry after a test that registers a type."""
    saved = dict(WEIGHT_AXES)
    yield WEIGHT_AXES
    WEIGHT_AXES.clear()
    WEIGHT_AXES.update(saved)


def _weight_quantizer(module):
    model = nn.Sequential(module)
    QATQuantizer(model, OUT_CHANNEL_WEIGHT)
    return model[0].fake_quant["weight"]


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Linear(4, 6), (6, 1)),
        (lambda: nn.Conv1d(4, 6, 3), (6, 1, 1)),
        (lambda: nn.Conv2d(4, 6, 3), (6, 1, 1, 1)),
        (lambda: nn.Conv3d(4, 6, 3), (6, 1, 1, 1, 1)),
        (lambda: nn.Embedding(10, 6), (10, 1)),
        (lambda: nn.ConvTranspose1d(4, 6, 3), (1, 6, 1)),
        (lambda: nn.ConvTranspose2d(4, 6, 3), (1, 6, 1, 1)),
        (lambda: nn.ConvTranspose3d(4, 6, 3), (1, 6, 1, 1, 1)),
        (lambda: Conv1D(6, 4), (1, 6)),  # GPT-2's layer: weight (in_features=4, out_features=6)
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d", "embedding", "transpose1d", "transpose2d", "transpose3d", "hf-conv1d"],
)
def test_out_channel_scales_lie_on_each_module_types_output_axis(make, shape):
    assert tuple(_weight_quantizer(make()).scale.shape) == shape


def test_a_conv_transpose_gets_one_scale_per_output_channel_equal_to_its_max_over_everything_else():
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 2))
    QATQuantizer(model, OUT_CHANNEL_WEIGHT)
    model(torch.randn(2, 3, 4, 4))
    weight = model[0].weight.detach()  # (in=3, out=5, 2, 2)
    expected = torch.stack([weight[:, j].abs().max() / 127 for j in range(5)]).reshape(1, 5, 1, 1)
    assert torch.allclose(model[0].fake_quant["weight"].scale, expected, rtol=1e-6, atol=0)
    quantized = model.eval()[0].quantized_parameters()["weight"].detach()
    for j in range(5):  # each output channel on its own grid (a grid along dim 0 would be off by up to half a step)
        assert torch.allclose(quantized[:, j], torch.round(weight[:, j] / expected[0, j]) * expected[0, j], rtol=0, atol=1e-7)


def test_gpt2_conv1d_gets_one_scale_per_output_column_and_its_integer_bias_uses_them():
    torch.manual_seed(0)
    layer = Conv1D(nf=6, nx=4)  # weight (4, 6): y = x @ W + b
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0]))  # columns far apart
        layer.bias.copy_(torch.randn(6))
    model = nn.Sequential(layer)
    QATQuantizer(model, deployable_config_list(8, 8, op_types=("Conv1D",)), integer_bias=True)
    x = torch.randn(16, 4)
    model(x)  # no size mismatch between 4 row scales and 6 biases any more
    fq = layer.fake_quant["weight"]
    weight, bias = layer.weight.detach(), layer.bias.detach()
    assert fq.scale.shape == (1, 6)
    by_hand = torch.tensor([weight[:, j].abs().max().item() / 127 for j in range(6)])
    assert torch.allclose(fq.scale.flatten(), by_hand, rtol=1e-6, atol=0)
    s_in = layer.fake_quant["_input_0"].scale
    step = s_in * fq.scale.flatten()
    expected_bias = torch.round(bias / step) * step
    params = layer.quantized_parameters()
    assert torch.allclose(params["bias"], expected_bias, rtol=1e-6, atol=0)
    assert not torch.allclose(params["bias"], bias)  # it did round
    assert torch.equal(params["weight"], torch.round(weight / fq.scale) * fq.scale)
    model.eval()
    with torch.no_grad():
        x_hat = layer.fake_quant["_input_0"](x)
        expected = layer.fake_quant["_output_0"](torch.addmm(params["bias"], x_hat, params["weight"]))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_a_tiny_gpt2_quantizes_every_conv1d_per_output_column_with_integer_biases():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    config = deployable_config_list(8, 8, op_types=("Conv1D",))
    config[0] = {"op_types": ["Conv1D"], "target_names": ["_input_"], **ACTIVATIONS}  # each layer knows its input scale
    quantizer = QATQuantizer(model, config, integer_bias=True)
    layers = {name: m for name, m in quantizer.quantized_modules.items() if isinstance(m, Conv1D)}
    assert sorted(layers) == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    ids = torch.randint(0, 50, (2, 8))
    model.train()
    model(ids)
    model.eval()
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    assert hidden.shape == (2, 8, 32) and torch.isfinite(hidden).all()
    for name, layer in layers.items():
        weight, bias = layer.weight.detach(), layer.bias.detach()
        scale = layer.fake_quant["weight"].scale
        assert scale.shape == (1, weight.shape[1]), name
        assert torch.allclose(scale.flatten(), weight.abs().amax(0) / 127, rtol=1e-6, atol=0), name
        step = layer.fake_quant["_input_0"].scale * scale.flatten()
        assert torch.allclose(layer.quantized_parameters()["bias"], torch.round(bias / step) * step, rtol=1e-6, atol=0)


def test_conv1d_is_recognised_by_name_and_its_subclasses_inherit_the_axis():
    assert "transformers.pytorch_utils.Conv1D" in WEIGHT_AXES and Conv1D not in WEIGHT_AXES

    class MyConv1D(Conv1D):
        pass

    assert out_channel_axis(Conv1D(3, 2)) == 1 and out_channel_axis(MyConv1D(3, 2)) == 1
    assert out_channel_axis(nn.Linear(2, 3)) == 0 and out_channel_axis(nn.ReLU()) == 0  # unregistered: dim 0


class TransposedLinear(nn.Module):
    """y = x @ W + b with W stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


def test_a_registered_custom_module_gets_its_scales_on_the_declared_axis(registry):
    config = [{"op_types": ["TransposedLinear"], "target_names": ["weight", "bias"], "granularity": "out_channel"}]
    before = nn.Sequential(TransposedLinear(4, 6))
    QATQuantizer(before, config)
    assert before[0].fake_quant["weight"].scale.shape == (4, 1)  # unregistered: dim 0, as NNI

    quantrain.register_weight_axis(TransposedLinear, 1)
    model = nn.Sequential(TransposedLinear(4, 6))
    QATQuantizer(model, config)
    model(torch.randn(3, 4))
    weight = model[0].weight.detach()
    assert model[0].fake_quant["weight"].scale.shape == (1, 6)
    assert torch.allclose(model[0].fake_quant["weight"].scale.flatten(), weight.abs().amax(0) / 127, rtol=1e-6, atol=0)
    assert model[0].fake_quant["bias"].scale.shape == (6,)  # a 1-D parameter keeps its channels on dim 0


def test_registration_by_name_and_the_first_registered_class_of_the_mro_wins(registry):
    class Base(nn.Module):
        pass

    class Child(Base):
        pass

    register_weight_axis(f"{Base.__module__}.{Base.__qualname__}", 2)
    assert out_channel_axis(Child()) == 2
    register_weight_axis(Child, 1)
    assert out_channel_axis(Child()) == 1 and out_channel_axis(Base()) == 2


@pytest.mark.parametrize(
    ("module_type", "axis", "error", "match"),
    [
        (nn.Linear, -1, ValueError, "axis must be a non-negative int"),
        (nn.Linear, True, ValueError, "axis must be a non-negative int"),
        (nn.Linear, 1.0, ValueError, "axis must be a non-negative int"),
        (int, 1, TypeError, "module_type must be a torch.nn.Module subclass"),
        (nn.Linear(2, 2), 1, TypeError, "module_type must be a torch.nn.Module subclass"),
        ("Conv1D", 1, ValueError, "'package.module.QualName'"),
    ],
)
def test_bad_registrations_are_refused(registry, module_type, axis, error, match):
    with pytest.raises(error, match=match):
        register_weight_axis(module_type, axis)


def test_an_axis_the_weight_does_not_have_names_the_entry_and_the_module(registry):
    register_weight_axis(TransposedLinear, 2)
    with pytest.raises(ValueError, match=r"config_list\[0\]: key 'granularity': 'out_channel' does not fit 0.weight: .*dim 2"):
        QATQuantizer(nn.Sequential(TransposedLinear(4, 6)), OUT_CHANNEL_WEIGHT)


def test_a_grouped_conv_transpose_cannot_have_one_axis_of_output_channel_scales():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2))  # weight (4, 3, 3, 3): out = 2 groups x 3
    with pytest.raises(ValueError, match=r"config_list\[0\]: key 'granularity': .*groups=2.*\[1, -1, -1, -1\]"):
        QATQuantizer(model, OUT_CHANNEL_WEIGHT)
    QATQuantizer(model, [{"op_names": ["0"], "target_names": ["weight"], "granularity": [1, -1, -1, -1]}])
    assert model[0].fake_quant["weight"].scale.shape == (4, 1, 1, 1)  # the suggested layout works


def test_an_integer_bias_whose_weight_scales_are_not_per_output_channel_is_an_error_naming_the_layer(registry):
    register_weight_axis(TransposedLinear, 0)  # wrong: 4 input rows, 6 biases
    model = nn.Sequential(TransposedLinear(4, 6))
    config = [
        {"op_names": ["0"], "target_names": ["_input_"], **ACTIVATIONS},
        {"op_names": ["0"], "target_names": ["weight"], "granularity": "out_channel"},
    ]
    QATQuantizer(model, config, integer_bias=True)
    with pytest.raises(ValueError, match=r"integer_bias: 0.weight has 4 scales \(shape \(4, 1\)\) but the bias 6 entries"):
        model(torch.randn(3, 4))


def test_qparams_laid_out_along_another_dim_are_refused_for_a_weight_with_its_channels_on_dim_1():
    """An NNI calibration of a Conv1D (one scale per row, shape (4, 1)) must not be read as one per column."""
    model = nn.Sequential(Conv1D(nf=4, nx=4))
    QATQuantizer(model, OUT_CHANNEL_WEIGHT)
    fq = model[0].fake_quant["weight"]
    rows = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    with pytest.raises(ValueError, match=r"0.weight: expected scales of shape \(1, 4\), got shape \(4, 1\)"):
        fq.set_qparams(rows, torch.zeros(4, 1))
    assert not fq.is_calibrated
    fq.set_qparams(rows.reshape(1, 4), torch.zeros(1, 4))
    assert fq.is_calibrated and torch.allclose(fq.scale, rows.reshape(1, 4))
    fq.set_qparams(rows.flatten() * 2, torch.zeros(4))  # flat values take the target's layout
    assert torch.allclose(fq.scale, rows.reshape(1, 4) * 2)
