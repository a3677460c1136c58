"""Attention as ONNX Runtime runs it in integer: with the ``_scores_`` and ``_probs_`` targets, an op point on
``F.scaled_dot_product_attention`` computes ``q_out(q_probs(softmax(q_scores(q @ k^T) * scale + mask)) @ v)``, so the
export holds two QLinearMatMul where the fused attention left two float products."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, export_onnx
from quantrain.wrapping.op_points import OpPoint

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}
PARTS = ["_output_", "_scores_", "_probs_"]


class Passthrough(nn.Module):
    def forward(self, x, clamp=None):
        return x


def _unquantized_point() -> OpPoint:
    parts = nn.ModuleDict({name: Passthrough() for name in ("_output_0", "_scores_0", "_probs_0")})
    return OpPoint(parts, "attention", op="scaled_dot_product_attention")


def _qkv(heads=2, kv_heads=2, length=5, source=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(3, heads, length, 4, generator=generator)
    k, v = (torch.randn(3, kv_heads, source, 4, generator=generator) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"attn_mask": "float with an empty row"},
        {"attn_mask": "bool", "is_causal": False, "scale": 2.0},
    ],
)
def test_the_composed_attention_computes_what_pytorch_computes(options):
    q, k, v = _qkv()
    options = dict(options)
    if options.get("attn_mask") == "bool":
        mask = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[0, 0, 2] = False  # a query whose keys are all masked: zeros, as PyTorch gives
        options["attn_mask"] = mask
    elif options.get("attn_mask") in ("float", "float with an empty row"):
        empty = options["attn_mask"] != "float"
        options["attn_mask"] = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
        if empty:
            options["attn_mask"][3] = float("-inf")
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    got = _unquantized_point().attention(q, k, v, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    mask = options.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        assert torch.equal(got[0, :, 2], torch.zeros_like(got[0, :, 2]))
    elif isinstance(mask, torch.Tensor) and mask[3].isinf().all():
        assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]))


def test_grouped_query_attention_repeats_keys_and_values_per_group():
    q, k, v = _qkv(heads=4, kv_heads=2)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(_unquantized_point().attention(q, k, v, enable_gqa=True), expected, rtol=1e-5, atol=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scaled_dot_product_attention:0
        return self.out(attended.transpose(1, 2).flatten(2))


def _quantized(targets=PARTS):
    torch.manual_seed(0)
    model = SelfAttention()
    example = torch.randn(2, 6, 8)
    config = [
        {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], **UINT8},
        {"op_types": ["scaled_dot_product_attention"], "target_names": targets, **UINT8},
    ]
    quantizer = QATQuantizer(model, config, example_inputs=example)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for seed in range(3):
        model(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), quantizer


def test_the_parts_quantize_the_scores_and_the_probabilities_before_each_product():
    model, quantizer = _quantized()
    point = quantizer.op_points["scaled_dot_product_attention:0"]
    assert sorted(point.fake_quant) == ["_output_0", "_probs_0", "_scores_0"]
    assert sorted(quantizer.get_calibration_config()["scaled_dot_product_attention:0"]) == sorted(point.fake_quant)
    seen = {}

    def remember(name):
        def hook(module, args, output):
            seen[name] = (args[0], output)

        return hook

    hooks = [point.fake_quant[name].register_forward_hook(remember(name)) for name in ("_scores_0", "_probs_0")]
    hooks += [model.query.register_forward_hook(remember("q")), model.key.register_forward_hook(remember("k"))]
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    q, k = model._split(seen["q"][1]), model._split(seen["k"][1])
    torch.testing.assert_close(seen["_scores_0"][0], q @ k.transpose(-2, -1))  # the raw product, before scale and mask
    for name in ("_scores_0", "_probs_0"):  # each part put on its own grid
        out, fq = seen[name][1], point.fake_quant[name]
        levels = out / fq.scale + fq.zero_point
        assert torch.allclose(levels, levels.round(), atol=1e-3), name
    probs_in = seen["_probs_0"][0]
    torch.testing.assert_close(probs_in.sum(-1), torch.ones_like(probs_in.sum(-1)))
    assert torch.equal(probs_in.triu(1), torch.zeros_like(probs_in))  # causal: no weight on later keys


def test_without_the_parts_attention_is_pytorchs_own_quantized_at_its_output():
    _, quantizer = _quantized(["_output_"])
    assert sorted(quantizer.op_points["scaled_dot_product_attention:0"].fake_quant) == ["_output_0"]


def test_the_export_runs_both_products_as_integer_matmuls_and_matches(tmp_path):
    model, _ = _quantized()
    x = torch.randn(2, 6, 8)
    path = tmp_path / "attention.onnx"
    export_onnx(model, x, path)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearMatMul"] == 2 and "MatMul" not in ops and "FusedMatMul" not in ops, ops
    report = check_parity(model, path, torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(3)))
    assert report.outputs[0].max_diff_in_steps <= 1.0 + 1e-4, report


@pytest.mark.parametrize(
    ("targets", "op", "match"),
    [
        (
            ["_output_", "_scores_"],
            "add",
            r"'_scores_' is q @ k\^T inside scaled_dot_product_attention; the entry also selects \['add'\]",
        ),
        (
            ["_output_", "_gate_"],
            "scaled_dot_product_attention",
            r"'_gate_' is the gate inside silu or hardswish \(its sigmoid or hardsigmoid\); the entry also selects",
        ),
        (
            ["_probs_", "_scores_"],
            "scaled_dot_product_attention",
            r"\['_probs_', '_scores_'\]: '_probs_', '_scores_' come with the op's '_output_'",
        ),
    ],
)
def test_parts_of_another_op_or_without_the_output_are_errors_naming_the_entry(targets, op, match):
    model = SelfAttention()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = [{"op_types": [op], "target_names": targets, **UINT8}]
    with pytest.raises(ValueError, match=r"^config_list\[0\]: key 'target_names': " + match):
        QATQuantizer(model, config, example_inputs=torch.randn(2, 6, 8))
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert set(model.state_dict()) == set(before)
