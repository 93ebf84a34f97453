"""Convolutional reference models: plain chains, residual, grouped, squeeze-excite."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["VGG", "BottleneckResNet", "ResNeXt", "ResNet50", "ResNetCifar", "SEResNet"]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class VGG(nn.Module):
    """VGG-style chain of conv-BN-ReLU with max pooling and an MLP head on the flattened map."""

    def __init__(self, widths: tuple = (16, "M", 32, "M", 64, 64, "M"), in_ch: int = 1, classes: int = 10, size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [*conv_bn(c, int(w)), nn.ReLU(inplace=True)]
                c = int(w)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, 512, 512, 512)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), conv_bn(cout, cout))
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (depth 6n+2, stages 16-32-64 times ``width``)."""

    def __init__(self, depth: int = 20, width: int = 1, in_ch: int = 1, classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(conv_bn(in_ch, w[0]), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c = w[0]
        for s, cout in enumerate(w):
            for i in range(n):
                blocks.append(BasicBlock(c, cout, 2 if s > 0 and i == 0 else 1))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int = 1, se: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1), nn.ReLU(inplace=True),
            conv_bn(mid, mid, 3, stride, groups), nn.ReLU(inplace=True),
            conv_bn(mid, cout, 1),
        )
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.se(self.body(x)) + self.short(x))


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, bottleneck MLP, sigmoid, broadcast Mul."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(c // r, 4), 1), nn.ReLU(), nn.Conv2d(max(c // r, 4), c, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class BottleneckResNet(nn.Module):
    """Bottleneck ResNet; ``groups`` > 1 makes it ResNeXt, ``se`` adds squeeze-excite."""

    def __init__(self, blocks: tuple[int, ...] = (1, 1, 1), width: int = 16, groups: int = 1, se: bool = False, in_ch: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_ch, width), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        c = width
        for s, n in enumerate(blocks):
            mid = width * 2**s
            for i in range(n):
                layers.append(Bottleneck(c, mid, mid * 2, 2 if s > 0 and i == 0 else 1, groups, se))
                c = mid * 2
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ResNet50(nn.Module):
    """ResNet-50 in torchvision's layout (v1.5: stride on the 3x3 conv) for 3 x 224 x 224 images.

    Stride-2 7x7 stem and 3x3 max pool, bottleneck stages [3, 4, 6, 3] of widths 64-128-256-512
    (outputs 4x: 256 to 2048), 1x1 conv + BN shortcuts where the shape changes, average pool and a
    2048 -> ``classes`` Linear (1000 by default, like torchvision's).
    """

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), in_ch: int = 3, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_ch, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        c = 64
        for s, n in enumerate(blocks):
            mid = 64 * 2**s
            for i in range(n):
                layers.append(Bottleneck(c, mid, mid * 4, 2 if s > 0 and i == 0 else 1))
                c = mid * 4
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def ResNeXt(**kw: Any) -> BottleneckResNet:
    """ResNeXt-style: bottlenecks with grouped 3x3 convs (cardinality 4)."""
    return BottleneckResNet(width=16, groups=4, **kw)


def SEResNet(**kw: Any) -> BottleneckResNet:
    """Bottleneck ResNet with squeeze-excite (broadcast Mul) in every block."""
    return BottleneckResNet(se=True, **kw)
