"""2-D pooling with torch.nn.functional's signatures: max_pool2d, avg_pool2d,
adaptive_avg_pool2d, adaptive_max_pool2d. One forward and one backward kernel
(fastnets/kernels/pool.py) serve all four; the backward gathers through the saved argmax indices
(max) or recomputes each window's divisor (avg), deterministically."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .. import reference as F
from . import _checks, _double


def _pool_kernels():
    """fastnets.kernels.pool, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import pool
    return pool

_dispatch.register_op("max_pool2d", "max pooling (kernel, stride, padding, dilation, ceil_mode, return_indices)")
_dispatch.register_op("avg_pool2d", "average pooling (count_include_pad, ceil_mode, divisor_override)")
_dispatch.register_op("adaptive_avg_pool2d", "adaptive average pooling, incl. global pooling")
_dispatch.register_op("adaptive_max_pool2d", "adaptive max pooling, incl. global pooling")


@torch.library.custom_op("fastnets::pool2d_fwd", mutates_args=())
def _pool_fwd(x: Tensor, out_hw: list[int], kernel: list[int], stride: list[int], padding: list[int],
              dilation: list[int], is_max: bool, adaptive: bool, count_include_pad: bool, divisor: int,
              store_idx: bool) -> tuple[Tensor, Tensor]:
    y, idx = _pool_kernels().pool2d_fwd(x, tuple(out_hw), tuple(kernel), tuple(stride), tuple(padding),
                                        tuple(dilation), is_max=is_max, adaptive=adaptive,
                                        count_include_pad=count_include_pad, divisor_override=divisor or None,
                                        store_idx=store_idx)
    return y, (idx if idx is not None else x.new_empty((0,), dtype=torch.int64))


@_pool_fwd.register_fake
def _(x, out_hw, kernel, stride, padding, dilation, is_max, adaptive, count_include_pad, divisor, store_idx):
    fmt = _checks.memory_format(x)
    shape = (*x.shape[:2], *out_hw)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = (torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=fmt) if store_idx
           else x.new_empty((0,), dtype=torch.int64))
    return y, idx


@torch.library.custom_op("fastnets::pool2d_bwd", mutates_args=())
def _pool_bwd(dy: Tensor, idx: Tensor, x_shape: list[int], x_channels_last: bool, kernel: list[int],
              stride: list[int], padding: list[int], dilation: list[int], is_max: bool, adaptive: bool,
              count_include_pad: bool, divisor: int) -> Tensor:
    return _pool_kernels().pool2d_bwd(dy, idx if is_max else None, tuple(x_shape), x_channels_last, tuple(kernel),
                                      tuple(stride), tuple(padding), tuple(dilation), is_max=is_max,
                                      adaptive=adaptive, count_include_pad=count_include_pad,
                                      divisor_override=divisor or None)


@_pool_bwd.register_fake
def _(dy, idx, x_shape, x_channels_last, kernel, stride, padding, dilation, is_max, adaptive, count_include_pad,
      divisor):
    fmt = torch.channels_last if x_channels_last else torch.contiguous_format
    return torch.empty(x_shape, dtype=dy.dtype, device=dy.device, memory_format=fmt)


def _setup(ctx, inputs, output):
    x, out_hw, kernel, stride, padding, dilation, is_max, adaptive, count_include_pad, divisor, store_idx = inputs
    ctx.save_for_backward(output[1])
    channels_last = _checks.memory_format(x) == torch.channels_last
    ctx.args = (list(x.shape), channels_last, kernel, stride, padding, dilation, is_max, adaptive,
                count_include_pad, divisor)


class _PoolBackward(torch.autograd.Function):
    """The pool backward as a differentiable function of dy, for create_graph=True. It is
    linear in dy, and its adjoint is the pool itself: for average pooling the forward kernel
    (same windows, same divisors), for max pooling a gather at the saved argmax. Its
    derivative in x is zero (the argmax is piecewise constant), as torch's is."""

    @staticmethod
    def forward(ctx, dy, idx, args):
        ctx.save_for_backward(idx)
        ctx.args, ctx.out_hw = args, list(dy.shape[2:])
        return torch.ops.fastnets.pool2d_bwd(dy, idx, *args)

    @staticmethod
    def backward(ctx, ddx):
        (idx,) = ctx.saved_tensors
        x_shape, channels_last, kernel, stride, padding, dilation, is_max, adaptive, count_include_pad, divisor = \
            ctx.args
        N, C = x_shape[:2]
        out_hw = ctx.out_hw
        if is_max:
            flat = lambda t: t.reshape(N, C, -1)  # noqa: E731  (indices are flat h * W + w per plane)
            ddy = flat(ddx.contiguous()).gather(2, flat(idx.contiguous())).view(N, C, *out_hw)
        else:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            ddy, _ = torch.ops.fastnets.pool2d_fwd(ddx.contiguous(memory_format=fmt), out_hw, kernel, stride,
                                                   padding, dilation, False, adaptive, count_include_pad, divisor,
                                                   False)
        return ddy, None, None


def _backward(ctx, dy, _didx):
    (idx,) = ctx.saved_tensors
    if _double.wanted():
        dx = _PoolBackward.apply(dy, idx, ctx.args)
    else:
        dx = torch.ops.fastnets.pool2d_bwd(dy, idx, *ctx.args)
    return (dx,) + (None,) * 10


_pool_fwd.register_autograd(_backward, setup_context=_setup)


# --- argument handling --------------------------------------------------------------------------

