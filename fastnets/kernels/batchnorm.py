"""BatchNorm (per-channel statistics over batch and space) with an optional fused activation.

x is seen as (N, C, S) through its strides, so NCHW (S contiguous) and channels_last
(C contiguous) share every kernel; Triton's stride-1 specialization makes whichever axis
is contiguous the coalesced one.

- statistics: a 2-D grid of (channel tile, batch chunk) programs; each walks its batch
  chunk with per-lane Welford accumulators and writes one (count, mean, M2) partial per
  channel. The partials are merged with Chan's formula in torch (C-length vectors): exact
  and stable for any N*S, and no atomics.
- apply: y = act(x * scale[c] + shift[c]) where scale = weight*rstd and shift = bias -
  mean*scale are folded per channel beforehand: one read, one write, one FMA.
- backward: the same (channel tile, batch chunk) grid reduces sum(dz) and sum(dz*xhat)
  (dz = dy * act'(z), z recomputed from x), then a flat kernel writes
  dx = weight*rstd * (dz - mean(dz) - xhat * mean(dz*xhat)). Eval mode passes zero means.
Statistics are float32 (float64 for float64 input); weight/bias may be float32 under
mixed precision while x is fp16/bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, acc_torch_dtype, empty, memory_format, next_pow2
from .activation import ACTIVATIONS, act_fwd, act_grad


@triton.jit
def _bn_stats_kernel(
    X, Cnt, Mean, M2,            # partials: (chunks, C) each
    N, C, S, sxn, sxc, sxs, n_per_chunk,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk = tl.program_id(1)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    offs_s = tl.arange(0, BLOCK_S)
    cnt = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    mean = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    m2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    n0 = chunk.to(tl.int64) * n_per_chunk  # int64 loop variable: n * stride cannot overflow
    n1 = tl.minimum(n0 + n_per_chunk, N)
    for n in range(n0, n1):
        base = X + n * sxn + cs[:, None].to(tl.int64) * sxc
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs_s
            mask = c_ok[:, None] & (s < S)[None, :]
            x = tl.load(base + s[None, :] * sxs, mask=mask, other=0.0).to(ACC)
            new_cnt = cnt + tl.where(mask, 1.0, 0.0)
            delta = x - mean
            mean += tl.where(mask, delta / tl.maximum(new_cnt, 1.0), 0.0)
            m2 += tl.where(mask, delta * (x - mean), 0.0)
            cnt = new_cnt
    total = tl.sum(cnt, axis=1)
    c_mean = tl.sum(mean * cnt, axis=1) / tl.maximum(total, 1.0)
    d = mean - c_mean[:, None]
    out = chunk.to(tl.int64) * C + cs
    tl.store(Cnt + out, total, mask=c_ok)
    tl.store(Mean + out, c_mean, mask=c_ok)
    tl.store(M2 + out, tl.sum(m2, axis=1) + tl.sum(cnt * d * d, axis=1), mask=c_ok)


@triton.jit
def _bn_apply_kernel(
    X, Y, Scale, Shift, numel, C, c_div, slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # X and Y are dense in the same memory format; c_div is the channel's memory stride (S for NCHW, 1 for NHWC).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // c_div) % C
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    z = x * tl.load(Scale + c, mask=mask, other=0.0) + tl.load(Shift + c, mask=mask, other=0.0)
    tl.store(Y + offs, act_fwd(z, ACT, slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    X, DY, Scale, Shift, Mean, Rstd,
    SumDz, SumDzXhat,            # partials: (chunks, C)
    N, C, S, sxn, sxc, sxs, syn, syc, sys, n_per_chunk, slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk = tl.program_id(1)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    mean = tl.load(Mean + cs, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(Rstd + cs, mask=c_ok, other=0.0)[:, None]
    if ACT != 0:
        scale = tl.load(Scale + cs, mask=c_ok, other=0.0)[:, None]
        shift = tl.load(Shift + cs, mask=c_ok, other=0.0)[:, None]
    offs_s = tl.arange(0, BLOCK_S)
    s_dz = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    s_dzx = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    n0 = chunk.to(tl.int64) * n_per_chunk  # int64 loop variable: n * stride cannot overflow
    n1 = tl.minimum(n0 + n_per_chunk, N)
    for n in range(n0, n1):
        xb = X + n * sxn + cs[:, None].to(tl.int64) * sxc
        yb = DY + n * syn + cs[:, None].to(tl.int64) * syc
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs_s
            mask = c_ok[:, None] & (s < S)[None, :]
            x = tl.load(xb + s[None, :] * sxs, mask=mask, other=0.0).to(ACC)
            dz = tl.load(yb + s[None, :] * sys, mask=mask, other=0.0).to(ACC)
            if ACT != 0:
                dz = dz * act_grad(x * scale + shift, ACT, slope)
            s_dz += tl.where(mask, dz, 0.0)
            s_dzx += tl.where(mask, dz * (x - mean) * rstd, 0.0)
    out = chunk.to(tl.int64) * C + cs
    tl.store(SumDz + out, tl.sum(s_dz, axis=1), mask=c_ok)
    tl.store(SumDzXhat + out, tl.sum(s_dzx, axis=1), mask=c_ok)


@triton.jit
def _bn_bwd_dx_kernel(
    X, DY, DX, Scale, Shift, Mean, Rstd, MeanDz, MeanDzXhat,
    numel, C, c_div, slope,
    ACT: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # X, DY, DX dense in the same memory format.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // c_div) % C
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    scale = tl.load(Scale + c, mask=mask, other=0.0)
    if ACT != 0:
        dz = dz * act_grad(x * scale + tl.load(Shift + c, mask=mask, other=0.0), ACT, slope)
    if TRAINING:
        xhat = (x - tl.load(Mean + c, mask=mask, other=0.0)) * tl.load(Rstd + c, mask=mask, other=0.0)
        dx = scale * (dz - tl.load(MeanDz + c, mask=mask, other=0.0)
                      - xhat * tl.load(MeanDzXhat + c, mask=mask, other=0.0))
    else:
        # Running statistics are constants: dx = scale * dz, with no xhat term (0 * xhat would
        # turn a NaN input into a NaN gradient where torch's is finite).
        dx = scale * dz
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

def _view3(t: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of a dense NCHW or channels_last tensor."""
    N, C = t.shape[:2]
    S = t[0, 0].numel() if t.numel() else 1
    if memory_format(t) == torch.channels_last:
        return N, C, S, t.stride(0), 1, C
    return N, C, S, t.stride(0), (S if t.dim() > 2 else 1), 1


