"""layer_norm, rms_norm and group_norm: torch.nn.functional's signatures, Triton kernels.

Each public function validates, picks a backend (fastnets._dispatch), and either calls the
torch reference or a `torch.library` custom op. The custom ops carry fake (meta)
implementations, so torch.compile traces them without graph breaks, and registered
autograd formulas whose backward is itself a custom op running the backward kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double


def _norm_kernels():
    """fastnets.kernels.norm, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import norm
    return norm

_dispatch.register_op("layer_norm", "row LayerNorm, weight/bias optional, any normalized size")
_dispatch.register_op("rms_norm", "RMSNorm with Gemma-style offset")
_dispatch.register_op("group_norm", "GroupNorm with optional fused SiLU")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- row norms: fastnets::row_norm_fwd / fastnets::row_norm_bwd --------------------------

@torch.library.custom_op("fastnets::row_norm_fwd", mutates_args=())
def _row_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, is_rms: bool,
                  offset: float) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_kernels().row_norm_fwd(x, weight, bias, eps, is_rms, offset)


@_row_norm_fwd.register_fake
def _(x, weight, bias, eps, is_rms, offset):
    M, _ = x.shape
    return (torch.empty_like(x), x.new_empty((0,) if is_rms else (M,), dtype=_acc(x.dtype)),
            x.new_empty((M,), dtype=_acc(x.dtype)))


@torch.library.custom_op("fastnets::row_norm_bwd", mutates_args=())
def _row_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor, rstd: Tensor,
                  is_rms: bool, offset: float) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _norm_kernels().row_norm_bwd(dy, x, weight, has_bias, mean, rstd, is_rms, offset)
    # Custom ops return tensors, not None, and outputs may not alias: one empty each.
    return dx, (dw if dw is not None else x.new_empty((0,))), (db if db is not None else x.new_empty((0,)))


@_row_norm_bwd.register_fake
def _(dy, x, weight, has_bias, mean, rstd, is_rms, offset):
    N = x.shape[1]
    w_dtype = weight.dtype if weight is not None else x.dtype
    return (torch.empty_like(x), x.new_empty((N,) if weight is not None else (0,), dtype=w_dtype),
            x.new_empty((N,) if has_bias else (0,), dtype=w_dtype))


def _row_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, is_rms, offset = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.is_rms, ctx.offset, ctx.eps = bias is not None, is_rms, offset, eps


