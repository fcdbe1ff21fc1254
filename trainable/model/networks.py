"""Architectures by name, for (batch, n_mels, frames) log-mel input in dB.

`build_model(config, n_mels)` is the one way to make a network: the trainable uses it to train,
and the promoted model uses it to rebuild a fold's network from its saved config and state dict.
Every network normalizes its own input (`MelNorm`, a BatchNorm over mel bins), so a saved state
dict is all a predictor needs besides the features.

This module imports only torch: the promoted MLflow model ships it as code. `config` is anything
with the attributes arch, width, depth and dropout (a `TrainConfig`, or a namespace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

N_CLASSES = 50


class MelNorm(nn.Module):
    """Per-mel-bin input normalization, learned from the training data (BatchNorm statistics).

    Takes (B, M, T) or (B, 1, M, T); returns (B, 1, M, T) with each mel bin at zero mean and unit
    variance over the training clips and frames (running statistics at eval time).
    """

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.bn = nn.BatchNorm2d(n_mels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.float()
        # (B, 1, M, T) -> (B, M, 1, T): the mel bins become BatchNorm's channels.
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-dropout-conv3x3-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return torch.relu(out + self.shortcut(x))


class SeedResNet(nn.Module):
    """The notebook's network: 7x7 stride-2 stem (16 ch), 8 residual blocks 16-32-32-32-64-64-64-128
    (stride 2 where the width grows), dropout in each block, global average pool, linear to 50."""

    WIDTHS = (16, 32, 32, 32, 64, 64, 64, 128)

    def __init__(self, n_mels: int, dropout: float, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.norm = MelNorm(n_mels)
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks, cin = [], 16
        for cout in self.WIDTHS:
            blocks.append(ResidualBlock(cin, cout, 2 if cout != cin else 1, dropout))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.norm(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MeanMaxHead(nn.Module):
    """Mean over frequency, then mean + max over time, dropout, linear."""

    def __init__(self, channels: int, dropout: float, n_classes: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=2)  # (B, C, T)
        x = x.mean(dim=2) + x.amax(dim=2)
        return self.fc(self.drop(x))


class CNN(nn.Module):
    """`depth` stages of two 3x3 conv-BN-ReLU (widths w, 2w, 4w, ...), 2x2 average pooling between
    stages, global mean+max pooling, dropout, linear. With depth 4 and w=16 this is the plain
    4-stage CNN (16-32-64-128) the issue quotes for scale."""

    def __init__(self, n_mels: int, width: int, depth: int, dropout: float, n_classes: int = N_CLASSES):
        super().__init__()
        self.norm = MelNorm(n_mels)
        layers: list[nn.Module] = []
        cin = 1
        for i in range(depth):
            cout = width * 2**i
            layers += [conv_bn_relu(cin, cout), conv_bn_relu(cout, cout)]
            if i < depth - 1:
                layers.append(nn.AvgPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = MeanMaxHead(cin, dropout, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.norm(x)))


class ResNet(nn.Module):
    """A 3x3 stem (w channels) then `depth` stages of two residual blocks (widths w, 2w, ...),
    the first block of each later stage with stride 2; mean+max head."""

    def __init__(self, n_mels: int, width: int, depth: int, dropout: float, n_classes: int = N_CLASSES):
        super().__init__()
        self.norm = MelNorm(n_mels)
        self.stem = conv_bn_relu(1, width)
        blocks: list[nn.Module] = []
        cin = width
        for i in range(depth):
            cout = width * 2**i
            blocks += [ResidualBlock(cin, cout, 1 if i == 0 else 2, 0.0), ResidualBlock(cout, cout, 1, 0.0)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = MeanMaxHead(cin, dropout, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(self.norm(x))))


ARCHITECTURES: dict[str, Callable[[Any, int, int], nn.Module]] = {
    "seed_resnet": lambda c, n_mels, k: SeedResNet(n_mels, c.dropout, k),
    "cnn": lambda c, n_mels, k: CNN(n_mels, c.width, c.depth, c.dropout, k),
    "cnn4": lambda c, n_mels, k: CNN(n_mels, c.width, 4, c.dropout, k),
    "resnet": lambda c, n_mels, k: ResNet(n_mels, c.width, c.depth, c.dropout, k),
}


def build_model(config: Any, n_mels: int, n_classes: int = N_CLASSES) -> nn.Module:
    """A freshly initialized network for `config.arch` (see `ARCHITECTURES`)."""
    try:
        make = ARCHITECTURES[config.arch]
    except KeyError:
        raise ValueError(f"unknown arch {config.arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return make(config, n_mels, n_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
