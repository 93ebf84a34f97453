"""Transformer-style reference models: ViT (multi-head attention) and ConvNeXt."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNeXt", "ViT"]


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        # The head size follows the projection's width, so a pruned head dim needs no attribute edits.
        return x.reshape(*x.shape[:-1], self.heads, proj.out_features // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x), self.q), self._split(self.k(x), self.k), self._split(self.v(x), self.v)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.n1, self.att = nn.LayerNorm(dim), Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    """Tiny ViT: patch embedding, pre-norm blocks, mean pooling."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, mlp: int = 64, patch: int = 7, in_ch: int = 1, size: int = 28, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.mlp(y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Tiny ConvNeXt: patchify stem, depthwise 7x7, channels-last LayerNorm, MLP."""

    def __init__(self, dims: tuple[int, ...] = (16, 32), in_ch: int = 1, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, dims[0], 2, 2)]
        for i, d in enumerate(dims):
            if i:
                layers.append(nn.Conv2d(dims[i - 1], d, 2, 2))
            layers.append(ConvNeXtBlock(d))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dims[-1], classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