def _row_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if _double.wanted():   # create_graph: a differentiable backward (second derivatives)
        N = x.shape[-1]
        if ctx.is_rms:
            fn = lambda xx, ww: reference.rms_norm(xx, (N,), ww, ctx.eps, offset=ctx.offset)  # noqa: E731
        else:
            fn = lambda xx, ww: reference.layer_norm(xx, (N,), ww, None, ctx.eps)  # noqa: E731
        dx, dw = _double.reference_grads(fn, (x, weight), dy)
        db = dy.reshape(-1, N).sum(0).to(weight.dtype if weight is not None else dy.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None
    dx, dw, db = torch.ops.fastnets.row_norm_bwd(dy, x, weight, ctx.has_bias, mean, rstd, ctx.is_rms, ctx.offset)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None


_row_norm_fwd.register_autograd(_row_norm_backward, setup_context=_row_norm_setup)


def _row_norm(input: Tensor, shape: tuple, weight, bias, eps: float, is_rms: bool, offset: float) -> Tensor:
    N = 1
    for s in shape:
        N *= s
    x2d = _checks.rows(input, N)
    # The kernels index weight/bias with unit stride.
    w = weight.reshape(N).contiguous() if weight is not None else None
    b = bias.reshape(N).contiguous() if bias is not None else None
    y, _, _ = torch.ops.fastnets.row_norm_fwd(x2d, w, b, eps, is_rms, offset)
    return y.view(input.shape)


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, as ``F.layer_norm``.

    input: (*, *normalized_shape), float16 / bfloat16 / float32 / float64.
    weight, bias: ``normalized_shape`` or None; may be float32 with fp16/bf16 input (the
    output keeps input's dtype, gradients of weight/bias take theirs).
    Statistics are float32 (float64 for float64 input); any normalized size works (rows
    wider than 16384 are streamed in chunks). NaN/inf propagate as in torch.
    Backward: input, weight and bias. Backends: triton (CUDA), interpret (CPU with
    TRITON_INTERPRET=1), torch (otherwise).
    """
    _checks.tensor("layer_norm", "input", input)
    shape = _checks.normalized_shape("layer_norm", normalized_shape, input)
    weight = _checks.norm_param("layer_norm", "weight", weight, like=input, shape=shape)
    bias = _checks.norm_param("layer_norm", "bias", bias, like=input, shape=shape)
    eps = _checks.number("layer_norm", "eps", eps, min_value=0.0)
    # Empty input: nothing for a kernel to do; the reference returns the empty result.
    if _dispatch.choose("layer_norm", input.device, empty=input.numel() == 0) == "torch":
        return reference.layer_norm(input, shape, weight, bias, eps)
    return _row_norm(input, shape, weight, bias, eps, False, 0.0)


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             offset: float = 0.0) -> Tensor:
    """Root-mean-square normalization, as ``F.rms_norm``: ``x / sqrt(mean(x^2) + eps) * (offset + weight)``.

    eps=None uses ``torch.finfo(input.dtype).eps`` like torch. ``offset=1.0`` gives Gemma's
    convention (weights stored as ``w - 1``). Shapes, dtypes and backends as layer_norm.
    """
    _checks.tensor("rms_norm", "input", input)
    shape = _checks.normalized_shape("rms_norm", normalized_shape, input)
    weight = _checks.optional_param("rms_norm", "weight", weight, like=input, shape=shape)
    eps = torch.finfo(input.dtype).eps if eps is None else _checks.number("rms_norm", "eps", eps, min_value=0.0)
    offset = _checks.number("rms_norm", "offset", offset)
    if _dispatch.choose("rms_norm", input.device, empty=input.numel() == 0) == "torch":
        return reference.rms_norm(input, shape, weight, eps, offset=offset)
    return _row_norm(input, shape, weight, None, eps, True, offset)


# --- group norm: fastnets::group_norm_fwd / fastnets::group_norm_bwd ---------------------

@torch.library.custom_op("fastnets::group_norm_fwd", mutates_args=())
def _group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_kernels().group_norm_fwd(x, num_groups, weight, bias, eps, silu)


@_group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    stats = x.new_empty((x.shape[0] * num_groups,), dtype=_acc(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastnets::group_norm_bwd", mutates_args=())
def _group_norm_bwd(dy: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    mean: Tensor, rstd: Tensor, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _norm_kernels().group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, silu)
    # Custom ops return tensors, not None, and outputs may not alias: one empty each.
    return dx, (dw if dw is not None else x.new_empty((0,))), (db if db is not None else x.new_empty((0,)))


@_group_norm_bwd.register_fake
def _(dy, x, num_groups, weight, bias, mean, rstd, silu):
    C = x.shape[1]
    return (torch.empty_like(x),
            x.new_empty((C,), dtype=weight.dtype) if weight is not None else x.new_empty((0,)),
            x.new_empty((C,), dtype=bias.dtype) if bias is not None else x.new_empty((0,)))


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, eps


def _group_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if _double.wanted():   # create_graph: a differentiable backward (second derivatives)
        dx, dw, db = _double.reference_grads(
            lambda xx, ww, bb: reference.group_norm(xx, ctx.num_groups, ww, bb, ctx.eps,
                                                    activation="silu" if ctx.silu else None), (x, weight, bias), dy)
        return dx, None, dw, db, None, None
    dx, dw, db = torch.ops.fastnets.group_norm_bwd(dy, x, ctx.num_groups, weight, bias, mean, rstd, ctx.silu)
    return dx, None, (dw if weight is not None else None), (db if bias is not None else None), None, None


_group_norm_fwd.register_autograd(_group_norm_backward, setup_context=_group_norm_setup)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, activation: Optional[str] = None) -> Tensor:
    """Group normalization, as ``F.group_norm``, with an optional fused ``activation="silu"``
    (``silu(group_norm(x))`` in one pass, the UNet/VAE resnet-block pattern).

    input: (B, C, *spatial); weight, bias: (C,) or None; C divisible by num_groups.
    channels_last input is made contiguous first (one extra copy). Statistics are float32,
    merged per group with Chan's formula. Backward: input, weight, bias.
    """
    _checks.tensor("group_norm", "input", input, min_dim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    C = input.shape[1]
    if C % num_groups:
        raise ValueError(f"group_norm: input has {C} channels, not divisible by num_groups={num_groups}")
    weight = _checks.norm_param("group_norm", "weight", weight, like=input, shape=(C,))
    bias = _checks.norm_param("group_norm", "bias", bias, like=input, shape=(C,))
    eps = _checks.number("group_norm", "eps", eps, min_value=0.0)
    if activation not in (None, "silu"):
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    if _dispatch.choose("group_norm", input.device, empty=input.numel() == 0) == "torch":
        return reference.group_norm(input, num_groups, weight, bias, eps, activation=activation)
    x3d = input.contiguous().view(input.shape[0], C, -1)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    y, _, _ = torch.ops.fastnets.group_norm_fwd(x3d, num_groups, weight, bias, eps, activation == "silu")
    return y.view(input.shape)
