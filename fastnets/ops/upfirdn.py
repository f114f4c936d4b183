"""StyleGAN's resampling ops in Triton, no build step: upfirdn2d (upsample, pad, FIR filter,
downsample) and filtered_lrelu (bias, upsample, leaky ReLU * gain, clamp, downsample).

Conventions are StyleGAN2-ADA's / StyleGAN3's: up / down an int or (x, y); padding an int,
(px, py) or (px0, px1, py0, py1), negative values crop; the filter is 1-D (separable, one
pass per axis, each with gain ** 0.5) or 2-D, flipped unless flip_filter (true
convolution). The kernel (fastnets/kernels/upfirdn.py) takes the correlation filter the host builds
from that once: a 1-D filter becomes its outer product, so one gather pass does both axes.

Backward: upfirdn2d is linear, and its adjoint is another upfirdn2d (up and down swapped,
filter flipped, padding mirrored), launched as the same differentiable op, so second
derivatives come for free. filtered_lrelu keeps the activation's output (the intermediate
the downsampling pass reads anyway) and its backward is two passes: the adjoint of the
downsampling with lrelu' and the clamp mask fused in, then the adjoint of the upsampling.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double

_dispatch.register_op("upfirdn2d", "upsample + pad/crop + FIR filter + downsample (StyleGAN2 upfirdn2d)")
_dispatch.register_op("filtered_lrelu", "bias + upsample + leaky ReLU * gain + clamp + downsample (StyleGAN3)")


def _kernels():
    """fastnets.kernels.upfirdn, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import upfirdn
    return upfirdn


# --- argument handling ---------------------------------------------------------------------------

def _factors(op: str, name: str, v) -> tuple[int, int]:
    """(x, y) scaling factors from an int or a pair."""
    return _checks.ints(op, name, v, 2, 1)


def _padding(op: str, v) -> tuple[int, int, int, int]:
    """(px0, px1, py0, py1) from an int, (px, py) or four ints; negative values crop."""
    vals = [v] if isinstance(v, numbers.Integral) else list(v) if isinstance(v, (list, tuple)) else None
    if vals is None or len(vals) not in (1, 2, 4) or not all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in vals):
        raise ValueError(f"{op}: padding must be an int, (px, py) or (px0, px1, py0, py1), got {v!r}")
    if len(vals) == 1:
        return (int(vals[0]),) * 4
    if len(vals) == 2:
        return int(vals[0]), int(vals[0]), int(vals[1]), int(vals[1])
    return tuple(int(p) for p in vals)


def _filter(op: str, name: str, f: Optional[Tensor], x: Tensor, gain: float, flip_filter: bool) -> Tensor:
    """The (KH, KW) correlation filter the kernel reads, in the accumulator dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if f is None:
        return torch.full((1, 1), gain, dtype=acc, device=x.device)
    if not isinstance(f, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(f).__name__}")
    if f.dim() not in (1, 2):
        raise ValueError(f"{op}: {name} must be 1-D (separable) or 2-D, got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(f.shape)}")
    if not f.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {f.dtype}")
    if f.device != x.device:
        raise ValueError(f"{op}: {name} is on {f.device} but input is on {x.device}")
    if f.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: gradients with respect to {name} are not supported (StyleGAN's filters are "
                         f"fixed buffers); pass {name}.detach()")
    g = f.detach().to(acc)
    g = torch.outer(g, g) * gain if g.dim() == 1 else g * gain
    return (g if flip_filter else g.flip(0, 1)).contiguous()


def _out_size(op: str, size: int, up: int, p0: int, p1: int, k: int, down: int, dim: str) -> int:
    ups = size * up
    if -p0 >= ups or -p1 >= ups or ups + p0 + p1 < k:
        raise ValueError(f"{op}: padding ({p0}, {p1}) along the {dim} leaves nothing for the {k}-tap filter: "
                         f"the upsampled {dim} is {ups}")
    return (ups + p0 + p1 - k) // down + 1


def _input(op: str, x) -> Tensor:
    _checks.tensor(op, "input", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: input must be floating point, got {x.dtype}")
    return x


# --- upfirdn2d: fastnets::upfirdn2d_fwd ----------------------------------------------------------

@torch.library.custom_op("fastnets::upfirdn2d_fwd", mutates_args=())
def _upfirdn2d_fwd(x: Tensor, g: Tensor, up: list[int], down: list[int], pad0: list[int],
                   out_hw: list[int]) -> Tensor:
    """up / down / pad0 / out_hw in (y, x) order; g the correlation filter."""
    return _kernels().upfirdn2d(x.contiguous(), g, tuple(up), tuple(down), tuple(pad0), tuple(out_hw))


@_upfirdn2d_fwd.register_fake
def _(x, g, up, down, pad0, out_hw):
    return x.new_empty((x.shape[0], x.shape[1], *out_hw))


def _adjoint_pad0(g: Tensor, pad0) -> list[int]:
    """Top / left padding of the adjoint pass: the filter's reach mirrored."""
    return [g.shape[0] - 1 - pad0[0], g.shape[1] - 1 - pad0[1]]


