"""VGG with torchvision's state_dict layout (``features.<i>``, ``classifier.<i>``).

Each conv's ReLU is fused into the conv (or, with batch_norm, into the BN kernel in
training and into the folded conv in eval); the ReLU's slot in ``features`` holds an
nn.Identity so parameter indices, and so checkpoint keys, match torchvision's."""
from __future__ import annotations

from torch import Tensor, nn

from .. import nn as fnn

CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],                       # vgg11
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],              # vgg13
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],  # vgg16
}


def make_features(cfg, batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(fnn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if batch_norm:
            conv = fnn.Conv2d(c, v, kernel_size=3, padding=1)
            bn = fnn.BatchNorm2d(v, activation="relu")
            fnn.FusedConv2d.fuse(conv, bn, "relu")   # eval: one folded conv + ReLU; train: BN + ReLU fused
            layers += [conv, bn, nn.Identity()]
        else:
            layers += [fnn.Conv2d(c, v, kernel_size=3, padding=1, activation="relu"), nn.Identity()]
        c = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """cfg: "A" (vgg11), "B" (vgg13), "D" (vgg16) or a list like CFGS'. pool_size and
    hidden shrink the classifier for small images (torchvision: 7 and 4096)."""

    def __init__(self, cfg="A", batch_norm: bool = False, num_classes: int = 1000, in_channels: int = 3,
                 pool_size: int = 7, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        cfg = CFGS[cfg] if isinstance(cfg, str) else list(cfg)
        self.features = make_features(cfg, batch_norm, in_channels)
        last = [v for v in cfg if v != "M"][-1]
        self.avgpool = fnn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(last * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.avgpool(self.features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def vgg11(**kwargs) -> VGG:
    return VGG("A", **kwargs)


def vgg16(**kwargs) -> VGG:
    return VGG("D", **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    return VGG("A", batch_norm=True, **kwargs)
