"""Ready-made config_lists.

>>> deployable_config_list(4, 8)[1]["target_settings"]["weight"]["quant_dtype"]
'int4'
"""

from __future__ import annotations

__all__ = ["ONNXRUNTIME_MODULE_OUTPUTS", "ONNXRUNTIME_OPS", "TARGETS", "deployable_config_list"]

TARGETS = (None, "onnxruntime")

ONNXRUNTIME_OPS = (
    "add",
    "mul",
    "cat",
    "matmul",
    "sigmoid",
    "hardsigmoid",
    "silu",
    "hardswish",
    "gelu",
    "tanh",
    "softmax",
    "scaled_dot_product_attention",
    "adaptive_avg_pool2d",
    "mean",
)
"""Functional ops whose outputs ``target='onnxruntime'`` quantizes: those ONNX Runtime runs in integer (QLinearAdd,
QLinearMul, QLinearConcat, QLinearMatMul, QLinearSigmoid, QLinearGlobalAveragePool, which a mean over the spatial
dims exports as) and the activations without an
integer kernel whose output feeds a layer that has one (SiLU, Hardswish, GELU, Tanh, Softmax: their inputs are dequantized,
their outputs quantized again, so the next Conv/Gemm/MatMul runs in integer)."""

ONNXRUNTIME_MODULE_OUTPUTS = ("LayerNorm", "GroupNorm", "AdaptiveAvgPool2d", "AvgPool2d")
"""Modules with parameters (or ``nn`` pooling classes) whose outputs ``target='onnxruntime'`` quantizes, for the
same reason: the layer after a LayerNorm reads integers. Their subclasses too (``include_subclasses``), so a
library's own norm layer (Hugging Face's ``ConvNextLayerNorm``) is quantized as the ``nn`` class it derives from."""


def deployable_config_list(
    weight_bits: int = 8,
    activation_bits: int = 8,
    *,
    input_module: str = "0",
    op_types: tuple[str, ...] = ("Conv2d", "Linear"),
    output_op_types: tuple[str, ...] = (),
    target: str | None = None,
) -> list[dict]:
    """The layout that exports exactly to ONNX Runtime's integer kernels.

    int<weight_bits> symmetric weights, one scale per output channel; uint<activation_bits> affine activations, each
    quantized once where an integer engine would: the input of ``input_module`` (the model's first layer), and the
    output of every ``op_types`` layer (after the ReLU that ``fuse='auto'`` fuses into it) and of every
    ``output_op_types`` module (e.g. ``("Add",)`` for :class:`quantrain.Add` residuals).

    ``target='onnxruntime'`` also quantizes the outputs of the functional ops in :data:`ONNXRUNTIME_OPS` (residual
    ``+``, ``torch.cat``, squeeze-excite ``*``, ...; found in the model's graph, so the quantizer needs
    ``example_inputs``) and of the modules in :data:`ONNXRUNTIME_MODULE_OUTPUTS`, so that models nobody edited for
    quantization (torchvision's, Hugging Face's) run in ONNX Runtime's integer kernels from layer to layer; an op
    followed only by a ReLU is quantized after it with ``fuse='auto'``.

    >>> [entry.get("op_types") for entry in deployable_config_list(target="onnxruntime")][2:]  # doctest: +ELLIPSIS
    [['LayerNorm', ...], ['add', 'cat', 'matmul', ...], ['mul'], ['silu', 'hardswish'], ['scaled_dot_product_attention']]
    """
    if target not in TARGETS:
        raise ValueError(f"target must be None or 'onnxruntime', got {target!r}")
    activations = {"quant_dtype": f"uint{activation_bits}", "quant_scheme": "affine"}
    weights = {"quant_dtype": f"int{weight_bits}", "quant_scheme": "symmetric", "granularity": "out_channel"}
    config = [
        {"op_names": [input_module], "target_names": ["_input_"], **activations},
        {
            "op_types": list(op_types),
            "target_names": ["weight", "_output_"],
            **activations,
            "target_settings": {"weight": weights},
        },
    ]
    outputs = (
        [*output_op_types, *(t for t in ONNXRUNTIME_MODULE_OUTPUTS if t not in output_op_types)] if target else output_op_types
    )
    if outputs:
        # a norm or pool of a library's own class (Hugging Face's ConvNextLayerNorm(nn.LayerNorm)) counts as its base
        subclasses = {"include_subclasses": True} if target else {}
        config.append({"op_types": list(outputs), **subclasses, "target_names": ["_output_"], **activations})
    if target == "onnxruntime":
        composed = ("mul", "silu", "hardswish", "scaled_dot_product_attention")
        config.append(
            {"op_types": [op for op in ONNXRUNTIME_OPS if op not in composed], "target_names": ["_output_"], **activations}
        )
        # a product with a parameter (a layer scale) as QLinearMul: the parameter is quantized too
        config.append({"op_types": ["mul"], "target_names": ["_output_", "_param_"], **activations})
        # SiLU and Hardswish as ONNX Runtime runs them, a gate then QLinearMul: the gate is quantized too
        config.append({"op_types": ["silu", "hardswish"], "target_names": ["_output_", "_gate_"], **activations})
        # attention's two products as QLinearMatMul: q @ k^T and the softmax quantized too
        attention = {"op_types": ["scaled_dot_product_attention"], "target_names": ["_output_", "_scores_", "_probs_"]}
        config.append({**attention, **activations})
    return config
