"""A small CNN image classifier, whose penultimate layer serves as a feature space for FID/KID/PR and
whose softmax scores class accuracy and the Inception-Score-style score (Fashion-MNIST in place of
ImageNet's Inception-v3, as e.g. in Heusel et al. 2017's MNIST experiments).

Stages of ``convs_per_stage`` conv3x3-BN-ReLU layers, the last of each with stride 2 (halving the
resolution, cheaper on the CPU than max-pooling), then a hidden linear layer (the features) and the
classification layer. Input: (B, C, H, W) scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (24, 48)     # one stage per entry, each halving the resolution
    convs_per_stage: int = 2
    feature_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.2


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = []
        in_ch = c.in_channels
        side = c.image_size
        for out_ch in c.channels:
            for i in range(c.convs_per_stage):
                last = i == c.convs_per_stage - 1
                layers.append(conv_bn_relu(in_ch, out_ch, stride=2 if last else 1))
                in_ch = out_ch
            side = (side + 1) // 2                     # a stride-2 conv with padding 1 rounds up
        self.trunk = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Dropout(c.dropout),
                                    nn.Linear(in_ch * side * side, c.feature_dim, bias=False),
                                    nn.BatchNorm1d(c.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.feature_dim, c.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations, (B, feature_dim)."""
        return self.hidden(self.trunk(x))          # (B, C, H, W) -> (B, C', H/2^S, W/2^S) -> (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))         # (B, classes) logits
