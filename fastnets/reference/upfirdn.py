"""upfirdn2d and filtered_lrelu in plain torch, step by step as StyleGAN2-ADA / StyleGAN3
define them: zero insertion, pad (negative crops), depthwise convolution with the filter
(flipped unless flip_filter; a 1-D filter is separable and runs along both axes, each pass
carrying gain ** 0.5), then keep every down-th sample. Computed in float32 (float64 for
float64 input), the filter included."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t):
    return t.double() if t.dtype == torch.float64 else t.float()


def upfirdn2d(x, f, up=(1, 1), down=(1, 1), padding=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """x (N, C, H, W); f 1-D, 2-D or None; up / down (ux, uy); padding (px0, px1, py0, py1)."""
    N, C, H, W = x.shape
    ux, uy = up
    dx, dy = down
    px0, px1, py0, py1 = padding
    z = _acc(x)
    z = z.reshape(N, C, H, 1, W, 1)
    z = F.pad(z, [0, ux - 1, 0, 0, 0, uy - 1]).reshape(N, C, H * uy, W * ux)
    z = F.pad(z, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    z = z[:, :, max(-py0, 0):z.shape[2] - max(-py1, 0), max(-px0, 0):z.shape[3] - max(-px1, 0)]
    if f is None:
        f = torch.ones(1, 1, dtype=z.dtype, device=z.device)
    f = f.to(z.dtype) * gain ** (f.dim() / 2)
    if not flip_filter:
        f = f.flip(list(range(f.dim())))
    if f.dim() == 2:
        z = F.conv2d(z, f[None, None].expand(C, 1, *f.shape), groups=C)
    else:
        z = F.conv2d(z, f[None, None, None].expand(C, 1, 1, -1), groups=C)
        z = F.conv2d(z, f[None, None, :, None].expand(C, 1, -1, 1), groups=C)
    return z[:, :, ::dy, ::dx].to(x.dtype)


def bias_act_nchw(x, b=None, slope=0.2, gain=1.0, clamp=None):
    """leaky_relu(x + b) * gain, clamped to [-clamp, clamp]; b per channel (dim 1)."""
    z = _acc(x)
    if b is not None:
        z = z + _acc(b).view(1, -1, *([1] * (x.dim() - 2)))
    z = F.leaky_relu(z, slope) * gain
    if clamp is not None:
        z = z.clamp(-clamp, clamp)
    return z.to(x.dtype)


def filtered_lrelu(x, fu=None, fd=None, b=None, up=1, down=1, padding=(0, 0, 0, 0), gain=2 ** 0.5, slope=0.2,
                   clamp=None, flip_filter=False):
    """StyleGAN3's filtered_lrelu: bias, upsample (filter fu, gain up^2), leaky ReLU * gain,
    clamp, downsample (filter fd)."""
    z = _acc(x)
    if b is not None:
        z = z + _acc(b).view(1, -1, 1, 1)
    z = upfirdn2d(z, fu, (up, up), (1, 1), padding, flip_filter, up ** 2)
    z = bias_act_nchw(z, None, slope, gain, clamp)
    return upfirdn2d(z, fd, (1, 1), (down, down), (0, 0, 0, 0), flip_filter).to(x.dtype)
