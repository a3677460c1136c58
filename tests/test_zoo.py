"""Models nobody here wrote (tests/zoo.py), quantized as their users would, trained two steps, exported, and run in
ONNX Runtime: top-1 agreement with the fake-quant model >= 99.9% and the largest difference at most one output
quantization step; with the ONNX Runtime placement, no float op left between integer ones where the zoo model's ops
have integer kernels."""

import collections

import pytest
import torch

import zoo
from helpers import optimized_node_names, optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx

FIRST_LAYER = {
    "mnist_cnn": "conv1",
    "hf_resnet": "resnet.embedder.embedder.convolution",
    "hf_mobilenet_v2": "mobilenet_v2.conv_stem.first_conv.convolution",
    "hf_efficientnet": "efficientnet.embeddings.convolution",
    "hf_convnext": "convnext.embeddings.patch_embeddings",
    "hf_regnet": "regnet.embedder.embedder.convolution",
    "hf_vit": "vit.embeddings.patch_embeddings.projection",
    "hf_bert": "bert.encoder.layer.0.attention.self.query",
    "hf_distilbert": "distilbert.transformer.layer.0.attention.q_lin",
    "hf_gpt2": "transformer.h.0.attn.c_attn",
}
LAYERS = {"hf_gpt2": ("Linear", "Conv1D"), "hf_efficientnet": ("Conv2d", "EfficientNetDepthwiseConv2d", "Linear")}
"""Layer types where a model has its own (op_types match class names exactly, as in NNI): GPT-2's projections are
transformers' Conv1D (weight in x out), EfficientNet's depthwise convolutions a Conv2d subclass."""
LAST_LAYER = {"hf_gpt2": "score"}  # GPT-2's projections are transformers' Conv1D (weight in x out)


