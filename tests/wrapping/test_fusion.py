"""BatchNorm folding during QAT: the folding math, the live/frozen forwards, gradients, edge cases, fuse='auto'."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import reference_fake_quant, reference_qparams
from quantrain import QATQuantizer
from quantrain.wrapping.fusion import fold_parameters

CONVS = {  # factories, so that no test sees modules another test changed
    "conv1d": lambda: (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), (5, 3, 9)),
    "conv2d-no-bias": lambda: (nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), (5, 3, 7, 7)),
    "depthwise": lambda: (nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), (5, 4, 7, 7)),
    "conv3d": lambda: (nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), (3, 2, 4, 4, 4)),
    "linear": lambda: (nn.Linear(6, 4), nn.BatchNorm1d(4), (8, 6)),
}


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _fused_model(conv, bn, targets=("weight",), **kwargs):
    model = nn.Sequential(conv, _randomize_bn(bn))
    config = [{"op_names": ["0"], "target_names": list(targets), "fuse_names": [("0", "1")]}]
    return model, QATQuantizer(model, config, **kwargs)


@pytest.mark.parametrize("layers", CONVS.values(), ids=CONVS.keys())
def test_fold_parameters_equal_conv_then_bn_in_eval(layers):
    conv, bn, shape = layers()
    _randomize_bn(bn)
    conv.eval(), bn.eval()
    x = torch.randn(shape)
    weight, bias = fold_parameters(conv.weight, conv.bias, bn)
    folded = copy.deepcopy(conv)
    folded.weight, folded.bias = nn.Parameter(weight.detach()), nn.Parameter(bias.detach())
    assert torch.allclose(folded(x), bn(conv(x)), atol=1e-5)


@pytest.mark.parametrize("layers", CONVS.values(), ids=CONVS.keys())
def test_before_quantization_starts_the_fused_layer_is_exactly_conv_then_bn(layers):
    conv, bn, shape = layers()
    reference = nn.Sequential(copy.deepcopy(conv), _randomize_bn(copy.deepcopy(bn)))
    model, _ = _fused_model(conv, bn, quant_start_step=100)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in reference.state_dict()})
    x = torch.randn(shape)
    assert torch.allclose(model(x), reference(x), atol=1e-5)  # training mode: batch statistics
    assert torch.allclose(model[1].running_mean, reference[1].running_mean, atol=1e-6)  # stats keep updating
    assert model[1].num_batches_tracked.item() == 1
    model.eval(), reference.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def _live_reference(conv, bn, x, scheme_symmetric=True):
    """bn_train(conv(x, fq(w * s)) / s + b), per-tensor int8 symmetric weights (the module docstring's formula)."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * s.reshape(-1, 1, 1, 1)
    scale, zp = reference_qparams(w.detach().amin(), w.detach().amax(), -127, 127, scheme_symmetric)
    y = F.conv2d(x, reference_fake_quant(w, scale, zp, -127, 127)) / s.reshape(1, -1, 1, 1)
    return F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, bn.momentum, bn.eps)


def test_live_bn_uses_batch_statistics_with_quantized_folded_weights():
    model, _ = _fused_model(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    x = torch.randn(6, 3, 8, 8)
    expected = _live_reference(model[0], model[1], x)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_frozen_bn_computes_exactly_the_deployable_folded_layer():
    model, quantizer = _fused_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), targets=("weight", "bias"), freeze_bn_step=0)
    x = torch.randn(6, 3, 8, 8)
    stats = model[1].running_mean.clone()
    out = model(x)  # training mode, but BN frozen
    assert torch.equal(model[1].running_mean, stats)  # frozen statistics do not update
    weight, bias = quantizer.folded_parameters()["0"]
    w_scale, w_zp = reference_qparams(weight.amin(), weight.amax(), -127, 127, True)
    b_scale, b_zp = reference_qparams(bias.amin(), bias.amax(), -127, 127, True)
    expected = F.conv2d(
        x, reference_fake_quant(weight, w_scale, w_zp, -127, 127), reference_fake_quant(bias, b_scale, b_zp, -127, 127)
    )
    assert torch.allclose(out, expected, atol=1e-6)
    model.eval()
    assert torch.allclose(model(x), expected, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_conv_weight_gamma_and_beta(bias, frozen):
    model, _ = _fused_model(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), freeze_bn_step=0 if frozen else None)
    (model(torch.randn(4, 3, 6, 6)) * torch.randn(4, 4, 4, 4)).sum().backward()
    for parameter in (model[0].weight, model[1].weight, model[1].bias) + ((model[0].bias,) if bias else ()):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_gamma_zero_stays_finite_and_gamma_still_learns():
    model, _ = _fused_model(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight[0] = 0.0
    x = torch.randn(4, 3, 6, 6)
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 0], model[1].bias[0].expand_as(out[:, 0]))  # gamma = 0: the channel is beta
    (out * torch.randn_like(out)).sum().backward()
    assert model[1].weight.grad[0] != 0 and torch.isfinite(model[1].weight.grad).all()
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_zero_variance_and_tiny_eps_stay_finite(frozen):
    model, _ = _fused_model(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-30), freeze_bn_step=0 if frozen else None)
    with torch.no_grad():
        model[1].running_var[1] = 0.0
    out = model(torch.randn(4, 3, 6, 6))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(model[0].weight.grad).all()


