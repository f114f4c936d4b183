"""ResNet-18/34/50/101/152 with torchvision's architecture and state_dict key layout
(``conv1, bn1, layer1.0.conv1, ..., layer4.1.downsample.0, fc``), so torchvision checkpoints
load with ``load_state_dict`` directly. Built from fastnets.nn modules; every conv -> BN
(-> + identity) -> ReLU runs through `conv_bn_act`, so in eval mode each is one conv
kernel with the BN folded in and the residual add and ReLU in its epilogue."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> fnn.Conv2d:
    return fnn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                      dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> fnn.Conv2d:
    return fnn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    return fnn.conv_bn_act(block.downsample[0], block.downsample[1], x, "identity")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = fnn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = fnn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def conv_bn_pairs(self):
        return [("conv1", "bn1"), ("conv2", "bn2")] + ([("downsample.0", "downsample.1")] if self.downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self, x)
        out = fnn.conv_bn_act(self.conv1, self.bn1, x, "relu")
        return fnn.conv_bn_act(self.conv2, self.bn2, out, "relu", residual=identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = fnn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)   # stride here: ResNet v1.5, as torchvision
        self.bn2 = fnn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = fnn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def conv_bn_pairs(self):
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")] + (
            [("downsample.0", "downsample.1")] if self.downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self, x)
        out = fnn.conv_bn_act(self.conv1, self.bn1, x, "relu")
        out = fnn.conv_bn_act(self.conv2, self.bn2, out, "relu")
        return fnn.conv_bn_act(self.conv3, self.bn3, out, "relu", residual=identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's constructor and layout. ``forward_features`` returns the
    pooled (N, 512 * expansion) features before ``fc``."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, in_channels: int = 3):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = fnn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = fnn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = fnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = fnn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       fnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def conv_bn_pairs(self):
        return [("conv1", "bn1")]

    def forward_features(self, x: Tensor) -> Tensor:
        x = fnn.conv_bn_act(self.conv1, self.bn1, x, "relu")
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)
