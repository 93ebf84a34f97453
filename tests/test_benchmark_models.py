"""The large reference layouts the latency benchmark uses: torchvision's ResNet-50 and MobileNetV2, by structure."""
from __future__ import annotations

import torch
from torch import nn

from graphprune import models
from graphprune.models.cnn import Bottleneck
from graphprune.models.mobile import MobileNetV2


def test_resnet50_has_torchvisions_layout() -> None:
    m = models.build("resnet50")
    assert sum(p.numel() for p in m.parameters()) == 25_557_032  # torchvision.models.resnet50's count
    assert "resnet50" in models.REFERENCE_MODELS and "resnet50" not in models.SMALL_MODELS
    assert models.INPUT_SHAPES["resnet50"] == (3, 224, 224)
    stem = m.stem[0][0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (7, 7) and stem.stride == (2, 2)
    assert isinstance(m.stem[2], nn.MaxPool2d)
    blocks = [b for b in m.blocks if isinstance(b, Bottleneck)]
    outs = [b.body[4][0].out_channels for b in blocks]
    assert [outs.count(c) for c in (256, 512, 1024, 2048)] == [3, 4, 6, 3]
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_mobilenetv2_takes_torchvisions_layout() -> None:
    m = MobileNetV2(3, 1000, MobileNetV2.TORCHVISION, stem=32, stem_stride=2, last=1280, dropout=0.2)
    assert sum(p.numel() for p in m.parameters()) == 3_504_872  # torchvision.models.mobilenet_v2's count
    assert sum(p.numel() for p in MobileNetV2().parameters()) == 19_706  # the reduced reference model is unchanged