def test_freeze_bn_step_stops_statistics_after_that_many_optimizer_steps():
    model, quantizer = _fused_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), freeze_bn_step=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    means = []
    for _ in range(4):
        model(torch.randn(4, 3, 6, 6) + 1).sum().backward()
        optimizer.step()
        means.append(model[1].running_mean.clone())
    assert not torch.equal(means[0], means[1])  # live for steps 0 and 1
    assert torch.equal(means[2], means[3])  # frozen from step 2
    assert [f.is_bn_frozen for f in quantizer.fusions()] == [True]


def test_activation_fusion_quantizes_after_the_relu_and_the_relu_module_passes_it_through():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), _randomize_bn(nn.BatchNorm2d(2)), relu)
    config = [
        {
            "op_names": ["0"],
            "target_names": ["weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "fuse_names": [("0", "1", "2")],
        }
    ]
    quantizer = QATQuantizer(model, config)
    produced = []
    model[0].register_forward_hook(lambda module, args, output: produced.append(output))
    out = model(torch.randn(3, 1, 6, 6))
    assert model[2] is relu and isinstance(relu, nn.ReLU) and type(relu).__name__ == "FusedReLU"
    assert out is produced[0]  # passed through: no second rectified copy kept for backward
    assert relu(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]  # any other input is still rectified
    fq = model[0].fake_quant["_output_0"]
    assert fq.zero_point.item() == 0 and fq.observer.tracked_min.item() == 0  # the range starts at 0: after ReLU
    assert torch.allclose(torch.round(out / fq.scale) * fq.scale, out, atol=1e-6) and out.min() >= 0
    quantizer.unwrap_model()
    assert type(relu) is nn.ReLU and "_fused_into" not in relu.__dict__


def test_state_dict_keys_unwrap_and_copies():
    model, quantizer = _fused_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    float_keys = set(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict())
    assert float_keys < set(model.state_dict()) and "0.fusion.bn_frozen" in model.state_dict()
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x)) and clone[0].fusion.bn is clone[1]
    quantizer.unwrap_model()
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.BatchNorm2d
    assert set(model.state_dict()) == float_keys
    assert torch.allclose(model(x), model[1](model[0](x)))


class NotAChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x) + 1.0)


class Untraceable(NotAChain):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            x = x * 2
        return self.bn(self.conv(x) + 1.0)


def test_non_consecutive_fuse_names_fail_before_anything_changes():
    model = NotAChain()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"config_list\[0\]: key 'fuse_names': \('conv', 'bn'\) is not a chain"):
        QATQuantizer(
            model,
            [{"op_names": ["conv"], "target_names": ["weight"], "fuse_names": [("conv", "bn")]}],
            example_inputs=torch.randn(1, 1, 5, 5),
        )
    assert type(model.conv) is nn.Conv2d and type(model.bn) is nn.BatchNorm2d and list(model.state_dict()) == keys


@pytest.mark.parametrize("model_class, example", [(NotAChain, None), (Untraceable, torch.randn(1, 1, 5, 5))])
def test_a_non_consecutive_fusion_without_a_graph_is_caught_at_the_first_forward(model_class, example):
    model = model_class()  # no example input, or one torch.export cannot follow: the chain is checked when it runs
    QATQuantizer(
        model, [{"op_names": ["conv"], "target_names": ["weight"], "fuse_names": [("conv", "bn")]}], example_inputs=example
    )
    with pytest.raises(ValueError, match="must receive the output of 'conv'"):
        model(torch.randn(1, 1, 5, 5))


@pytest.mark.parametrize(
    "config, match",
    [
        (
            [
                {"op_names": ["0"], "target_names": ["weight"], "fuse_names": [("0", "1")]},
                {"op_names": ["1"], "target_names": ["weight"]},
            ],
            "cannot also be quantized",
        ),
        ([{"op_names": ["0"], "target_names": ["weight"], "fuse_names": [("0", "1"), ("0", "1")]}], "fused only once"),
    ],
)
def test_conflicting_fusions_are_refused(config, match):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=match):
        QATQuantizer(model, config)
    assert type(model[0]) is nn.Conv2d


def test_bn_without_running_statistics_cannot_be_folded():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        QATQuantizer(model, [{"op_names": ["0"], "target_names": ["weight"], "fuse_names": [("0", "1")]}])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + y  # residual: bn2 is folded, the add is not an activation
        return self.fc(F.relu(y).mean(dim=(2, 3)))


