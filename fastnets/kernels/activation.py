"""Fused bias + activation, and gated activations (SwiGLU / GeGLU).

Memory-bound: the forward reads x (and the bias, which stays in L1/L2) and writes y once;
the backward reads x and dy and writes dx once, reducing dbias in the same pass. The activation is recomputed from x in
the backward instead of saving it, which costs no extra traffic. Math runs in float32
(float64 for float64 inputs); libdevice is avoided so the same code runs under Triton's
CPU interpreter.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, acc_torch_dtype, empty, next_pow2, persistent_programs

# Activation ids: constexpr in the kernels, so each launch compiles only its branch.
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4,
               "silu": 5, "tanh": 6, "sigmoid": 7, "quick_gelu": 8}
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
    # Comparisons are written so a NaN falls through to the branch that propagates it.
    if ACT == 1:
        y = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        y = tl.where(z < 0, z * slope, z)
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
    elif ACT == 8:
        # OpenAI CLIP's x * sigmoid(1.702 x).
        y = z * _sigmoid(1.702 * z)
    else:
        y = z
    return y


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act(z) / dz, matching torch's convention at the kinks (relu'(0) = 0)."""
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, 1.0)
    elif ACT == 2:
        g = tl.where(z <= 0, slope, 1.0)
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
    elif ACT == 8:
        s = _sigmoid(1.702 * z)
        g = s + 1.702 * z * s * (1.0 - s)
    else:
        g = z * 0.0 + 1.0
    return g


@triton.jit
def _gain_clamp(y, gain, clamp):
    """StyleGAN2's epilogue: y * gain clamped to [-clamp, clamp] (gain 1, clamp inf: y).
    NaN falls through both comparisons and stays NaN, as in torch.clamp."""
    y = y * gain
    return tl.where(y > clamp, clamp, tl.where(y < -clamp, -clamp, y))


@triton.jit
def _clamp_pass(y, gain, clamp):
    """1 where the clamp passed y * gain through, as torch.clamp's gradient: inclusive bounds,
    0 for NaN."""
    y = y * gain
    return tl.where((y >= -clamp) & (y <= clamp), gain, 0.0)