def _upfirdn2d_setup(ctx, inputs, output):
    x, g, up, down, pad0, out_hw = inputs
    ctx.save_for_backward(g)
    ctx.args = (up, down, pad0, list(x.shape[2:]))


def _upfirdn2d_backward(ctx, dy):
    (g,) = ctx.saved_tensors
    up, down, pad0, in_hw = ctx.args
    # The adjoint: y[o] = sum_k g[k] u[o D + k - p0]  =>  du[j] = sum_k g'[k] v[j + k - (K - 1 - p0)],
    # v = dy upsampled by D, g' = g flipped; then dx keeps every U-th sample of du.
    dx = torch.ops.fastnets.upfirdn2d_fwd(dy, g.flip(0, 1).contiguous(), down, up, _adjoint_pad0(g, pad0), in_hw)
    return dx, None, None, None, None, None


_upfirdn2d_fwd.register_autograd(_upfirdn2d_backward, setup_context=_upfirdn2d_setup)


def upfirdn2d(input: Tensor, filter: Optional[Tensor] = None, up=1, down=1, padding=0, flip_filter: bool = False,
              gain: float = 1.0) -> Tensor:
    """StyleGAN2's ``upfirdn2d``: upsample by zero insertion, pad (negative crops), FIR filter,
    downsample, in one kernel.

    input (N, C, H, W), float16 / bfloat16 / float32 / float64; filter 1-D (separable) or 2-D
    (or None: no filtering); up / down: int or (x, y); padding: int, (px, py) or
    (px0, px1, py0, py1); gain scales the result. Output height:
    (H * up_y + py0 + py1 - filter_h) // down_y + 1, the width alike. Backward: input (any
    order: the backward is upfirdn2d again). Backends: triton, interpret, torch.
    """
    op = "upfirdn2d"
    x = _input(op, input)
    upx, upy = _factors(op, "up", up)
    downx, downy = _factors(op, "down", down)
    px0, px1, py0, py1 = _padding(op, padding)
    gain = _checks.number(op, "gain", gain)
    g = _filter(op, "filter", filter, x, gain, flip_filter)
    KH, KW = g.shape
    out_hw = [_out_size(op, x.shape[2], upy, py0, py1, KH, downy, "height"),
              _out_size(op, x.shape[3], upx, px0, px1, KW, downx, "width")]
    backend = _dispatch.choose(op, x.device, empty=x.numel() == 0)
    if backend == "torch":
        return reference.upfirdn.upfirdn2d(x, filter, (upx, upy), (downx, downy),
                                           (px0, px1, py0, py1), flip_filter, gain)
    return torch.ops.fastnets.upfirdn2d_fwd(x, g, [upy, upx], [downy, downx], [py0, px0], out_hw)


# --- filtered_lrelu: fastnets::filtered_lrelu_fwd ------------------------------------------------

@torch.library.custom_op("fastnets::filtered_lrelu_fwd", mutates_args=())
def _flrelu_fwd(x: Tensor, gu: Tensor, gd: Tensor, bias: Optional[Tensor], up: int, down: int, pad0: list[int],
                mid_hw: list[int], out_hw: list[int], slope: float, gain: float,
                clamp: float) -> tuple[Tensor, Tensor]:
    k = _kernels()
    mid = k.upfirdn2d(x.contiguous(), gu, (up, up), (1, 1), tuple(pad0), tuple(mid_hw), bias=bias, epilogue="lrelu",
                      slope=slope, gain=gain, clamp=clamp)
    return k.upfirdn2d(mid, gd, (1, 1), (down, down), (0, 0), tuple(out_hw)), mid


@_flrelu_fwd.register_fake
def _(x, gu, gd, bias, up, down, pad0, mid_hw, out_hw, slope, gain, clamp):
    return x.new_empty((x.shape[0], x.shape[1], *out_hw)), x.new_empty((x.shape[0], x.shape[1], *mid_hw))


@torch.library.custom_op("fastnets::filtered_lrelu_bwd", mutates_args=())
def _flrelu_bwd(dy: Tensor, mid: Tensor, gu: Tensor, gd: Tensor, up: int, down: int, pad0: list[int],
                in_hw: list[int], slope: float, gain: float, clamp: float) -> Tensor:
    k = _kernels()
    # The saved activation holds clamp rounded to its dtype (bf16(0.7) < 0.7): the mask
    # compares against that rounded value.
    stored_clamp = float(torch.tensor(clamp, dtype=mid.dtype).double()) if math.isfinite(clamp) else clamp
    dmid = k.upfirdn2d(dy.contiguous(), gd.flip(0, 1).contiguous(), (down, down), (1, 1),
                       tuple(_adjoint_pad0(gd, (0, 0))), tuple(mid.shape[2:]), epilogue="lrelu_bwd", saved=mid,
                       slope=slope, gain=gain, clamp=stored_clamp)
    return k.upfirdn2d(dmid, gu.flip(0, 1).contiguous(), (1, 1), (up, up), tuple(_adjoint_pad0(gu, pad0)),
                       tuple(in_hw))


