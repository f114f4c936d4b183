"""conv2d, conv1d and conv_transpose2d: torch.nn.functional's signatures, implicit-GEMM Triton
kernels, and a fused epilogue ``act(conv(x) + bias + residual)``.

One kernel set serves all three (fastnets/kernels/conv.py):
- conv2d:           forward = fwd kernel; backward dx = dgrad kernel, dw (+ dbias) = wgrad kernel.
- conv_transpose2d: the adjoint of conv2d, so forward = dgrad kernel (with the bias and
  activation epilogue); backward dx = fwd kernel, dw = wgrad kernel with dy and x swapped.
- conv1d:           conv2d on a (N, C, 1, L) view.

The activation's backward needs the pre-activation z only through act'(z). For identity,
relu and leaky_relu (slope >= 0) the sign of the output y decides it, so y is saved;
otherwise the forward kernel also writes z (one extra store) and z is saved.
Under autocast the convolution runs in the autocast dtype, as torch's convolutions do.

Double backward (create_graph=True, gradient penalties): the backward is then built from
differentiable ops -- dx of conv2d is fastnets' conv_transpose2d of dz and dx of
conv_transpose2d is fastnets' conv2d, dw is torch's conv weight-gradient (aten's
convolution_backward, which has its own double backward) and act'(z) is a constant mask of
the output's sign (identity / relu / leaky_relu) or the activation's derivative at a
recomputed z (the others; bias and residual are saved for that recompute only).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double

_dispatch.register_op("conv2d", "implicit-GEMM conv2d (stride, padding incl. 'same', dilation, groups) with a "
                                "fused bias + activation + residual epilogue")
_dispatch.register_op("conv1d", "conv1d through the conv2d kernels")
_dispatch.register_op("conv_transpose2d", "conv_transpose2d (stride, padding, output_padding, groups, "
                                          "dilation) with a fused bias + activation epilogue")

from .activation import ACTIVATIONS  # noqa: E402


def _activation_kernels():
    """fastnets.kernels.activation, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import activation
    return activation


def _conv_kernels():
    """fastnets.kernels.conv, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import conv
    return conv


# --- argument handling -----------------------------------------------------------------------

def _check_common(op: str, input: Tensor, weight: Tensor, bias, groups, nd: int):
    _checks.tensor(op, "input", input)
    _checks.tensor(op, "weight", weight)
    if input.dim() not in (nd + 1, nd + 2):
        raise ValueError(f"{op}: input must be {nd + 2}-D (batched) or {nd + 1}-D (unbatched), "
                         f"got shape {tuple(input.shape)}")
    if weight.dim() != nd + 2:
        raise ValueError(f"{op}: weight must be {nd + 2}-D, got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} does not match input dtype {input.dtype}")


def _activation(op: str, activation: str, negative_slope) -> tuple[str, float]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation, _checks.number(op, "negative_slope", negative_slope)


def _z_needed(activation: str, slope: float) -> bool:
    """True when act'(z) cannot be read off the output's sign."""
    return not (activation in ("identity", "relu") or (activation == "leaky_relu" and slope > 0))


def _empty_like_format(x: Tensor, shape, dtype=None) -> Tensor:
    fmt = _checks.memory_format(x)
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _act_backward(dy: Tensor, saved: Tensor, activation: str, slope: float) -> Tensor:
    """dy * act'(z), with `saved` = z or y (see module docstring), in saved's layout."""
    fmt = _checks.memory_format(saved)
    dy = dy.contiguous(memory_format=fmt)
    if fmt == torch.channels_last:
        dy_f, s_f = dy.permute(0, 2, 3, 1), saved.permute(0, 2, 3, 1)
    else:
        dy_f, s_f = dy, saved
    dz, _ = _activation_kernels().bias_act_bwd(dy_f.reshape(1, -1), s_f.reshape(1, -1), None, activation, slope)
    dz = dz.view(dy_f.shape)
    return dz.permute(0, 3, 1, 2) if fmt == torch.channels_last else dz


def _act_backward_graph(dy: Tensor, saved: Tensor, activation: str, slope: float, recompute_z) -> Tensor:
    """dy * act'(z) as a differentiable graph (double backward). recompute_z() gives z with its
    graph to the forward's inputs; only called when act' is not a mask of the output's sign."""
    if activation == "identity":
        return dy
    if not _z_needed(activation, slope):
        # relu / leaky_relu: act'' = 0, and y > 0 exactly where z > 0 (act'(0) = 0 or slope).
        neg = 0.0 if activation == "relu" else slope
        return dy * torch.where(saved > 0, 1.0, neg).to(dy.dtype)
    act = reference.activation.ACTIVATIONS[activation]
    (dz,) = _double.reference_grads(lambda z: act(z, slope), (recompute_z(),), dy)
    return dz


