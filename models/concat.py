"""Concatenating reference models: DenseNet and an Inception-style block."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DENSENET201", "DenseNet", "Inception"]


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int = 4):
        super().__init__()
        mid = bottleneck * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.body(x)), 1)


class DenseNet(nn.Module):
    """DenseNet-BC; ``blocks=DENSENET201, growth=32, init=64`` is DenseNet-201 depth."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2), growth: int = 8, init: int = 16, in_ch: int = 1, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, init, 3, padding=1, bias=False)]
        c = init
        for b, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if b < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


DENSENET201 = (6, 12, 48, 32)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, b1: int, b3: int, b5: int, bp: int):
        super().__init__()

        def cbr(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.b1 = nn.Sequential(*cbr(cin, b1, 1))
        self.b3 = nn.Sequential(*cbr(cin, b3, 1), *cbr(b3, b3, 3))
        self.b5 = nn.Sequential(*cbr(cin, b5, 1), *cbr(b5, b5, 3), *cbr(b5, b5, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), *cbr(cin, bp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.b1(x), self.b3(x), self.b5(x), self.bp(x)), 1)


class Inception(nn.Module):
    """Two Inception-style blocks: parallel branches joined by Concat."""

    def __init__(self, in_ch: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.a = InceptionBlock(16, 8, 12, 4, 4)
        self.pool = nn.MaxPool2d(2)
        self.b = InceptionBlock(28, 16, 16, 8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.pool(self.a(self.stem(x)))))
