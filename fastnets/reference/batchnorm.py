from __future__ import annotations

import torch

from .activation import ACTIVATIONS


def _acc(t):
    return None if t is None else (t.double() if t.dtype == torch.float64 else t.float())


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               activation="identity", negative_slope=0.01):
    """Per-channel normalization over (N, *spatial), then the activation; in training mode
    running_mean / running_var are updated in place with the unbiased batch variance."""
    x = _acc(input)
    dims = [0] + list(range(2, input.dim()))
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training:
        mean = x.mean(dims)
        var = (x - mean.view(shape)).pow(2).mean(dims)
        n = input.numel() // input.shape[1] if input.shape[1] else 0
        if running_mean is not None and n > 0:   # an empty batch leaves them as they are (as torch)
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var.detach() * (n / max(n - 1, 1))).to(running_var.dtype),
                                                    alpha=momentum)
    else:
        mean, var = _acc(running_mean), _acc(running_var)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * _acc(weight).view(shape)
    if bias is not None:
        y = y + _acc(bias).view(shape)
    return ACTIVATIONS[activation](y, negative_slope).to(input.dtype)
