"""batch_norm: torch.nn.functional.batch_norm's signature, Triton kernels, optional fused
activation (BN + ReLU in one pass), and fold_conv_bn for inference.

Training mode computes per-channel batch statistics (float32 Welford partials merged with
Chan's formula) and updates running_mean / running_var in place exactly as torch does:
``running = (1 - momentum) * running + momentum * batch``, with the unbiased batch
variance. Eval mode normalizes with the running statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double


def _batchnorm_kernels():
    """fastnets.kernels.batchnorm, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import batchnorm
    return batchnorm

_dispatch.register_op("batch_norm", "BatchNorm (train and eval, any layout) with optional fused activation")

_ACTS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
ACTIVATIONS = _ACTS   # the activations the batch_norm kernels fuse


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fold(weight, bias, mean, rstd):
    """Per-channel scale = weight * rstd and shift = bias - mean * scale, in the stats dtype."""
    scale = rstd * weight.to(rstd.dtype) if weight is not None else rstd.clone()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(rstd.dtype)
    return scale.contiguous(), shift.contiguous()


@torch.library.custom_op("fastnets::batch_norm_fwd", mutates_args=())
def _bn_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, eps: float, activation: str,
            slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    k = _batchnorm_kernels()
    acc = _acc(x.dtype)
    if training:
        mean, var = k.batch_stats(x)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    rstd = torch.rsqrt(var + eps)
    scale, shift = _fold(weight, bias, mean, rstd)
    return k.bn_apply(x, scale, shift, activation, slope), mean, rstd, var


@_bn_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, activation, slope):
    C = x.shape[1]
    fmt = _checks.memory_format(x)
    stat = lambda: x.new_empty((C,), dtype=_acc(x.dtype))  # noqa: E731
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt), stat(), stat(), stat()


@torch.library.custom_op("fastnets::batch_norm_bwd", mutates_args=())
def _bn_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
            training: bool, activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    scale, shift = _fold(weight, bias, mean, rstd)
    fmt = _checks.memory_format(x)
    dx, dw, db = _batchnorm_kernels().bn_bwd(dy.contiguous(memory_format=fmt), x, scale, shift, mean, rstd,
                                             training, activation, slope)
    # Custom-op outputs may not alias each other: a fresh empty for each absent gradient.
    return (dx, dw.to(weight.dtype) if weight is not None else x.new_empty((0,)),
            db.to(bias.dtype) if bias is not None else x.new_empty((0,)))


@_bn_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, training, activation, slope):
    fmt = _checks.memory_format(x)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty_like(weight) if weight is not None else x.new_empty((0,)),
            torch.empty_like(bias) if bias is not None else x.new_empty((0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps, activation, slope = inputs
    _, mean, rstd, _ = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (training, activation, slope)
    ctx.eps = eps


def _reference_forward(ctx, mean, rstd):
    """The forward in plain torch, for a differentiable backward (create_graph=True): batch
    statistics recomputed from x in training, the saved running statistics as constants in eval."""
    training, activation, slope = ctx.args
    # The saved statistics are outputs of the forward op: detached, or the graph of the
    # recompute would lead back into this backward.
    mean, rstd = mean.detach(), rstd.detach()

    def fn(x, weight, bias):
        if training:
            return reference.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps, activation=activation,
                                        negative_slope=slope)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x.to(mean.dtype) - mean.view(shape)) * rstd.view(shape)
        y = y * weight.to(y.dtype).view(shape) if weight is not None else y
        y = y + bias.to(y.dtype).view(shape) if bias is not None else y
        return reference.activation.ACTIVATIONS[activation](y, slope).to(x.dtype)
    return fn


def _backward(ctx, dy, _m, _r, _v):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if _double.wanted():
        dx, dw, db = _double.reference_grads(_reference_forward(ctx, mean, rstd), (x, weight, bias), dy)
        return (dx if ctx.needs_input_grad[0] else None, dw, db) + (None,) * 6
    dx, dw, db = torch.ops.fastnets.batch_norm_bwd(dy, x, weight, bias, mean, rstd, *ctx.args)
    return dx, (dw if weight is not None else None), (db if bias is not None else None), None, None, None, None, \
        None, None


_bn_fwd.register_autograd(_backward, setup_context=_setup)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, activation: str = "identity",
               negative_slope: float = 0.01) -> Tensor:
    """``torch.nn.functional.batch_norm`` plus a fused activation (fastnets extra).

    input (N, C, *): NCHW or channels_last (kept). running_mean / running_var (C,) or None;
    in training mode they are updated in place. weight / bias (C,) or None; they, and the
    running statistics, may be float32 while input is fp16/bf16. Backward: input, weight,
    bias (train and eval). activation: identity, relu, leaky_relu, gelu, gelu_tanh, silu,
    tanh, sigmoid. Backends: triton, interpret, torch.
    """
    op = "batch_norm"
    _checks.tensor(op, "input", input, min_dim=2)
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _checks.norm_param(op, name, t, like=input, shape=(C,))
    weight = _checks.norm_param(op, "weight", weight, like=input, shape=(C,))
    bias = _checks.norm_param(op, "bias", bias, like=input, shape=(C,))
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    if training and C and input.numel() // C == 1:   # as torch: one value; an empty batch is fine
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input shape "
                         f"{tuple(input.shape)}")
    if activation not in _ACTS:
        raise ValueError(f"{op}: activation must be one of {', '.join(_ACTS)}, got {activation!r}")
    eps = _checks.number(op, "eps", eps, min_value=0.0)
    momentum = _checks.number(op, "momentum", momentum)
    slope = _checks.number(op, "negative_slope", negative_slope)
    backend = _dispatch.choose(op, input.device, empty=input.numel() == 0)
    if backend == "torch":
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation=activation, negative_slope=slope)
    x = input.contiguous(memory_format=_checks.memory_format(input))
    y, mean, _, var = torch.ops.fastnets.batch_norm_fwd(x, weight, bias, running_mean if not training else None,
                                                        running_var if not training else None, training, eps,
                                                        activation, slope)
    if training and running_mean is not None:
        n = x.numel() // C
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
    return y


def fold_conv_bn(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_mean: Tensor, bn_var: Tensor,
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                 transpose: bool = False) -> tuple[Tensor, Tensor]:
    """(weight, bias) of one conv equal to conv followed by eval-mode BatchNorm:
    w' = w * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    The per-channel scale and the bias are computed in float64 (C values); the weight is scaled
    in one pass in float32 (float64 for float64 weights), its layout kept: with autograd
    recording this runs every call, and a float64 round trip of the weight would read and write
    it eight times over. transpose: the weight is a ConvTranspose weight (in, out/groups, kH,
    kW) -- only groups=1 supported there."""
    scale = torch.rsqrt(bn_var.double() + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.double()
    b = conv_bias.double() if conv_bias is not None else torch.zeros_like(scale)
    shift = (b - bn_mean.double()) * scale + (bn_bias.double() if bn_bias is not None else 0.0)
    acc = torch.promote_types(conv_weight.dtype, torch.float32)
    shape = (1, -1, *([1] * (conv_weight.dim() - 2))) if transpose else (-1, *([1] * (conv_weight.dim() - 1)))
    w = conv_weight.to(acc) * scale.to(acc).view(shape)
    return w.to(conv_weight.dtype), shift.to(conv_weight.dtype)
