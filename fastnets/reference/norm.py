from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    x = _acc(input)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _acc(weight)
    if bias is not None:
        y = y + _acc(bias)
    return y.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, offset=0.0):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    x = _acc(input)
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * (_acc(weight) + offset)
    return y.to(input.dtype)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    B, C = input.shape[:2]
    x = _acc(input).reshape(B, num_groups, input[0].numel() // num_groups if B else 0)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    y = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    affine_shape = (1, C) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * _acc(weight).reshape(affine_shape)
    if bias is not None:
        y = y + _acc(bias).reshape(affine_shape)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(input.dtype)
