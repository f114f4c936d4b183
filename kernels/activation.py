"""Fused bias + activation, and gated activations (SwiGLU / GeGLU).

Memory-bound: the forward reads x (and the bias, which stays in L1/L2) and writes y once;
the backward reads x and dy and writes dx once. The activation is recomputed from x in
the backward instead of saving it, which costs no extra traffic. Math runs in float32
(float64 for float64 inputs); libdevice is avoided so the same code runs under Triton's
CPU interpreter.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, empty

# Activation ids: constexpr in the kernels, so each launch compiles only its branch.
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4,
               "silu": 5, "tanh": 6, "sigmoid": 7}
# Gated: act(gate) * up, where the last dim of x holds [gate | up].
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh through exp of a non-positive number: no overflow, and no libdevice.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def act_fwd(z, ACT: tl.constexpr, slope):
    """y = act(z) for the activation id ACT (z already in the accumulator dtype)."""
    if ACT == 1:
        y = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        y = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 4:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        y = 0.5 * z * (1.0 + _tanh(u))
    elif ACT == 5:
        y = z * _sigmoid(z)
    elif ACT == 6:
        y = _tanh(z)
    elif ACT == 7:
        y = _sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act(z) / dz, matching torch's convention at the kinks (relu'(0) = 0)."""
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        g = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 4:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(u)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 5:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 6:
        t = _tanh(z)
        g = 1.0 - t * t
    elif ACT == 7:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    else:
        g = z * 0.0 + 1.0
    return g


@triton.jit
def _bias_act_fwd_kernel(
    X, Bias, Y,          # X: (M, C) contiguous; Bias: (C,) or unused; Y: (M, C)
    numel, C, slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # Flat 1-D tiling: contiguous, fully coalesced loads; the bias index is offs % C.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(Bias + offs % C, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, act_fwd(z, ACT, slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    X, Bias, DY, DX,     # all (M, C) contiguous except Bias (C,)
    numel, C, slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(Bias + offs % C, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    tl.store(DX + offs, (dy * act_grad(z, ACT, slope)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_fwd_kernel(
    X, Bias, Y,          # X: (M, 2H) rows [gate | up]; Bias: (2H,); Y: (M, H)
    numel, H, slope,     # numel = M * H (output elements)
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // H
    col = offs - row * H
    gate_offs = row * (2 * H) + col
    a = tl.load(X + gate_offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(X + gate_offs + H, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(Bias + col, mask=mask, other=0.0).to(ACC)
        u += tl.load(Bias + H + col, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (act_fwd(a, ACT, slope) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    X, Bias, DY, DX,     # X, DX: (M, 2H); DY: (M, H); Bias: (2H,)
    numel, H, slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // H
    col = offs - row * H
    gate_offs = row * (2 * H) + col
    a = tl.load(X + gate_offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(X + gate_offs + H, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(Bias + col, mask=mask, other=0.0).to(ACC)
        u += tl.load(Bias + H + col, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    da = dy * u * act_grad(a, ACT, slope)
    du = dy * act_fwd(a, ACT, slope)
    tl.store(DX + gate_offs, da.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + gate_offs + H, du.to(DX.dtype.element_ty), mask=mask)


def _launch_config(numel: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for the pointwise kernels: 16 B per thread per access at 4 warps
    x 1024 elements keeps enough bytes in flight; the interpreter prefers big blocks."""
    if device.type != "cuda":
        return 4096, 4
    return (2048, 8) if numel >= (1 << 22) else (1024, 4)


def _act_id(activation: str) -> int:
    return ACTIVATIONS[GATED.get(activation, activation)]


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str, slope: float) -> torch.Tensor:
    """x: (M, C) contiguous (C = 2H for gated activations). Returns (M, C) or (M, H)."""
    M, C = x.shape
    gated = activation in GATED
    out_cols = C // 2 if gated else C
    y = empty((M, out_cols), dtype=x.dtype, device=x.device)
    numel = M * out_cols
    if numel == 0:
        return y
    block, warps = _launch_config(numel, x.device)
    kernel = _gated_act_fwd_kernel if gated else _bias_act_fwd_kernel
    kernel[(triton.cdiv(numel, block),)](
        x, bias if bias is not None else x, y, numel, out_cols, float(slope),
        ACT=_act_id(activation), HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return y


def bias_act_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str,
                 slope: float) -> torch.Tensor:
    """Gradient w.r.t. the pre-activation (x + bias), shaped like x. dbias is its column sum."""
    M, C = x.shape
    gated = activation in GATED
    out_cols = C // 2 if gated else C
    dx = empty((M, C), dtype=x.dtype, device=x.device)
    numel = M * out_cols
    if numel == 0:
        return dx
    block, warps = _launch_config(numel, x.device)
    kernel = _gated_act_bwd_kernel if gated else _bias_act_bwd_kernel
    kernel[(triton.cdiv(numel, block),)](
        x, bias if bias is not None else x, dy, dx, numel, out_cols, float(slope),
        ACT=_act_id(activation), HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return dx
