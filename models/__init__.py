"""Reference models (torch, no torchvision) and their ONNX export.

Every model takes a (N, 1, 28, 28) image batch (Fashion-MNIST sized) and
returns 10 logits, except ``resnet50`` (torchvision's layout: (N, 3, 224, 224)
in, 1000 logits out; see ``INPUT_SHAPES``). ``REFERENCE_MODELS`` maps a name to a factory.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn import VGG, VGG16_WIDTHS, BottleneckResNet, ResNet50, ResNetCifar, ResNeXt, SEResNet
from .concat import DENSENET201, DenseNet, Inception
from .export import export_onnx, export_tokens
from .language import GPT2LM, BertEncoder, TinyLlama
from .mobile import MobileNetV2, ShuffleNetV2
from .transformer import ConvNeXt, ViT

__all__ = ["INPUT_SHAPE", "INPUT_SHAPES", "REFERENCE_MODELS", "TOKEN_MODELS", "build", "export_onnx", "export_tokens"]

INPUT_SHAPE = (1, 28, 28)

REFERENCE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": VGG,
    "vgg16": lambda: VGG(widths=VGG16_WIDTHS),
    "vgg16s": lambda: VGG(widths=tuple(w if isinstance(w, str) else w // 4 for w in VGG16_WIDTHS)),
    "resnet20": lambda: ResNetCifar(20),
    "resnet56": lambda: ResNetCifar(56),
    "resnet50": ResNet50,
    "bottleneck": BottleneckResNet,
    "densenet": DenseNet,
    "densenet201": lambda: DenseNet(blocks=DENSENET201, growth=32, init=64),
    "mobilenetv2": MobileNetV2,
    "resnext": ResNeXt,
    "seresnet": SEResNet,
    "shufflenetv2": ShuffleNetV2,
    "inception": Inception,
    "vit": ViT,
    "convnext": ConvNeXt,
}

TOKEN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": GPT2LM,
    "bert": BertEncoder,
    "llama": TinyLlama,
}
"""Transformers on token ids ((N, L) int64, vocabulary 64, L up to 64): export them with ``export_tokens``."""

INPUT_SHAPES: dict[str, tuple[int, ...]] = {n: (3, 224, 224) if n == "resnet50" else INPUT_SHAPE for n in REFERENCE_MODELS}
"""One sample's shape per model."""

SMALL_MODELS = tuple(n for n in REFERENCE_MODELS if n not in ("vgg16", "vgg16s", "resnet56", "resnet50", "densenet201"))
"""The models every test runs on (the large ones are for benchmarks)."""


def build(name: str, seed: int = 0) -> nn.Module:
    """Instantiate a reference model with seeded weights and BN statistics."""
    import torch

    factories = {**REFERENCE_MODELS, **TOKEN_MODELS}
    if name not in factories:
        raise KeyError(f"unknown reference model '{name}' (known: {', '.join(factories)})")
    torch.manual_seed(seed)
    model = factories[name]()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None and m.running_var is not None:  # None without track_running_stats
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()
