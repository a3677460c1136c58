"""quantizer.reestimate_bn: every BatchNorm's running statistics recomputed under the quantized model, as the plain
average over the batches given; everything else as it was."""

import copy

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer

LAYERS = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_scheme": "symmetric"}},
    }
]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batches(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(8, 2, 6, 6, generator=generator) + 1, torch.zeros(8)) for _ in range(count)]


def _trained(**options):
    model = _model()
    quantizer = QATQuantizer(model, LAYERS, example_inputs=torch.randn(1, 2, 6, 6), **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for x, _ in _batches(5, seed=1):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, quantizer


def _state_but_bn(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("1.")}


def test_the_statistics_are_the_average_of_each_batchs_statistics_of_what_the_batchnorm_reads():
    model, quantizer = _trained()
    bn = model[1]
    seen = []
    handle = bn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    before = _state_but_bn(model)
    assert quantizer.reestimate_bn(_batches(4), batches=3) == 3
    handle.remove()
    assert len(seen) == 3  # the conv's output, quantized as the deployed model computes it
    expected_mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert int(bn.num_batches_tracked) == 3
    after = _state_but_bn(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "only the BatchNorm statistics change"
    assert model.training and bn.momentum == 0.1  # modes and momentum as they were


def test_no_range_moves_and_a_model_in_eval_mode_stays_in_it():
    model, quantizer = _trained()
    ranges = [(fq.scale.clone(), fq.zero_point.clone()) for fq in quantizer.fake_quantizers()]
    model.eval()
    quantizer.reestimate_bn(_batches(2))
    assert not model.training and not model[1].training
    assert all(
        torch.equal(scale, fq.scale) and torch.equal(zero, fq.zero_point)
        for (scale, zero), fq in zip(ranges, quantizer.fake_quantizers(), strict=True)
    )


def test_a_folded_batchnorm_is_reestimated_through_the_fold_and_stays_frozen():
    model, quantizer = _trained(fuse="auto", freeze_bn_step=3)
    (fusion,) = list(quantizer.fusions())
    assert fusion.is_bn_frozen
    manual = copy.deepcopy(model)
    old_mean = model[1].running_mean.clone()
    assert quantizer.reestimate_bn(_batches(4)) == 4
    assert fusion.is_bn_frozen and not torch.allclose(model[1].running_mean, old_mean)
    # the same by hand: reset, cumulative average, BatchNorm in training mode, the fold live, four batches
    (manual_fusion,) = [m.fusion for m in manual.modules() if getattr(m, "fusion", None) is not None]
    manual.eval()
    manual[1].reset_running_stats()
    manual[1].momentum = None
    manual[1].train()
    manual_fusion.freeze_bn(False)
    with torch.no_grad():
        for x, _ in _batches(4):
            manual(x)
    torch.testing.assert_close(model[1].running_mean, manual[1].running_mean)
    torch.testing.assert_close(model[1].running_var, manual[1].running_var)
    weight, bias = quantizer.folded_parameters()["0"]  # what export folds reads the new statistics
    scale = model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
    torch.testing.assert_close(weight, model[0].weight * scale.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(bias, model[1].bias + (model[0].bias - model[1].running_mean) * scale)


def test_bad_data_leaves_the_statistics_and_the_modes_as_they_were():
    model, quantizer = _trained()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())

    def unchanged():
        return (
            torch.equal(bn.running_mean, stats[0])
            and torch.equal(bn.running_var, stats[1])
            and torch.equal(bn.num_batches_tracked, stats[2])
            and model.training
            and bn.momentum == 0.1
        )

    with pytest.raises(ValueError, match="data yielded no batch; the BatchNorm statistics are unchanged"):
        quantizer.reestimate_bn([])
    assert unchanged()
    good, bad = _batches(1)[0], (torch.randn(8, 5, 6, 6), None)  # five channels where the conv takes two
    with pytest.raises(RuntimeError):
        quantizer.reestimate_bn([good, bad])
    assert unchanged()
    with pytest.raises(ValueError, match="batches must be a positive int or None, got 0"):
        quantizer.reestimate_bn(_batches(1), batches=0)
    with pytest.raises(TypeError, match="data must be an iterable of batches"):
        quantizer.reestimate_bn(torch.tensor(3.0).item())
    with pytest.raises(TypeError, match="forward must be a callable"):
        quantizer.reestimate_bn(_batches(1), forward="model")
    assert unchanged()
    plain = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="Sequential has no BatchNorm that tracks running statistics"):
        QATQuantizer(plain, [{"op_types": ["Linear"], "quant_dtype": "int8"}]).reestimate_bn([torch.randn(2, 3)])


def test_batches_can_be_dicts_or_run_by_a_given_forward():
    model, quantizer = _trained()
    calls = []

    def forward(m, batch):
        calls.append(batch["pixels"].shape[0])
        return m(batch["pixels"])

    assert quantizer.reestimate_bn([{"pixels": x} for x, _ in _batches(2)], forward=forward) == 2
    assert calls == [8, 8] and int(model[1].num_batches_tracked) == 2
