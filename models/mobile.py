"""Mobile reference models: depthwise convs, inverted residuals, channel shuffle."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MobileNetV2", "ShuffleNetV2"]


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return [*mods, nn.ReLU6(inplace=True)] if act else mods


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = _cbr(cin, mid, 1) if expand != 1 else []
        layers += _cbr(mid, mid, 3, stride, groups=mid) + _cbr(mid, cout, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (reduced): depthwise 3x3, inverted residuals, ReLU6."""

    CONFIG = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 2, 1))
    TORCHVISION = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    """torchvision's layout (width 1.0): with ``stem=32, stem_stride=2, last=1280`` at 3 x 224 x 224."""

    def __init__(self, in_ch: int = 1, classes: int = 10, config: tuple[tuple[int, int, int, int], ...] = CONFIG,
                 stem: int = 8, stem_stride: int = 1, last: int = 64, dropout: float = 0.1):
        super().__init__()
        c = stem
        layers = _cbr(in_ch, c, 3, stem_stride)
        for t, cout, n, s in config:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += _cbr(c, last, 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(last, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def channel_shuffle(x: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """Reshape-Transpose-Reshape shuffle of ``channels`` (a Python int: static in exports)."""
    n, _, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


def _conv(m: nn.Module) -> nn.Conv2d:
    """``m``, known to be a conv (the branch is built by ``_cbr``)."""
    if not isinstance(m, nn.Conv2d):
        raise TypeError(f"expected a Conv2d, got {type(m).__name__}")
    return m


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: split (chunk) or two strided branches, concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.cout = cout
        half = cout // 2
        bin_ = cin if stride > 1 else cin // 2
        self.branch = nn.Sequential(
            *_cbr(bin_, half, 1), *_cbr(half, half, 3, stride, groups=half, act=False), *_cbr(half, half, 1)
        )
        self.short = nn.Sequential(*_cbr(cin, cin, 3, stride, groups=cin, act=False), *_cbr(cin, half, 1)) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channel counts come from layer attributes (Python ints: static Split/Reshape in exports)
        # that graphprune updates when it prunes. The shuffle pairs channel i of both halves, so
        # both halves keep as many channels as the branch's last conv produces.
        half = _conv(self.branch[-3]).out_channels
        if self.short is None:
            a, b = x.split([half, _conv(self.branch[0]).in_channels], dim=1)
            out = torch.cat((a, self.branch(b)), 1)
        else:
            out = torch.cat((self.short(x), self.branch(x)), 1)
        return channel_shuffle(out, 2, 2 * half)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (reduced)."""

    def __init__(self, in_ch: int = 1, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers = _cbr(in_ch, widths[0], 3)
        c = widths[0]
        for w in widths[1:]:
            layers += [ShuffleBlock(c, w, 2), ShuffleBlock(w, w, 1)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