# --- conv2d: fastnets::conv2d_fwd / fastnets::conv2d_bwd -------------------------------------

@torch.library.custom_op("fastnets::conv2d_fwd", mutates_args=())
def _conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
                padding: list[int], dilation: list[int], groups: int, out_hw: list[int], activation: str,
                slope: float, save_z: bool) -> tuple[Tensor, Tensor]:
    return _conv_kernels().conv2d_fwd(x, weight, bias, residual, tuple(stride), tuple(padding), tuple(dilation),
                                      groups, tuple(out_hw), activation, slope, save_z)


@_conv2d_fwd.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, out_hw, activation, slope, save_z):
    shape = (x.shape[0], weight.shape[0], *out_hw)
    return _empty_like_format(x, shape), (_empty_like_format(x, shape) if save_z else x.new_empty((0,)))


@torch.library.custom_op("fastnets::conv2d_bwd", mutates_args=())
def _conv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, stride: list[int],
                padding: list[int], dilation: list[int], groups: int, activation: str, slope: float,
                need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    conv = _conv_kernels()
    dz = dy if activation == "identity" else _act_backward(dy, saved, activation, slope)
    # Custom-op outputs may not alias each other: a fresh empty for each absent gradient.
    none = lambda: x.new_empty((0,))  # noqa: E731
    dx = (conv.conv2d_dgrad(dz, weight, tuple(x.shape), stride, padding, dilation, groups, like=x)[0]
          if need_dx else none())
    dw, db = none(), none()
    if need_dw or has_bias:
        dw, db = conv.conv2d_wgrad(dz, x, tuple(weight.shape), stride, padding, dilation, groups, has_bias,
                                   weight.dtype, _checks.memory_format(weight))
        db = db if db is not None else none()
    # dz doubles as the residual's gradient; returned only when it is not dy itself
    # (custom-op outputs may not alias inputs).
    return dx, dw, db, (dz if activation != "identity" else x.new_empty((0,)))


@_conv2d_bwd.register_fake
def _(dy, x, weight, saved, has_bias, stride, padding, dilation, groups, activation, slope, need_dx, need_dw):
    none = lambda: x.new_empty((0,))  # noqa: E731
    return (_empty_like_format(x, x.shape) if need_dx else none(),
            torch.empty_like(weight) if (need_dw or has_bias) else none(),
            weight.new_empty((weight.shape[0],)) if has_bias else none(),
            _empty_like_format(dy, dy.shape) if activation != "identity" else none())


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, out_hw, activation, slope, save_z = inputs
    y, z = output
    # bias and residual only feed a double backward's recompute of z (see module docstring).
    # The output is saved only when the activation's derivative reads it (relu / leaky_relu:
    # its sign): a model may then change it in place (x += identity in torchvision's blocks),
    # as it may torch's own conv output, whose backward never reads it either.
    saved = z if save_z else (y if activation != "identity" else y.new_empty((0,)))
    ctx.save_for_backward(x, weight, saved, bias if save_z else None, residual if save_z else None)
    ctx.args = (bias is not None, stride, padding, dilation, groups, activation, slope)
    ctx.has_res = residual is not None


def _conv2d_backward_graph(ctx, dy):
    """The backward as differentiable ops, for create_graph=True."""
    x, weight, saved, bias, residual = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, activation, slope = ctx.args
    out_hw = list(dy.shape[2:])
    dz = _act_backward_graph(dy, saved, activation, slope, lambda: torch.ops.fastnets.conv2d_fwd(
        x, weight, bias, residual, stride, padding, dilation, groups, out_hw, "identity", 0.0, False)[0])
    # Rows / columns the convolution reads past the input: hi = last window end - H - lo
    # (negative when the floor leaves input rows unread, > lo for 'same' with an even kernel).
    H, W = x.shape[2:]
    span = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    hi = [(out_hw[i] - 1) * stride[i] + span[i] - (H, W)[i] - padding[i] for i in range(2)]
    out_pad = [padding[i] - hi[i] for i in range(2)]
    symmetric = all(0 <= out_pad[i] < max(stride[i], dilation[i]) for i in range(2))
    dx = dw = None
    if ctx.needs_input_grad[0]:
        if symmetric:
            dx = conv_transpose2d(dz, weight, None, stride, padding, out_pad, groups, dilation)
        else:   # transpose into the padded frame, then crop (or zero-extend) to x's
            dx = torch.nn.functional.pad(conv_transpose2d(dz, weight, None, stride, 0, 0, groups, dilation),
                                         (-padding[1], -hi[1], -padding[0], -hi[0]))
    if ctx.needs_input_grad[1]:
        xp, pad = (x, padding) if symmetric else (
            torch.nn.functional.pad(x, (padding[1], hi[1], padding[0], hi[0])), [0, 0])
        dw = torch.nn.grad.conv2d_weight(xp, weight.shape, dz, stride, pad, dilation, groups)
    db = dz.sum((0, 2, 3)) if has_bias else None
    return (dx, dw, db, dz if ctx.has_res else None) + (None,) * 8