@triton.jit
def _bias_act_fwd_kernel(
    X, Bias, Y,          # X: (M, C) contiguous; Bias: (C,) or unused; Y: (M, C)
    numel, C, slope, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # Flat 1-D tiling: contiguous, fully coalesced loads; the bias index is offs % C.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(Bias + offs % C, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, _gain_clamp(act_fwd(z, ACT, slope), gain, clamp).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_fwd_kernel(
    X, Bias, Y,          # X: (M, 2H) rows [gate | up]; Bias: (2H,); Y: (M, H)
    numel, H, slope, gain, clamp,     # numel = M * H (output elements)
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
    tl.store(Y + offs, _gain_clamp(act_fwd(a, ACT, slope) * u, gain, clamp).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    X, Bias, DY, DX,     # X, DX: (M, C) or (M, 2C) rows [gate | up] when GATED; DY: (M, C); Bias: (C,) / (2C,)
    DBias_part,          # (row groups, C or 2C) accumulator dtype: column sums of dz per row group
    M, C, rows_per_program, slope, gain, clamp,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CLAMP: tl.constexpr,
):
    # 2-D tiles so the bias gradient (a column sum of dz) is reduced in float32 registers in
    # the same pass: no second read of dx, and no rounding of dz to bf16 before summing.
    pid_c = tl.program_id(0)
    group = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if GATED:
        row_len = 2 * C
    else:
        row_len = C
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=cmask, other=0.0).to(ACC)
        if GATED:
            b_up = tl.load(Bias + C + cols, mask=cmask, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    acc_up = tl.zeros((BLOCK_C,), dtype=ACC)
    row_start = group.to(tl.int64) * rows_per_program   # int64: row * row_len may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        x_offs = rows[:, None] * row_len + cols[None, :]
        dy = tl.load(DY + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        a = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
        if HAS_BIAS:
            a += b[None, :]
        if CLAMP:
            # gain and the clamp's pass mask fold into dy: the output is recomputed from x.
            if GATED:
                u_ = tl.load(X + x_offs + C, mask=mask, other=0.0).to(ACC)
                if HAS_BIAS:
                    u_ += b_up[None, :]
                dy = dy * _clamp_pass(act_fwd(a, ACT, slope) * u_, gain, clamp)
            else:
                dy = dy * _clamp_pass(act_fwd(a, ACT, slope), gain, clamp)
        else:
            dy = dy * gain
        if GATED:
            u = tl.load(X + x_offs + C, mask=mask, other=0.0).to(ACC)
            if HAS_BIAS:
                u += b_up[None, :]
            dz = dy * u * act_grad(a, ACT, slope)
            dz_up = dy * act_fwd(a, ACT, slope)
            tl.store(DX + x_offs + C, dz_up.to(DX.dtype.element_ty), mask=mask)
            acc_up += tl.sum(tl.where(mask, dz_up, 0.0), axis=0)
        else:
            dz = dy * act_grad(a, ACT, slope)
        tl.store(DX + x_offs, dz.to(DX.dtype.element_ty), mask=mask)
        acc += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if HAS_BIAS:
        part = DBias_part + group.to(tl.int64) * row_len
        tl.store(part + cols, acc, mask=cmask)
        if GATED:
            tl.store(part + C + cols, acc_up, mask=cmask)


def _bwd_tile_config(C: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for the 2-D backward: 256 columns keep each row segment
    a whole number of 128-byte lines; 8 rows on 8 warps give every thread 8 elements (16
    bytes of bf16) per tensor in flight. Larger tiles (16 rows on 4 or 8 warps, 32 a thread)
    spill with GELU's erf and the gated forms' second operand (the static report); float64:
    4 rows on 4 warps."""
    block_c = min(256, next_pow2(C))
    if not _common.gpu_launch(device):
        return 64, block_c, 4
    return (4, block_c, 4) if dtype == torch.float64 else (8, block_c, 8)


def _act_id(activation: str) -> int:
    return ACTIVATIONS[GATED.get(activation, activation)]


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str, slope: float, gain: float = 1.0,
                 clamp: float | None = None) -> torch.Tensor:
    """x: (M, C) contiguous (C = 2H for gated activations). Returns (M, C) or (M, H):
    act(x + bias) * gain, clamped to [-clamp, clamp] when clamp is given."""
    M, C = x.shape
    gated = activation in GATED
    out_cols = C // 2 if gated else C
    y = empty((M, out_cols), dtype=x.dtype, device=x.device)
    numel = M * out_cols
    if numel == 0:
        return y
    block, warps = _common.pointwise_config(numel, x.device)
    kernel = _gated_act_fwd_kernel if gated else _bias_act_fwd_kernel
    kernel[(triton.cdiv(numel, block),)](
        x, bias if bias is not None else x, y, numel, out_cols, float(slope), float(gain),
        math.inf if clamp is None else float(clamp), ACT=_act_id(activation), HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return y


def bias_act_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str,
                 slope: float, gain: float = 1.0, clamp: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (dz, dbias): dz is the gradient of the pre-activation x + bias (shaped like x,
    and so also dx); dbias its column sum in float32, cast to the bias dtype."""
    M, C_in = x.shape
    gated = activation in GATED
    C = C_in // 2 if gated else C_in
    dx = empty((M, C_in), dtype=x.dtype, device=x.device)
    if M == 0 or C == 0:
        return dx, (torch.zeros_like(bias) if bias is not None else None)
    block_m, block_c, warps = _bwd_tile_config(C, x.device, x.dtype)
    col_tiles = triton.cdiv(C, block_c)
    groups = max(1, min(persistent_programs(x.device, col_tiles * triton.cdiv(M, block_m), per_sm=4) // col_tiles,
                        triton.cdiv(M, block_m)))
    rows_per = triton.cdiv(triton.cdiv(M, groups), block_m) * block_m
    groups = triton.cdiv(M, rows_per)
    part = (_common.empty((groups, C_in), dtype=acc_torch_dtype(x.dtype), device=x.device)   # partial sums: poisoned too
            if bias is not None else x)
    _act_bwd_kernel[(col_tiles, groups)](
        x, bias if bias is not None else x, dy, dx, part, M, C, rows_per, float(slope), float(gain),
        math.inf if clamp is None else float(clamp), ACT=_act_id(activation), GATED=gated, HAS_BIAS=bias is not None,
        ACC=acc_dtype(x.dtype), BLOCK_M=block_m, BLOCK_C=block_c, CLAMP=clamp is not None, num_warps=warps)
    dbias = part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dbias