@_flrelu_bwd.register_fake
def _(dy, mid, gu, gd, up, down, pad0, in_hw, slope, gain, clamp):
    return dy.new_empty((dy.shape[0], dy.shape[1], *in_hw))


def _flrelu_setup(ctx, inputs, output):
    x, gu, gd, bias, up, down, pad0, mid_hw, out_hw, slope, gain, clamp = inputs
    ctx.save_for_backward(x, bias, gu, gd, output[1])
    ctx.args = (up, down, pad0, mid_hw, out_hw, slope, gain, clamp)


def _flrelu_graph(ctx):
    """The forward as differentiable ops of (x, bias), for a create_graph backward."""
    _, _, gu, gd, _ = ctx.saved_tensors
    up, down, pad0, mid_hw, out_hw, slope, gain, clamp = ctx.args

    def fn(x, bias):
        z = x + bias.view(1, -1, 1, 1).to(x.dtype) if bias is not None else x
        mid = torch.ops.fastnets.upfirdn2d_fwd(z, gu, [up, up], [1, 1], pad0, mid_hw)
        mid = (torch.nn.functional.leaky_relu(mid, slope) * gain).clamp(-clamp, clamp)
        return torch.ops.fastnets.upfirdn2d_fwd(mid, gd, [1, 1], [down, down], [0, 0], out_hw)
    return fn


def _flrelu_backward(ctx, dy, _dmid):
    x, bias, gu, gd, mid = ctx.saved_tensors
    if _double.wanted():
        dx, db = _double.reference_grads(_flrelu_graph(ctx), (x, bias), dy)
        return (dx, None, None, db) + (None,) * 8
    up, down, pad0, mid_hw, out_hw, slope, gain, clamp = ctx.args
    dx = torch.ops.fastnets.filtered_lrelu_bwd(dy, mid, gu, gd, up, down, pad0, list(x.shape[2:]), slope, gain, clamp)
    db = dx.sum((0, 2, 3), dtype=torch.float64 if dx.dtype == torch.float64 else torch.float32).to(
        bias.dtype) if bias is not None else None
    return (dx, None, None, db) + (None,) * 8


_flrelu_fwd.register_autograd(_flrelu_backward, setup_context=_flrelu_setup)


def filtered_lrelu(input: Tensor, fu: Optional[Tensor] = None, fd: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, up: int = 1, down: int = 1, padding=0, gain: float = math.sqrt(2),
                   slope: float = 0.2, clamp: Optional[float] = None, flip_filter: bool = False) -> Tensor:
    """StyleGAN3's ``filtered_lrelu``: ``x + bias`` upsampled by ``up`` with filter fu (gain
    up**2, padding as upfirdn2d's), ``leaky_relu(., slope) * gain`` clamped to ±clamp, then
    filtered with fd and downsampled by ``down``.

    Two kernel passes: the activation is the epilogue of the upsampling pass, and its output
    (the one intermediate, kept for the backward) is read by the downsampling pass. input
    (N, C, H, W); bias (C,); fu / fd 1-D or 2-D or None; up / down ints; gain > 0, slope >= 0.
    Backward: input and bias. Backends: triton, interpret, torch.
    """
    op = "filtered_lrelu"
    x = _input(op, input)
    C = x.shape[1]
    bias = _checks.optional_param(op, "bias", bias, like=x, shape=(C,))
    for name, v in (("up", up), ("down", down)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    up, down = int(up), int(down)
    px0, px1, py0, py1 = _padding(op, padding)
    gain = _checks.number(op, "gain", gain)
    slope = _checks.number(op, "slope", slope, min_value=0.0)
    if gain <= 0:
        raise ValueError(f"{op}: gain must be positive, got {gain}")
    if clamp is not None:
        clamp = _checks.number(op, "clamp", clamp, min_value=0.0)
    gu = _filter(op, "fu", fu, x, float(up * up), flip_filter)
    gd = _filter(op, "fd", fd, x, 1.0, flip_filter)
    mid_hw = [_out_size(op, x.shape[2], up, py0, py1, gu.shape[0], 1, "height"),
              _out_size(op, x.shape[3], up, px0, px1, gu.shape[1], 1, "width")]
    out_hw = [_out_size(op, mid_hw[0], 1, 0, 0, gd.shape[0], down, "height"),
              _out_size(op, mid_hw[1], 1, 0, 0, gd.shape[1], down, "width")]
    backend = _dispatch.choose(op, x.device, empty=x.numel() == 0)
    if backend == "torch":
        return reference.upfirdn.filtered_lrelu(x, fu, fd, bias, up, down, (px0, px1, py0, py1), gain, slope, clamp,
                                                flip_filter)
    y, _ = torch.ops.fastnets.filtered_lrelu_fwd(x, gu, gd, bias, up, down, [py0, px0], mid_hw, out_hw, slope, gain,
                                                 math.inf if clamp is None else clamp)
    return y