def _conv2d_backward(ctx, dy, _dz):
    if _double.wanted():
        return _conv2d_backward_graph(ctx, dy)
    x, weight, saved, _, _ = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, activation, slope = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw, db, dz = torch.ops.fastnets.conv2d_bwd(dy, x, weight, saved, has_bias, stride, padding, dilation,
                                                   groups, activation, slope, need_dx, need_dw)
    dres = (dy if activation == "identity" else dz) if ctx.has_res else None
    return (dx if need_dx else None, dw if need_dw else None, db if has_bias else None, dres,
            None, None, None, None, None, None, None, None)


_conv2d_fwd.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


def _conv2d_geometry(op, x, weight, stride, padding, dilation):
    """(stride, top/left padding, dilation, (P, Q)) with torch's rules and error messages."""
    stride = _checks.ints(op, "stride", stride, 2, 1)
    dilation = _checks.ints(op, "dilation", dilation, 2, 1)
    KH, KW = weight.shape[-2:]
    H, W = x.shape[-2:]
    if isinstance(padding, str):
        if padding == "valid":
            pad_lo, pad_total = (0, 0), (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride})")
            pad_total = (dilation[0] * (KH - 1), dilation[1] * (KW - 1))
            # torch puts the odd extra pixel at the bottom / right.
            pad_lo = (pad_total[0] // 2, pad_total[1] // 2)
        else:
            raise ValueError(f"{op}: padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    else:
        pad_lo = _checks.ints(op, "padding", padding, 2, 0)
        pad_total = (2 * pad_lo[0], 2 * pad_lo[1])
    out = []
    for size, k, p, d, s, dim in ((H, KH, pad_total[0], dilation[0], stride[0], "height"),
                                  (W, KW, pad_total[1], dilation[1], stride[1], "width")):
        span = d * (k - 1) + 1
        if size + p < span:
            raise ValueError(f"{op}: kernel {dim} with dilation ({span}) is larger than the padded input {dim} "
                             f"({size + p}); input shape {tuple(x.shape)}, weight shape {tuple(weight.shape)}")
        out.append((size + p - span) // s + 1)
    return stride, pad_lo, dilation, tuple(out)


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, activation: str = "identity", negative_slope: float = 0.01,
           residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv2d(input, weight, bias) + residual)``, like ``torch.nn.functional.conv2d``.

    input (N, C, H, W) or (C, H, W), NCHW or channels_last (the output keeps the layout);
    weight (K, C/groups, kH, kW); bias (K,). stride / padding / dilation: int or pair;
    padding may be "valid" or "same". activation (fastnets extra): identity, relu,
    leaky_relu (negative_slope), gelu, gelu_tanh, silu, tanh, sigmoid. residual: a tensor of
    the output's shape added before the activation (a ResNet block's skip connection).
    Backward: input, weight, bias and residual. Dtypes: float16, bfloat16, float32 (TF32 on CUDA tensors
    when torch.backends.cudnn.allow_tf32 says so; never on CPU tensors, as torch), float64. Backends: triton, interpret, torch.
    """
    op = "conv2d"
    _check_common(op, input, weight, bias, groups, 2)
    activation, slope = _activation(op, activation, negative_slope)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if residual is not None:
        _checks.tensor(op, "residual", residual)
        residual = residual.unsqueeze(0) if unbatched and residual.dim() == 3 else residual
    C, K = x.shape[1], weight.shape[0]
    if C != weight.shape[1] * groups:
        raise ValueError(f"{op}: input has {C} channels but weight expects {weight.shape[1]} x groups={groups} "
                         f"= {weight.shape[1] * groups}")
    if K % groups:
        raise ValueError(f"{op}: out_channels (weight.shape[0] = {K}) must be divisible by groups={groups}")
    bias = _checks.optional_param(op, "bias", bias, like=x, shape=(K,))
    stride_, pad_lo, dilation_, out_hw = _conv2d_geometry(op, x, weight, stride, padding, dilation)
    out_shape = (x.shape[0], K, *out_hw)
    if residual is not None:
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"{op}: residual must match input's dtype and device ({x.dtype}, {x.device}), "
                            f"got ({residual.dtype}, {residual.device})")
    x, weight, bias, residual = _checks.autocast(x, weight, bias, residual)
    backend = _dispatch.choose(op, x.device, empty=x.numel() == 0 or 0 in out_shape)
    if backend == "torch":
        y = reference.conv2d(x, weight, bias, stride_, padding if isinstance(padding, str) else pad_lo, dilation_,
                             groups, activation=activation, negative_slope=slope, residual=residual)
    else:
        save_z = _z_needed(activation, slope) and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual))
        y, _ = torch.ops.fastnets.conv2d_fwd(x, weight, bias, residual, list(stride_), list(pad_lo),
                                             list(dilation_), groups, list(out_hw), activation, slope, save_z)
    return y.squeeze(0) if unbatched else y


def conv1d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, activation: str = "identity", negative_slope: float = 0.01,
           residual: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.conv1d`` (input (N, C, L) or (C, L); weight (K, C/groups, k)) with
    conv2d's epilogue options; runs as conv2d on a (N, C, 1, L) view."""
    op = "conv1d"
    _check_common(op, input, weight, bias, groups, 1)
    unbatched = input.dim() == 2
    x = input.unsqueeze(0) if unbatched else input
    res = residual
    if res is not None:
        _checks.tensor(op, "residual", res)
        res = res.unsqueeze(0) if unbatched and res.dim() == 2 else res
        res = res.unsqueeze(2)
    one = lambda v, name: (1, _checks.ints(op, name, v, 1, 0)[0])  # noqa: E731
    stride2, dil2 = one(stride, "stride"), one(dilation, "dilation")
    pad2 = padding if isinstance(padding, str) else (0, _checks.ints(op, "padding", padding, 1, 0)[0])
    backend = _dispatch.choose(op, x.device)
    if backend == "torch":
        y = reference.conv1d(x, weight, bias, stride2[1], padding if isinstance(padding, str) else pad2[1],
                             dil2[1], groups, activation=activation, negative_slope=negative_slope,
                             residual=residual.unsqueeze(0) if residual is not None and unbatched else residual)
        return y.squeeze(0) if unbatched else y
    with _dispatch.backend(backend):
        y = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, stride2, pad2, dil2, groups, activation=activation,
                   negative_slope=negative_slope, residual=res).squeeze(2)
    return y.squeeze(0) if unbatched else y


