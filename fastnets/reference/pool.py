"""Pooling through torch.nn.functional, computed in float32 (float64 for float64)."""
from __future__ import annotations

import torch.nn.functional as F


def _acc(t):
    return t.double() if t.dtype.itemsize == 8 else t.float()


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    out = F.max_pool2d(_acc(input), kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    return (out[0].to(input.dtype), out[1]) if return_indices else out.to(input.dtype)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return F.avg_pool2d(_acc(input), kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override).to(input.dtype)


def adaptive_avg_pool2d(input, output_size):
    return F.adaptive_avg_pool2d(_acc(input), output_size).to(input.dtype)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    out = F.adaptive_max_pool2d(_acc(input), output_size, return_indices)
    return (out[0].to(input.dtype), out[1]) if return_indices else out.to(input.dtype)