def _train(model, example, steps=2):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        output = zoo.run(model, example)
        logits = output.logits if hasattr(output, "logits") else output
        logits.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _batch(example, seed=7):
    """A second batch of the example's kind, larger, for the parity check."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(example, dict):
        ids = torch.randint(1, 100, (16, example["input_ids"].shape[1]), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn((16, *example.shape[1:]), generator=generator)


def _check(model, example, path, last_layer, exporter="torchscript"):
    """Export, then parity: within one output step and 99.9% top-1 agreement, or, where the model's own float32
    forward is further than that from the same model in float64 (deep random-weight CNNs amplify rounding), ONNX
    Runtime no further from the float64 forward than PyTorch's float32 forward is, plus one step, and agreeing on
    top-1 with it as often, but for one sample."""
    # the placement tests export through the faster fallback; every zoo model also goes through the default
    # exporter in test_the_torch_export_based_exporter_writes_the_same_integer_model
    export = export_onnx(model.eval(), example, path, exporter=exporter)
    batch = _batch(example)
    report = check_parity(model, path, batch, float64=True)
    output, own, onnx_ = report.outputs[0], report.pytorch_vs_float64[0], report.onnx_vs_float64[0]
    scale = 1.0
    if output.max_diff_in_steps is None:  # the output indexes the last layer's (GPT-2 picks each sequence's last token)
        scale = model.get_submodule(last_layer).fake_quant["_output_0"].scale.item()
    steps, own_steps, onnx_steps = (
        o.max_abs_diff / scale if o.max_diff_in_steps is None else o.max_diff_in_steps for o in (output, own, onnx_)
    )
    top1 = output.top1_agreement
    if steps <= 1 + 1e-4 and (top1 is None or top1 >= 0.999):
        return export
    assert onnx_steps <= max(own_steps, 1.0) + 1 + 1e-4, report
    assert top1 is None or onnx_.top1_agreement >= own.top1_agreement - 1 / len(_rows(batch)) - 1e-9, report
    assert any("amplifies float32 rounding" in note for note in report.notes), report.notes
    return export


def _rows(batch):
    return batch["input_ids"] if isinstance(batch, dict) else batch


def _quantize_for_onnxruntime(name):
    model, example = zoo.build(name)
    first = FIRST_LAYER.get(name) or zoo.TORCHVISION_FIRST_LAYER[name]
    config = deployable_config_list(
        8, 8, input_module=first, op_types=LAYERS.get(name, ("Conv2d", "Linear")), target="onnxruntime"
    )
    QATQuantizer(model, config, fuse="auto", integer_bias=True, example_inputs=example)
    _train(model, example)
    return model, example


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_the_onnxruntime_placement_exports_an_integer_model_that_matches(name, tmp_path):
    model, example = _quantize_for_onnxruntime(name)
    path = tmp_path / f"{name}.onnx"
    report = _check(model, example, path, LAST_LAYER.get(name, ""))
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert not {"Relu", "Clip"} & set(ops), ops  # every ReLU/ReLU6 folded into the op before it
    assert _float_layers(tmp_path / "optimized.onnx") == []  # every layer, and attention's products, in integer
    if name in ("mnist_cnn", "hf_resnet", "hf_mobilenet_v2", "hf_regnet", "hf_efficientnet"):
        assert not {"Conv", "Gemm", "MatMul", "Add", "Mul", "MatMulNBits"} & set(ops), ops  # integer from end to end
        assert report.float_islands == []
    else:  # LayerNorm, GELU, SiLU, attention: each float run between integer ones is named, with its reason
        assert (
            report.float_islands
            and [island.note for island in report.float_islands] == report.notes[-len(report.float_islands) :]
        )
        names = set(optimized_node_names(path, tmp_path))
        assert all(set(island.nodes) <= names for island in report.float_islands)


def _float_layers(path):
    """The nodes of an optimized graph that multiply in float: Conv, Gemm, MatMul (attention's products included),
    weight-only MatMulNBits."""
    import onnx

    kinds = ("Conv", "Gemm", "MatMul", "FusedMatMul", "MatMulNBits")
    return [f"{node.op_type} {node.name}" for node in onnx.load(path).graph.node if node.op_type in kinds]


@pytest.mark.parametrize("name", ["mnist_cnn", "hf_resnet", "hf_bert"])
def test_a_plain_nni_style_config_exports_and_matches(name, tmp_path):
    """As NNI's docs write a config_list: Conv2d and Linear, inputs, weights and outputs, no preset."""
    model, example = zoo.build(name)
    config = [
        {
            "op_types": ["Conv2d", "Linear"],
            "target_names": ["_input_", "weight", "_output_"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric"}},
        }
    ]
    QATQuantizer(model, config)
    _train(model, example)
    _check(model, example, tmp_path / f"{name}.onnx", "")


FAST_THROUGH_TORCH_EXPORT = ("mnist_cnn", "hf_bert")  # a CNN with a shape check; keyword inputs and attention


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name in FAST_THROUGH_TORCH_EXPORT else pytest.mark.slow) for name in sorted(zoo.ZOO)]
)
def test_the_torch_export_based_exporter_writes_the_same_integer_model(name, tmp_path):
    """exporter='torch.export': parity as above, and ONNX Runtime runs the same layers as integer kernels as from
    the TorchScript-based export (the float ops around LayerNorm and GELU may be decomposed differently)."""
    model, example = _quantize_for_onnxruntime(name)
    _check(model, example, tmp_path / "dynamo.onnx", LAST_LAYER.get(name, ""), exporter="torch.export")
    _check(model, example, tmp_path / "torchscript.onnx", LAST_LAYER.get(name, ""), exporter="torchscript")
    layers = {}
    for exporter in ("dynamo", "torchscript"):
        ops = collections.Counter(optimized_op_types(tmp_path / f"{exporter}.onnx", tmp_path))
        assert not {"Relu", "Clip"} & set(ops), ops
        assert _float_layers(tmp_path / "optimized.onnx") == [], exporter
        products = sum(n for op, n in ops.items() if op.startswith(("QGemm", "QLinearMatMul", "MatMulInt")))
        layers[exporter] = (ops["QLinearConv"], products)
    # the elementwise integer ops may differ (torch.export drops GPT-2's concatenation with its empty key cache), and
    # a product may be a QGemm from one exporter and a QLinearMatMul from the other (a Linear without bias)
    assert layers["dynamo"] == layers["torchscript"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=() if name == "tv_resnet18" else pytest.mark.slow) for name in sorted(zoo.TORCHVISION_FIRST_LAYER)],
)
def test_torchvision_classification_models_export_integer_models_that_match(name, tmp_path):
    """torchvision's own model code (see zoo.TORCHVISION_STATUS for how it imported here), exported through the
    default exporter: integer end to end wherever ONNX Runtime has the kernels, each float island named."""
    if zoo.TORCHVISION_MODELS is None:
        pytest.skip(zoo.TORCHVISION_STATUS)
    model, example = _quantize_for_onnxruntime(name)
    path = tmp_path / f"{name}.onnx"
    report = _check(model, example, path, "", exporter="torch.export")
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert not {"Relu", "Clip"} & set(ops), ops
    assert _float_layers(tmp_path / "optimized.onnx") == []
    islands = {op for island in report.float_islands for op in island.op_types}
    assert islands == TORCHVISION_FLOAT_ISLANDS.get(name, set()), report.notes
    assert [island.note for island in report.float_islands] == report.notes[len(report.notes) - len(report.float_islands) :]


TORCHVISION_FLOAT_ISLANDS = {
    "tv_mobilenet_v3_small": {"HardSigmoid"},  # of each Hardswish and squeeze-excite gate: no integer kernel
}
"""The float islands that remain in torchvision's models (the others are integer from end to end)."""


def test_the_mnist_cnn_runs_conv_relu_pool_as_integer_kernels_with_its_relus_folded(tmp_path):
    """conv -> ReLU -> maxpool twice, then two Linear layers, a forward that checks its input size: with fuse='auto'
    each ReLU folds into the layer before it, and ONNX Runtime runs QLinearConv -> MaxPool -> QLinearConv -> MaxPool
    -> QGemm -> QGemm, nothing float between them."""
    model, example = _quantize_for_onnxruntime("mnist_cnn")
    quantizer_fusions = [
        (name, module.fusion.activation) for name, module in model.named_modules() if getattr(module, "fusion", None)
    ]
    assert quantizer_fusions == [("conv1", "relu"), ("conv2", "relu"), ("fc1", "relu")]
    path = tmp_path / "mnist.onnx"
    _check(model, example, path, "")
    kernels = [
        op for op in optimized_op_types(path, tmp_path) if op not in ("QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten")
    ]
    assert kernels == ["QLinearConv", "MaxPool", "QLinearConv", "MaxPool", "QGemm", "QGemm"]