def _input(op: str, input, *, empty_channels: bool = False) -> tuple[Tensor, bool]:
    """(4-D input, whether it was unbatched). Empty dims as torch allows them: a batch of 0
    everywhere, 0 channels for adaptive_avg_pool2d only (torch raises for the others)."""
    _checks.tensor(op, "input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(input.shape)}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if (x.shape[1] == 0 and not empty_channels) or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: input must have non-zero {'spatial size' if empty_channels else 'channels and spatial size'}"
                         f" (as torch), got shape {tuple(input.shape)}")
    return x, unbatched


def _out_size(op, size, k, s, p, d, ceil_mode, dim):
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window must start inside the input or its left padding
    if out < 1:
        raise ValueError(f"{op}: output {dim} would be {out} (input {dim} {size}, kernel {k}, stride {s}, "
                         f"padding {p}, dilation {d})")
    return out


def _fixed_geometry(op, x, kernel_size, stride, padding, dilation, ceil_mode, half_of_effective: bool):
    kernel = _checks.ints(op, "kernel_size", kernel_size, 2, 1)
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else \
        _checks.ints(op, "stride", stride, 2, 1)
    padding = _checks.ints(op, "padding", padding, 2, 0)
    dilation = _checks.ints(op, "dilation", dilation, 2, 1)
    for i in range(2):
        eff = (kernel[i] - 1) * dilation[i] + 1 if half_of_effective else kernel[i]
        if padding[i] > eff // 2:
            raise ValueError(f"{op}: padding {padding} must be at most half of the "
                             f"{'effective ' if half_of_effective else ''}kernel size {kernel}")
    out = tuple(_out_size(op, x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], bool(ceil_mode),
                          ("height", "width")[i]) for i in range(2))
    return kernel, stride, padding, dilation, out


def _adaptive_out(op, x, output_size) -> tuple[int, int]:
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    if not (isinstance(output_size, (tuple, list)) and len(output_size) == 2):
        raise TypeError(f"{op}: output_size must be an int or a pair of ints (None keeps the input size), "
                        f"got {output_size!r}")
    out = tuple(x.shape[2 + i] if output_size[i] is None else output_size[i] for i in range(2))
    if not all(isinstance(o, numbers.Integral) and not isinstance(o, bool) and o >= 0 for o in out):
        raise ValueError(f"{op}: output_size must be non-negative ints, got {output_size!r}")
    return tuple(int(o) for o in out)


def _run(op, x, unbatched, out_hw, kernel, stride, padding, dilation, *, is_max, adaptive, count_include_pad=True,
         divisor=0, return_indices=False):
    store_idx = is_max and (return_indices or (torch.is_grad_enabled() and x.requires_grad))
    xin = x.contiguous(memory_format=_checks.memory_format(x))
    y, idx = torch.ops.fastnets.pool2d_fwd(xin, list(out_hw), list(kernel), list(stride), list(padding),
                                           list(dilation), is_max, adaptive, count_include_pad, divisor, store_idx)
    if unbatched:
        y, idx = y.squeeze(0), (idx.squeeze(0) if store_idx else idx)
    return (y, idx) if return_indices else y


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """``torch.nn.functional.max_pool2d``: NCHW or channels_last (kept), any float dtype.
    Indices are flat (h * W + w) per plane, int64, as torch returns them."""
    op = "max_pool2d"
    x, unbatched = _input(op, input)
    kernel, stride_, pad, dil, out = _fixed_geometry(op, x, kernel_size, stride, padding, dilation, ceil_mode, True)
    if _dispatch.choose(op, x.device, empty=x.numel() == 0) == "torch":
        return F.max_pool2d(input, kernel, stride_, pad, dil, ceil_mode, return_indices)
    return _run(op, x, unbatched, out, kernel, stride_, pad, dil, is_max=True, adaptive=False,
                return_indices=return_indices)


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: Optional[int] = None) -> Tensor:
    """``torch.nn.functional.avg_pool2d``: NCHW or channels_last (kept), any float dtype."""
    op = "avg_pool2d"
    x, unbatched = _input(op, input)
    kernel, stride_, pad, dil, out = _fixed_geometry(op, x, kernel_size, stride, padding, 1, ceil_mode, False)
    if divisor_override is not None and (isinstance(divisor_override, bool) or
                                         not isinstance(divisor_override, numbers.Integral) or divisor_override == 0):
        raise ValueError(f"{op}: divisor_override must be a non-zero int or None, got {divisor_override!r}")
    if _dispatch.choose(op, x.device, empty=x.numel() == 0) == "torch":
        return F.avg_pool2d(input, kernel, stride_, pad, ceil_mode, count_include_pad, divisor_override)
    return _run(op, x, unbatched, out, kernel, stride_, pad, dil, is_max=False, adaptive=False,
                count_include_pad=bool(count_include_pad), divisor=int(divisor_override or 0))


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d`` (output_size 1 is global average pooling)."""
    op = "adaptive_avg_pool2d"
    x, unbatched = _input(op, input, empty_channels=True)
    out = _adaptive_out(op, x, output_size)
    if _dispatch.choose(op, x.device, empty=x.numel() == 0 or 0 in out) == "torch":
        return F.adaptive_avg_pool2d(input, out)
    return _run(op, x, unbatched, out, (1, 1), (1, 1), (0, 0), (1, 1), is_max=False, adaptive=True)


def adaptive_max_pool2d(input: Tensor, output_size, return_indices: bool = False):
    """``torch.nn.functional.adaptive_max_pool2d``."""
    op = "adaptive_max_pool2d"
    x, unbatched = _input(op, input)
    out = _adaptive_out(op, x, output_size)
    if _dispatch.choose(op, x.device, empty=x.numel() == 0 or 0 in out) == "torch":
        return F.adaptive_max_pool2d(input, out, return_indices)
    return _run(op, x, unbatched, out, (1, 1), (1, 1), (0, 0), (1, 1), is_max=True, adaptive=True,
                return_indices=return_indices)
