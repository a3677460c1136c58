"""Models nobody here wrote, built from code with random weights and small inputs: Hugging Face transformers' vision
and text models, and a small MNIST-style CNN whose forward checks its input size (as published MNIST models do).

Each builder returns ``(model, example)``: the model in training mode and an example batch as its forward takes it
(a tensor, or a dict of keyword inputs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class MnistCnn(nn.Module):
    """conv -> ReLU -> maxpool twice, then two Linear layers; the forward refuses inputs that are not 28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"expected 28x28 images, got {tuple(x.shape[-2:])}")
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


def _images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _transformers() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def mnist_cnn() -> tuple[nn.Module, Any]:
    return MnistCnn(), torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def hf_resnet() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return t.ResNetForImageClassification(config), _images()


def hf_mobilenet_v2() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=10)
    return t.MobileNetV2ForImageClassification(config), _images()


def hf_efficientnet() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320, num_labels=10)
    return t.EfficientNetForImageClassification(config), _images()


def hf_convnext() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return t.ConvNextForImageClassification(config), _images()


def hf_regnet() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)
    return t.RegNetForImageClassification(config), _images()


def hf_vit() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return t.ViTForImageClassification(config), _images()


def hf_bert() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return t.BertForSequenceClassification(config), _tokens()


def hf_distilbert() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32, num_labels=3
    )
    return t.DistilBertForSequenceClassification(config), _tokens()


def hf_gpt2() -> tuple[nn.Module, Any]:
    t = _transformers()
    config = t.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return t.GPT2ForSequenceClassification(config), _tokens()


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


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model, example = ZOO[name]()
    return model.train(), example


def run(model: nn.Module, example: Any) -> Any:
    return model(**example) if isinstance(example, dict) else model(example)
