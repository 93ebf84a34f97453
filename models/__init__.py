"""Reference models (torch, no torchvision) and their ONNX export.

Every model takes a (N, 1, 28, 28) image batch (Fashion-MNIST sized) and
returns 10 logits. ``REFERENCE_MODELS`` maps a name to a factory.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn import VGG, VGG16_WIDTHS, BottleneckResNet, ResNetCifar, ResNeXt, SEResNet
from .concat import DENSENET201, DenseNet, Inception
from .export import export_onnx
from .mobile import MobileNetV2, ShuffleNetV2
from .transformer import ConvNeXt, ViT

__all__ = ["INPUT_SHAPE", "REFERENCE_MODELS", "build", "export_onnx"]

INPUT_SHAPE = (1, 28, 28)

REFERENCE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": VGG,
    "vgg16": lambda: VGG(widths=VGG16_WIDTHS),
    "vgg16s": lambda: VGG(widths=tuple(w if isinstance(w, str) else w // 4 for w in VGG16_WIDTHS)),
    "resnet20": lambda: ResNetCifar(20),
    "resnet56": lambda: ResNetCifar(56),
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

SMALL_MODELS = tuple(n for n in REFERENCE_MODELS if n not in ("vgg16", "vgg16s", "resnet56", "densenet201"))
"""The models every test runs on (the large ones are for benchmarks)."""


def build(name: str, seed: int = 0) -> nn.Module:
    """Instantiate a reference model with seeded weights and BN statistics."""
    import torch

    if name not in REFERENCE_MODELS:
        raise KeyError(f"unknown reference model '{name}' (known: {', '.join(REFERENCE_MODELS)})")
    torch.manual_seed(seed)
    model = REFERENCE_MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None and m.running_var is not None:  # None without track_running_stats
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()
