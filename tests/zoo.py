"""Models nobody here wrote, built from code with random weights and small inputs: Hugging Face transformers' vision
and text models, and a small MNIST-style CNN whose forward checks its input size (as published MNIST models do).

Each builder returns ``(model, example)``: the model in training mode and an example batch as its forward takes it
(a tensor, or a dict of keyword inputs). ``big=True`` (the zoo benchmark) builds wider, deeper models on larger inputs,
where the arithmetic, not the per-operator overhead, sets the latency.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class MnistCnn(nn.Module):
    """conv -> ReLU -> maxpool twice, then two Linear layers; the forward refuses inputs that are not 28x28.
    ``widths``: the two convolutions' channels and the hidden features (PyTorch's MNIST example: 32, 64, 128)."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        c1, c2, hidden = widths
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"expected 28x28 images, got {tuple(x.shape[-2:])}")
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


def _images(size: int = 32, batch: int = 2, big: bool = False) -> torch.Tensor:
    size = 64 if big else size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(batch: int = 2, length: int = 16, big: bool = False) -> dict[str, torch.Tensor]:
    length = 64 if big else length
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _transformers() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def mnist_cnn(big: bool = False) -> tuple[nn.Module, Any]:
    return MnistCnn((32, 64, 128) if big else (8, 16, 32)), torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def hf_resnet(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    sizes = {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [2, 2, 2, 2]} if big else {}
    config = t.ResNetConfig(**{"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], **sizes}, num_labels=10)
    return t.ResNetForImageClassification(config), _images(big=big)


def hf_mobilenet_v2(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.MobileNetV2Config(depth_multiplier=1.0 if big else 0.35, image_size=64 if big else 32, num_labels=10)
    return t.MobileNetV2ForImageClassification(config), _images(big=big)


def hf_efficientnet(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    width, depth = (1.0, 1.0) if big else (0.25, 0.25)
    config = t.EfficientNetConfig(
        width_coefficient=width,
        depth_coefficient=depth,
        image_size=64 if big else 32,
        hidden_dim=1280 if big else 320,
        num_labels=10,
    )
    return t.EfficientNetForImageClassification(config), _images(big=big)


def hf_convnext(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    sizes = {"num_stages": 3, "hidden_sizes": [48, 96, 192], "depths": [2, 2, 2]} if big else {}
    config = t.ConvNextConfig(**{"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], **sizes}, num_labels=10)
    return t.ConvNextForImageClassification(config), _images(big=big)


def hf_regnet(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    sizes = {"embedding_size": 32, "hidden_sizes": [32, 64, 160, 384], "depths": [1, 2, 4, 1]} if big else {}
    config = t.RegNetConfig(
        **{"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], **sizes}, groups_width=8, num_labels=10
    )
    return t.RegNetForImageClassification(config), _images(big=big)


def hf_vit(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    hidden, layers = (192, 6) if big else (32, 2)
    config = t.ViTConfig(
        image_size=64 if big else 32,
        patch_size=8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=3 if big else 2,
        intermediate_size=4 * hidden if big else 64,
        num_labels=10,
    )
    return t.ViTForImageClassification(config), _images(big=big)


def hf_bert(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    hidden, layers = (256, 4) if big else (32, 2)
    config = t.BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if big else 2,
        intermediate_size=4 * hidden if big else 64,
        max_position_embeddings=64 if big else 32,
        num_labels=3,
    )
    return t.BertForSequenceClassification(config), _tokens(big=big)


def hf_distilbert(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    dim, layers = (256, 4) if big else (32, 2)
    config = t.DistilBertConfig(
        vocab_size=100,
        dim=dim,
        n_layers=layers,
        n_heads=4 if big else 2,
        hidden_dim=4 * dim if big else 64,
        max_position_embeddings=64 if big else 32,
        num_labels=3,
    )
    return t.DistilBertForSequenceClassification(config), _tokens(big=big)


def hf_gpt2(big: bool = False) -> tuple[nn.Module, Any]:
    t = _transformers()
    width, layers = (256, 4) if big else (32, 2)
    config = t.GPT2Config(
        vocab_size=100,
        n_embd=width,
        n_layer=layers,
        n_head=4 if big else 2,
        n_positions=64 if big else 32,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return t.GPT2ForSequenceClassification(config), _tokens(big=big)


ZOO: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "mnist_cnn": mnist_cnn,
    "hf_resnet": hf_resnet,
    "hf_mobilenet_v2": hf_mobilenet_v2,
    "hf_efficientnet": hf_efficientnet,
    "hf_convnext": hf_convnext,
    "hf_regnet": hf_regnet,
    "hf_vit": hf_vit,
    "hf_bert": hf_bert,
    "hf_distilbert": hf_distilbert,
    "hf_gpt2": hf_gpt2,
}
"""Every model of the zoo, by name."""


TORCHVISION_OPERATORS = (
    "roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward", "roi_pool", "_roi_pool_backward",
    "ps_roi_pool", "_ps_roi_pool_backward", "nms", "qnms", "qroi_align", "deform_conv2d", "_deform_conv2d_backward",
)  # fmt: skip
"""The compiled operators torchvision registers shapes for at import (detection and deformable convolutions)."""


def _import_torchvision_models() -> tuple[Any, str]:
    """torchvision.models, and how it was imported (or ``None`` and why not).

    torchvision's PyPI wheel is built against the CUDA build of torch; with the CPU build its compiled operators do
    not load, and its import then fails registering their shapes (``operator torchvision::nms does not exist``).
    The classification models are pure Python and never call those operators, so where that happens the import is
    retried with stand-in schemas for them (each ``(Tensor x) -> Tensor``, never run), defined in torch's registry
    under torchvision's namespace only because torchvision's own did not load."""
    import importlib.util
    import sys

    if importlib.util.find_spec("torchvision") is None:
        # not in the test extras: next to the CPU torch build, PyPI's torchvision breaks the import of every library
        # that imports it (transformers, torchmetrics, so Lightning) in processes that do not define the stand-ins
        return None, "torchvision is not installed (pip install torchvision: the zoo then adds its models)"
    try:
        import torchvision.models

        return torchvision.models, "torchvision with its compiled operators"
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            return None, f"torchvision does not import: {error}"
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        library = torch.library.Library("torchvision", "DEF")
        for operator in TORCHVISION_OPERATORS:
            library.define(f"{operator}(Tensor x) -> Tensor")
        _LIBRARIES.append(library)  # the definitions live as long as the library object
        import torchvision.models

        return torchvision.models, f"torchvision's model code; its compiled operators did not load ({error})"


_LIBRARIES: list = []
TORCHVISION_MODELS, TORCHVISION_STATUS = _import_torchvision_models()

TORCHVISION_FIRST_LAYER = {
    "tv_resnet18": "conv1",
    "tv_mobilenet_v2": "features.0.0",
    "tv_mobilenet_v3_small": "features.0.0",
    "tv_efficientnet_b0": "features.0.0",
    "tv_regnet_x_400mf": "stem.0",
    "tv_shufflenet_v2_x0_5": "conv1.0",
}
"""torchvision's classification models in the zoo (where torchvision imports), with their first convolution."""


def torchvision_model(name: str, big: bool = False) -> tuple[nn.Module, Any]:
    if TORCHVISION_MODELS is None:
        raise RuntimeError(TORCHVISION_STATUS)
    # 64x64 images, 4 of them: ImageNet models downsample 32 times, and BatchNorm over a batch of 2 single pixels
    # (32x32 inputs) normalizes two values to +-1, with gradients of 1e12 and more in the float model itself
    return getattr(TORCHVISION_MODELS, name.removeprefix("tv_"))(num_classes=10), _images(size=64, batch=4, big=big)


def build(name: str, seed: int = 0, big: bool = False) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model, example = torchvision_model(name, big) if name.startswith("tv_") else ZOO[name](big=big)
    return model.train(), example


def run(model: nn.Module, example: Any) -> Any:
    return model(**example) if isinstance(example, dict) else model(example)