# --- conv_transpose2d: fastnets::conv_transpose2d_fwd / _bwd ----------------------------------

@torch.library.custom_op("fastnets::conv_transpose2d_fwd", mutates_args=())
def _convt_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, out_hw: list[int], activation: str, slope: float,
               save_z: bool) -> tuple[Tensor, Tensor]:
    N = x.shape[0]
    C_out = weight.shape[1] * groups
    return _conv_kernels().conv2d_dgrad(x, weight, (N, C_out, *out_hw), tuple(stride), tuple(padding),
                                        tuple(dilation), groups, bias=bias, activation=activation, slope=slope,
                                        store_z=save_z, like=x)


@_convt_fwd.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, out_hw, activation, slope, save_z):
    shape = (x.shape[0], weight.shape[1] * groups, *out_hw)
    return _empty_like_format(x, shape), (_empty_like_format(x, shape) if save_z else x.new_empty((0,)))


@torch.library.custom_op("fastnets::conv_transpose2d_bwd", mutates_args=())
def _convt_bwd(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, stride: list[int],
               padding: list[int], dilation: list[int], groups: int, activation: str, slope: float,
               need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    conv = _conv_kernels()
    dz = dy if activation == "identity" else _act_backward(dy, saved, activation, slope)
    none = lambda: x.new_empty((0,))  # noqa: E731
    # The adjoint of the adjoint: dx is conv2d(dz, weight) sampled at x's size.
    dx = (conv.conv2d_fwd(dz, weight, None, None, tuple(stride), tuple(padding), tuple(dilation), groups,
                          tuple(x.shape[2:]), "identity", 0.0, False)[0] if need_dx else none())
    # <dL/dy, T(x; w)> = <conv(dL/dy; w), x>: wgrad with x as the "output gradient".
    dw = (conv.conv2d_wgrad(x, dz, tuple(weight.shape), stride, padding, dilation, groups, False, weight.dtype,
                            _checks.memory_format(weight))[0] if need_dw else none())
    db = dz.sum(dim=(0, 2, 3), dtype=torch.float64 if dz.dtype == torch.float64 else torch.float32).to(
        weight.dtype) if has_bias else none()
    return dx, dw, db


@_convt_bwd.register_fake
def _(dy, x, weight, saved, has_bias, stride, padding, dilation, groups, activation, slope, need_dx, need_dw):
    none = lambda: x.new_empty((0,))  # noqa: E731
    return (_empty_like_format(x, x.shape) if need_dx else none(), torch.empty_like(weight) if need_dw else none(),
            weight.new_empty((dy.shape[1],)) if has_bias else none())


def _convt_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, out_hw, activation, slope, save_z = inputs
    y, z = output
    saved = z if save_z else (y if activation != "identity" else y.new_empty((0,)))   # as conv2d's
    ctx.save_for_backward(x, weight, saved, bias if save_z else None)
    ctx.args = (bias is not None, stride, padding, dilation, groups, activation, slope)


def _convt_backward_graph(ctx, dy):
    """The backward as differentiable ops, for create_graph=True: the adjoint of the adjoint."""
    x, weight, saved, bias = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, activation, slope = ctx.args
    dz = _act_backward_graph(dy, saved, activation, slope, lambda: torch.ops.fastnets.conv_transpose2d_fwd(
        x, weight, bias, stride, padding, dilation, groups, list(dy.shape[2:]), "identity", 0.0, False)[0])
    dx = conv2d(dz, weight, None, stride, padding, dilation, groups) if ctx.needs_input_grad[0] else None
    dw = (torch.nn.grad.conv2d_weight(dz, weight.shape, x, stride, padding, dilation, groups)
          if ctx.needs_input_grad[1] else None)
    db = dz.sum((0, 2, 3)) if has_bias else None
    return (dx, dw, db) + (None,) * 8


def _convt_backward(ctx, dy, _dz):
    if _double.wanted():
        return _convt_backward_graph(ctx, dy)
    x, weight, saved, _ = ctx.saved_tensors
    has_bias, *rest = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw, db = torch.ops.fastnets.conv_transpose2d_bwd(dy, x, weight, saved, has_bias, *rest, need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, db if has_bias else None,
            None, None, None, None, None, None, None, None)


_convt_fwd.register_autograd(_convt_backward, setup_context=_convt_setup)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, activation: str = "identity",
                     negative_slope: float = 0.01) -> Tensor:
    """``torch.nn.functional.conv_transpose2d`` (same argument order) with a fused bias +
    activation epilogue: DCGAN generators, VAE decoders, UNet up-paths.

    input (N, C_in, H, W) or unbatched; weight (C_in, C_out/groups, kH, kW); bias (C_out,).
    Output size per dim: (H-1)*stride - 2*padding + dilation*(k-1) + output_padding + 1.
    """
    op = "conv_transpose2d"
    _check_common(op, input, weight, bias, groups, 2)
    activation, slope = _activation(op, activation, negative_slope)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    C_in = x.shape[1]
    if weight.shape[0] != C_in:
        raise ValueError(f"{op}: input has {C_in} channels but weight.shape[0] is {weight.shape[0]}")
    if C_in % groups:
        raise ValueError(f"{op}: in_channels ({C_in}) must be divisible by groups={groups}")
    C_out = weight.shape[1] * groups
    bias = _checks.optional_param(op, "bias", bias, like=x, shape=(C_out,))
    stride_ = _checks.ints(op, "stride", stride, 2, 1)
    pad = _checks.ints(op, "padding", padding, 2, 0)
    dil = _checks.ints(op, "dilation", dilation, 2, 1)
    out_pad = _checks.ints(op, "output_padding", output_padding, 2, 0)
    for i, dim in enumerate(("height", "width")):
        if out_pad[i] >= max(stride_[i], dil[i]):
            raise ValueError(f"{op}: output_padding {out_pad} must be smaller than stride or dilation along the "
                             f"{dim} (stride={stride_}, dilation={dil})")
    out_hw = tuple((x.shape[2 + i] - 1) * stride_[i] - 2 * pad[i] + dil[i] * (weight.shape[2 + i] - 1)
                   + out_pad[i] + 1 for i in range(2))
    if min(out_hw) <= 0:
        raise ValueError(f"{op}: output size {out_hw} is not positive for input shape {tuple(x.shape)}, "
                         f"weight shape {tuple(weight.shape)}, stride {stride_}, padding {pad}")
    x, weight, bias = _checks.autocast(x, weight, bias)
    backend = _dispatch.choose(op, x.device, empty=x.numel() == 0 or C_out == 0)
    if backend == "torch":
        y = reference.conv_transpose2d(x, weight, bias, stride_, pad, out_pad, groups, dil,
                                       activation=activation, negative_slope=slope)
    else:
        save_z = _z_needed(activation, slope) and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        y, _ = torch.ops.fastnets.conv_transpose2d_fwd(x, weight, bias, list(stride_), list(pad), list(dil), groups,
                                                       list(out_hw), activation, slope, save_z)
    return y.squeeze(0) if unbatched else y


