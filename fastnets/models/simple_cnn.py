"""SimpleCNN: a small conv-BN-ReLU classifier for digits / CIFAR-sized images."""
from __future__ import annotations

from torch import Tensor, nn

from .. import nn as fnn


class ConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = fnn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = fnn.BatchNorm2d(c_out)

    def conv_bn_pairs(self):
        return [("conv", "bn")]

    def forward(self, x: Tensor) -> Tensor:
        return fnn.conv_bn_act(self.conv, self.bn, x, "relu")


class SimpleCNN(nn.Module):
    """Three conv stages (width, 2*width, 4*width), global average pooling, a linear head.
    Works for any input size >= 4x4."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBNReLU(in_channels, w), ConvBNReLU(w, w), fnn.MaxPool2d(2),
            ConvBNReLU(w, 2 * w), ConvBNReLU(2 * w, 2 * w), fnn.MaxPool2d(2),
            ConvBNReLU(2 * w, 4 * w))
        self.pool = fnn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.forward_features(x)))
