"""ResNet-50 with torchvision's parameter names (own implementation), so checkpoints interchange.

Names: ``conv1``, ``bn1``, ``layer1``..``layer4`` (3, 4, 6, 3 Bottleneck blocks with ``conv1/bn1``
1x1, ``conv2/bn2`` 3x3 carrying the stride (the "v1.5" placement), ``conv3/bn3`` 1x1 expanding x4,
and ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN) on each layer's first block), ``fc``.
Convolutions are bias-free; init is Kaiming-normal (fan_out, ReLU) for convs, BN (1, 0).
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) with identity or projection shortcut; x: [B, C_in, H, W]."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """ResNet-50: images [B, in_chans, H, W] -> ``fc(pooled features)``; features [B, 32·base_width].

    ``num_classes=None`` makes ``fc`` an Identity (the 2048-d pooled features); ``fc`` may also be
    replaced by any head (MoCo's MLP) without changing the backbone's names. ``base_width`` (64 in
    ResNet-50) scales every stage for small test models; names and depths stay the same.
    """

    def __init__(self, num_classes: int | None = 1000, in_chans: int = 3, base_width: int = 64) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width: expected a positive int, got {base_width}")
        w = base_width
        self.conv1 = nn.Conv2d(in_chans, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        ch = w
        layers = []
        for i, (blocks, stride) in enumerate(((3, 1), (4, 2), (6, 2), (3, 2))):
            width = w * 2**i
            mods = [Bottleneck(ch, width, stride)]
            ch = width * Bottleneck.expansion
            mods += [Bottleneck(ch, width) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = ch
        self.fc: nn.Module = nn.Linear(ch, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, in_chans, H, W] -> pooled features [B, feature_dim]."""
        if images.dim() != 4 or images.shape[1] != self.conv1.in_channels:
            raise ValueError(f"images: expected [B, {self.conv1.in_channels}, H, W], got shape {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(images))


def resnet50(num_classes: int | None = 1000, **kwargs: int) -> ResNet50:
    """torchvision-compatible ResNet-50 (``num_classes=None``: 2048-d features)."""
    return ResNet50(num_classes=num_classes, **kwargs)