def patch_embed(pixel_values: Tensor, weight: Tensor, class_embedding: Optional[Tensor] = None,
                position_embedding: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """A ViT's token embedding: non-overlapping patches through the convolution kernel
    (stride = kernel = patch), the positional embedding added in the kernel's epilogue
    (its residual input), then the class token (plus its position) in front.

    pixel_values (B, C, H, W); weight (E, C, p, p); class_embedding (E,) or None;
    position_embedding (1 + H/p * W/p, E) with a class token, (H/p * W/p, E) without, or None;
    bias (E,): the convolution's bias (SigLIP's patch embedding has one, CLIP's not). Returns (B, [1 +] H/p * W/p, E), patches in row-major order (CLIP / ViT / timm's order).
    Differentiable in everything but the pixels' layout."""
    op = "patch_embed"
    _checks.tensor(op, "pixel_values", pixel_values)
    _checks.tensor(op, "weight", weight)
    if pixel_values.dim() != 4 or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"{op}: pixel_values must be (B, C, H, W) and weight (E, C, p, p), got "
                         f"{tuple(pixel_values.shape)} and {tuple(weight.shape)}")
    B, _, H, W = pixel_values.shape
    E, p = weight.shape[0], weight.shape[-1]
    if H < p or W < p:
        raise ValueError(f"{op}: image size {H}x{W} is smaller than the patch size {p}")
    # A size that is not a multiple of the patch drops the remainder, as torch's strided conv does.
    gh, gw = H // p, W // p
    n_cls = 0 if class_embedding is None else 1
    if class_embedding is not None and tuple(class_embedding.shape) != (E,):
        raise ValueError(f"{op}: class_embedding must have shape ({E},), got {tuple(class_embedding.shape)}")
    if position_embedding is not None and tuple(position_embedding.shape) != (n_cls + gh * gw, E):
        raise ValueError(f"{op}: position_embedding must have shape ({n_cls + gh * gw}, {E}), got "
                         f"{tuple(position_embedding.shape)}")
    dtype = _checks.autocast(pixel_values, weight)[0].dtype
    # The position embedding is the conv epilogue's residual when that changes no dtype. Under
    # autocast torch adds a float32 embedding to the bf16 / fp16 conv output in float32 (type
    # promotion): the add then runs after the conv, as torch's does, with torch's result dtype.
    fuse = position_embedding is not None and position_embedding.dtype == dtype
    residual = None
    if fuse:
        # (E, gh, gw) broadcast over the batch: a stride-0 view, read by the epilogue.
        pos = position_embedding[n_cls:].to(pixel_values.dtype).t().reshape(1, E, gh, gw)
        residual = pos.expand(B, E, gh, gw)
    tokens = conv2d(pixel_values, weight, bias, stride=p, residual=residual).flatten(2).transpose(1, 2)
    if position_embedding is not None and not fuse:
        tokens = tokens + position_embedding[n_cls:]
    if class_embedding is None:
        return tokens
    cls = class_embedding if position_embedding is None else class_embedding + position_embedding[0]
    out_dtype = torch.promote_types(tokens.dtype, cls.dtype)   # torch.cat's promotion, as a ViT's forward gets
    return torch.cat([cls.to(out_dtype).expand(B, 1, E), tokens.to(out_dtype)], dim=1)
