"""Convolutions through torch.nn.functional, computed in float32 (float64 for float64) with
fastnets' fused epilogue: act(conv(x) + bias + residual)."""
from __future__ import annotations

import torch.nn.functional as F

from .activation import ACTIVATIONS


def _acc(t):
    return None if t is None else (t.double() if t.dtype.itemsize == 8 else t.float())


def _epilogue(z, residual, activation, negative_slope, dtype):
    if residual is not None:
        z = z + _acc(residual)
    return ACTIVATIONS[activation](z, negative_slope).to(dtype)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation="identity",
           negative_slope=0.01, residual=None):
    z = F.conv2d(_acc(input), _acc(weight), _acc(bias), stride, padding, dilation, groups)
    return _epilogue(z, residual, activation, negative_slope, input.dtype)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation="identity",
           negative_slope=0.01, residual=None):
    z = F.conv1d(_acc(input), _acc(weight), _acc(bias), stride, padding, dilation, groups)
    return _epilogue(z, residual, activation, negative_slope, input.dtype)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     activation="identity", negative_slope=0.01):
    z = F.conv_transpose2d(_acc(input), _acc(weight), _acc(bias), stride, padding, output_padding, groups, dilation)
    return _epilogue(z, None, activation, negative_slope, input.dtype)
