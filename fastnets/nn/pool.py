"""Pooling modules: subclasses of the torch.nn classes (same constructor, attributes and
state_dict), forward through fastnets' pooling kernels (NCHW or channels_last)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops


class MaxPool2d(nn.MaxPool2d):
    def forward(self, input: Tensor):
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                              self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    def forward(self, input: Tensor) -> Tensor:
        return ops.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                              self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, input: Tensor) -> Tensor:
        return ops.adaptive_avg_pool2d(input, self.output_size)


class AdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    def forward(self, input: Tensor):
        return ops.adaptive_max_pool2d(input, self.output_size, self.return_indices)



for _cls in (MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d):
    _cls.__doc__ = f"``torch.nn.{_cls.__name__}`` on fastnets' pooling kernels (NCHW or channels_last)."