def _c_div(t: torch.Tensor) -> int:
    return _view3(t)[4]


def reduce_config(C: int, S: int, channels_last: bool, N: int, device: torch.device):
    """(BLOCK_C, BLOCK_S, batch chunk, num_warps). Tiles are long along the contiguous axis;
    batch chunks are sized so (channel tiles x chunks) fills the GPU twice over."""
    gpu = _common.gpu_launch(device)
    tile = 2048 if gpu else 8192
    if channels_last:
        block_c = min(next_pow2(C), 128)
        block_s = max(1, min(next_pow2(S), tile // block_c))
    else:
        block_s = min(next_pow2(S), 1024)
        block_c = max(1, min(next_pow2(C), tile // block_s))
    c_tiles = triton.cdiv(C, block_c)
    want = _common.persistent_programs(device, 1 << 30, per_sm=4) if gpu else 2
    chunks = max(1, min(N, triton.cdiv(want, c_tiles)))
    return block_c, block_s, triton.cdiv(N, chunks), 4


def _flat_config(device: torch.device) -> tuple[int, int]:
    return (1024, 4) if _common.gpu_launch(device) else (8192, 4)


def _act_id(activation: str) -> int:
    return ACTIVATIONS[activation]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) of x in float32 (float64 for float64)."""
    N, C, S, sxn, sxc, sxs = _view3(x)
    acc = acc_torch_dtype(x.dtype)
    block_c, block_s, n_per, warps = reduce_config(C, S, sxc == 1 and C > 1, N, x.device)
    chunks = triton.cdiv(N, n_per)
    cnt, mean, m2 = (empty((chunks, C), dtype=acc, device=x.device) for _ in range(3))
    _bn_stats_kernel[(triton.cdiv(C, block_c), chunks)](
        x, cnt, mean, m2, N, C, S, sxn, sxc, sxs, n_per,
        ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    # Chan's merge of the chunk partials.
    total = cnt.sum(0)
    mean_c = (cnt * mean).sum(0) / total
    m2_c = m2.sum(0) + (cnt * (mean - mean_c) ** 2).sum(0)
    return mean_c, m2_c / total


def bn_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    """act(x * scale[c] + shift[c]); scale/shift float32 (float64 for float64) of shape (C,)."""
    y = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    numel = x.numel()
    block, warps = _flat_config(x.device)
    _bn_apply_kernel[(triton.cdiv(numel, block),)](
        x, y, scale, shift, numel, x.shape[1], _c_div(x), float(slope),
        ACT=_act_id(activation), ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return y


def bn_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
           rstd: torch.Tensor, training: bool, activation: str, slope: float):
    """(dx, dweight_pre, dbias_pre): dx, and the per-channel sums sum(dz*xhat) and sum(dz) in
    float32 (the weight/bias gradients before casting). dy must share x's memory format."""
    N, C, S, sxn, sxc, sxs = _view3(x)
    _, _, _, syn, syc, sys = _view3(dy)
    acc = acc_torch_dtype(x.dtype)
    block_c, block_s, n_per, warps = reduce_config(C, S, sxc == 1 and C > 1, N, x.device)
    chunks = triton.cdiv(N, n_per)
    s_dz, s_dzx = (empty((chunks, C), dtype=acc, device=x.device) for _ in range(2))
    act = _act_id(activation)
    _bn_bwd_reduce_kernel[(triton.cdiv(C, block_c), chunks)](
        x, dy, scale, shift, mean, rstd, s_dz, s_dzx, N, C, S, sxn, sxc, sxs, syn, syc, sys, n_per, float(slope),
        ACT=act, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    s_dz, s_dzx = s_dz.sum(0), s_dzx.sum(0)
    count = N * S
    if training:
        k1, k2 = s_dz / count, s_dzx / count
    else:  # running statistics are constants: dx = scale * dz (the kernel's TRAINING=False)
        k1 = k2 = s_dz
    dx = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    block, fwarps = _flat_config(x.device)
    _bn_bwd_dx_kernel[(triton.cdiv(x.numel(), block),)](
        x, dy, dx, scale, shift, mean, rstd, k1, k2, x.numel(), C, _c_div(x), float(slope),
        ACT=act, TRAINING=training, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=fwarps)
    return dx, s_dzx, s_dz