def test_fuse_auto_finds_conv_bn_and_relu_chains():
    model = Block()
    config = [
        {
            "op_types": ["Conv2d", "Linear"],
            "target_names": ["weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
        }
    ]
    quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=torch.randn(1, 3, 6, 6))
    fusions = {f.group: (f.bn is not None, f.activation) for f in quantizer.fusions()}
    assert fusions == {("conv1", "bn1"): (True, "relu"), ("conv2", "bn2"): (True, None)}
    out = model(torch.randn(2, 3, 6, 6))
    assert out.shape == (2, 2) and model.conv1.fake_quant["_output_0"].observer.tracked_min.item() == 0.0


def test_fuse_auto_default_is_off_and_a_model_without_a_graph_is_refused_untouched():
    assert list(QATQuantizer(Block(), [{"op_types": ["Conv2d"]}]).fusions()) == []
    model = Untraceable()
    keys = list(model.state_dict())
    config = [{"op_names": ["conv"], "target_names": ["weight"]}]
    with pytest.raises(ValueError, match=r"fuse='auto' finds the chains to fold in the model's graph.*pass example_inputs="):
        QATQuantizer(model, config, fuse="auto")
    with pytest.raises(ValueError, match=r"could not capture the graph of Untraceable with torch.export \(\w+"):
        QATQuantizer(model, config, fuse="auto", example_inputs=torch.randn(1, 1, 5, 5))
    assert type(model.conv) is nn.Conv2d and list(model.state_dict()) == keys and not hasattr(model, "quantrain_step")


def test_bad_fuse_argument():
    with pytest.raises(ValueError, match="fuse must be None"):
        QATQuantizer(Block(), [{"op_types": ["Conv2d"]}], fuse="yes")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        from quantrain import Add

        self.conv, self.add, self.relu = nn.Conv2d(2, 2, 3, padding=1), Add(), nn.ReLU()

    def forward(self, x):
        return self.relu(self.add(self.conv(x), x))


def test_fuse_auto_quantizes_a_residual_add_after_its_relu():
    model = Residual()
    config = [{"op_types": ["Add"], "quant_dtype": "uint8", "quant_scheme": "affine"}]
    quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=torch.randn(1, 2, 5, 5))
    assert [(f.group, f.activation) for f in quantizer.fusions()] == [(("add", "relu"), "relu")]
    out = model(torch.randn(4, 2, 5, 5))
    fq = model.add.fake_quant["_output_0"]
    assert fq.observer.tracked_min.item() == 0.0 and fq.zero_point.item() == 0.0  # the range is the ReLU's
    assert torch.allclose(torch.round(out / fq.scale) * fq.scale, out, atol=1e-6)


@pytest.mark.parametrize(("name", "reference"), [("relu", F.relu), ("relu6", F.relu6)])
def test_fused_activations_match_torch_and_keep_only_a_boolean_mask_for_backward(name, reference):
    from quantrain.wrapping.fusion import ACTIVATIONS

    x = torch.tensor([-1.0, 0.0, 0.5, 6.0, 7.0], requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, -4.0, 5.0])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ACTIVATIONS[name](x)
    assert torch.equal(out, reference(x))
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(reference(x), x, grad)[0])
    assert [t.dtype for t in saved] == [torch.bool]  # no float copy of the output
    with torch.no_grad():
        assert torch.equal(ACTIVATIONS[name](x), reference(x))


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6])
def test_the_output_quantizer_applying_the_fused_activation_gives_the_same_numbers_as_activation_then_quantizer(
    activation, monkeypatch
):
    """The output quantizer applies a fused ReLU/ReLU6 itself (one saved mask for both); outputs, gradients and
    ranges equal those of applying the activation and then quantizing."""
    import quantrain.wrapping.quantized_module as quantized_module

    def run(merged):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), activation(), nn.Flatten(), nn.Linear(4 * 16, 3))
        config = [{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight", "_output_"]}]
        config[0].update(quant_dtype="uint8", quant_scheme="affine")
        with monkeypatch.context() as patch:
            if not merged:  # force the unmerged path: activation in the fusion, then the output quantizer
                patch.setattr(quantized_module, "_SINGLE_OUTPUT", ())
            QATQuantizer(model, config, fuse="auto", freeze_bn_step=2, example_inputs=torch.randn(1, 2, 6, 6))
            grads, outputs = [], []
            for step in range(3):
                x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(step)) * 3
                out = model(x)
                out.square().sum().backward()
                outputs.append(out.detach())
                grads.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad()
        return outputs, grads, model[0].fake_quant["_output_0"].scale

    merged, unmerged = run(True), run(False)
    for a, b in zip(merged[0], unmerged[0], strict=True):
        assert torch.equal(a, b)
    for step_a, step_b in zip(merged[1], unmerged[1], strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(merged[2], unmerged[2])
