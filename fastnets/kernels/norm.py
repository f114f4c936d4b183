"""Normalization kernels: layer_norm and rms_norm (one kernel set, IS_RMS constexpr) and
group_norm with an optional fused SiLU.

Row norms (layer_norm / rms_norm) see the input as (M rows, N normalized elements).
- Forward, N <= FUSED_MAX_N: a program holds a (BLOCK_M rows, N) tile in registers: one
  read of x, one write of y, plus 8 bytes of (mean, rstd) per row saved for the backward.
- Forward, larger N: the row is streamed in BLOCK_N chunks twice (statistics, then
  normalize); per-lane Welford accumulators keep the variance stable for any N.
- Backward, N <= FUSED_MAX_N: a persistent grid; each program walks a contiguous range of
  rows BLOCK_M at a time, writes dx, and keeps its partial dweight/dbias in float32 registers. The
  (programs, N) partials are summed afterwards: a parallel tree reduction, no atomics.
- Backward, larger N: dx per row in two chunked passes, and dweight/dbias from a 2-D grid
  of (column tile, row range) programs, again summed from partials.
All statistics are float32 (float64 for float64 input). weight/bias may be float32 while
x is fp16/bf16 (mixed precision); outputs take x's dtype, dweight/dbias the weight's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, acc_torch_dtype, empty, next_pow2, persistent_programs
from .activation import act_fwd, act_grad

FUSED_MAX_N = 16384   # widest row held in registers in one tile
CHUNK_N = 4096        # chunk width when streaming wider rows
# Activation id of SiLU in kernels/activation.py. A tl.constexpr: the compiler (unlike the
# interpreter) refuses to read plain Python globals inside @triton.jit functions.
_SILU = tl.constexpr(5)


def row_norm_config(N: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, single_tile, num_warps): the one place row-norm launch shapes are
    chosen. Narrow rows are stacked BLOCK_M to a tile so every thread has work (a 64-wide
    row alone would idle half of 4 warps); the interpreter likes big tiles. float64 values
    take two registers: tiles of half the elements, and rows over 4096 streamed (an
    8192-wide float64 backward tile spilled)."""
    gpu = _common.gpu_launch(device)
    wide = dtype == torch.float64 and gpu
    single = N <= (FUSED_MAX_N // 4 if wide else FUSED_MAX_N)
    block_n = next_pow2(N) if single else (CHUNK_N // 2 if wide else CHUNK_N)
    tile = (2048 if wide else 4096) if gpu else 16384
    block_m = max(1, tile // block_n) if single else 1
    if not gpu:
        return block_m, block_n, single, 4
    elems = block_m * block_n
    warps = 32 if elems >= 32768 else 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return block_m, block_n, single, warps


@triton.jit
def _row_norm_fwd_kernel(
    X, Y, W, B,          # X, Y: (M, N) with row strides; W, B: (N,) (unused if not HAS_W / HAS_B)
    Mean, Rstd,          # (M,) accumulator dtype, saved for the backward (Mean unused for RMS)
    stride_x, stride_y, M, N, eps, offset,   # offset: Gemma-style y = xhat * (offset + w)
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    SINGLE_TILE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_TILE:
        # A (BLOCK_M rows, BLOCK_N) tile in registers: one read of x, one write of y.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            y = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
            y = xc * rstd[:, None]
            tl.store(Mean + rows, mean, mask=rmask)
        if HAS_W:
            y = y * (tl.load(W + cols, mask=cmask, other=0.0).to(ACC) + offset)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Rstd + rows, rstd, mask=rmask)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * stride_y
        # Pass 1: per-lane Welford (count, mean, M2) over the chunks, merged across lanes
        # with Chan's formula. Sum-of-squares minus square-of-sum would lose digits here.
        cnt = tl.zeros((BLOCK_N,), dtype=ACC)
        lane_mean = tl.zeros((BLOCK_N,), dtype=ACC)
        lane_m2 = tl.zeros((BLOCK_N,), dtype=ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(ACC)
            if IS_RMS:
                lane_m2 += x * x
            else:
                new_cnt = cnt + tl.where(mask, 1.0, 0.0)
                delta = x - lane_mean
                lane_mean += tl.where(mask, delta / tl.maximum(new_cnt, 1.0), 0.0)
                lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
                cnt = new_cnt
        if IS_RMS:
            mean = 0.0
            var = tl.sum(lane_m2, axis=0) / N
        else:
            mean = tl.sum(lane_mean * cnt, axis=0) / N
            d = lane_mean - mean
            var = (tl.sum(lane_m2, axis=0) + tl.sum(cnt * d * d, axis=0)) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        # Pass 2: normalize. The row was just read, so this re-read mostly hits L2.
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(ACC)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * (tl.load(W + start + cols, mask=mask, other=0.0).to(ACC) + offset)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(ACC)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)
        if not IS_RMS:
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)


@triton.jit
def _row_norm_bwd_fused_kernel(
    X, W, DY, DX,        # X, DY, DX: (M, N) with row strides; W: (N,)
    Mean, Rstd,          # (M,) from the forward
    DW_part, DB_part,    # (programs, N) accumulator dtype: this program's partial dweight / dbias
    stride_x, stride_dy, stride_dx, M, N, rows_per_program, offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = (tl.load(W + cols, mask=cmask, other=0.0).to(ACC) + offset)[None, :]
    dw_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    # int64 loop bounds make the row indices int64, so rows * stride cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)[:, None]
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + rows, mask=rmask, other=0.0)[:, None]) * rstd, 0.0)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        # dx = rstd * (wdy - xhat * mean(wdy * xhat) - mean(wdy)); RMS drops the last term.
        c1 = (tl.sum(xhat * wdy, axis=1) / N)[:, None]
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = (tl.sum(wdy, axis=1) / N)[:, None]
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DW_part + pid.to(tl.int64) * N + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(DB_part + pid.to(tl.int64) * N + cols, db_acc, mask=cmask)


@triton.jit
def _chunk_xhat_wdy(X, W, DY, r, stride_x, stride_dy, start, cols, N, mean, rstd, offset,
                    HAS_W: tl.constexpr, ACC: tl.constexpr):
    """One chunk of row r: (xhat, w * dy, mask), zero outside the row."""
    mask = start + cols < N
    x = tl.load(X + r * stride_x + start + cols, mask=mask, other=0.0).to(ACC)
    wdy = tl.load(DY + r * stride_dy + start + cols, mask=mask, other=0.0).to(ACC)
    if HAS_W:
        wdy = wdy * (tl.load(W + start + cols, mask=mask, other=0.0).to(ACC) + offset)
    return tl.where(mask, (x - mean) * rstd, 0.0), wdy, mask


@triton.jit
def _row_norm_bwd_dx_chunked_kernel(
    X, W, DY, DX, Mean, Rstd,
    stride_x, stride_dy, stride_dx, N, offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Rows too wide for registers: pass 1 reduces the two row sums, pass 2 writes dx
    # (re-reading the row, mostly from L2).
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(Rstd + r)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean + r)
    s1 = tl.zeros((BLOCK_N,), dtype=ACC)
    s2 = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        xhat, wdy, mask = _chunk_xhat_wdy(X, W, DY, r, stride_x, stride_dy, start, cols, N, mean, rstd, offset,
                                          HAS_W, ACC)
        s1 += xhat * wdy
        s2 += wdy
    c1 = tl.sum(s1, axis=0) / N
    c2 = tl.sum(s2, axis=0) / N
    for start in range(0, N, BLOCK_N):
        xhat, wdy, mask = _chunk_xhat_wdy(X, W, DY, r, stride_x, stride_dy, start, cols, N, mean, rstd, offset,
                                          HAS_W, ACC)
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + r * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _row_norm_bwd_dwdb_kernel(
    X, DY, Mean, Rstd, DW_part, DB_part,   # partials: (row groups, N)
    stride_x, stride_dy, M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (column tiles, row groups): each program sums dy * xhat and dy over its rows
    # for one column tile, so any N fits in registers.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    mask = cols < N
    dw_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    row_start = group.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(ACC)
            if IS_RMS:
                xhat = x * tl.load(Rstd + r)
            else:
                xhat = (x - tl.load(Mean + r)) * tl.load(Rstd + r)
            dw_acc += dy * xhat
        if HAS_B:
            db_acc += dy
    if HAS_W:
        tl.store(DW_part + group.to(tl.int64) * N + cols, dw_acc, mask=mask)
    if HAS_B:
        tl.store(DB_part + group.to(tl.int64) * N + cols, db_acc, mask=mask)


def row_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                 is_rms: bool, offset: float = 0.0):
    """x: (M, N) with unit column stride. Returns (y, mean, rstd); mean is empty for RMS."""
    M, N = x.shape
    acc = acc_torch_dtype(x.dtype)
    y = empty((M, N), dtype=x.dtype, device=x.device)
    mean = empty((0,) if is_rms else (M,), dtype=acc, device=x.device)
    rstd = empty((M,), dtype=acc, device=x.device)
    if M == 0 or N == 0:
        return y, mean, rstd
    block_m, block, single, warps = row_norm_config(N, x.device, x.dtype)
    _row_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean if not is_rms else rstd,
        rstd, x.stride(0), y.stride(0), M, N, float(eps), float(offset),
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, SINGLE_TILE=single,
        ACC=acc_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block, num_warps=warps)
    return y, mean, rstd


def row_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
                 mean: torch.Tensor, rstd: torch.Tensor, is_rms: bool, offset: float = 0.0):
    """Returns (dx, dweight or None, dbias or None); dweight/dbias in the weight's dtype."""
    M, N = x.shape
    has_w = weight is not None
    dx = empty((M, N), dtype=x.dtype, device=x.device)
    p_dtype = acc_torch_dtype(x.dtype)
    w_dtype = weight.dtype if has_w else x.dtype
    if M == 0 or N == 0:
        zeros = torch.zeros(N, dtype=w_dtype, device=x.device)
        return dx, (zeros if has_w else None), (zeros.clone() if has_bias else None)
    block_m, block, single, warps = row_norm_config(N, x.device, x.dtype)
    acc = acc_dtype(x.dtype)
    mean_arg = mean if not is_rms else rstd
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if single:
        programs = persistent_programs(x.device, triton.cdiv(M, block_m))
        rows_per = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
        programs = triton.cdiv(M, rows_per)
        dw_part = empty((programs, N) if has_w else (0,), dtype=p_dtype, device=x.device)
        db_part = empty((programs, N) if has_bias else (0,), dtype=p_dtype, device=x.device)
        _row_norm_bwd_fused_kernel[(programs,)](
            x, weight if has_w else x, dy, dx, mean_arg, rstd, dw_part if has_w else rstd,
            db_part if has_bias else rstd, x.stride(0), dy.stride(0), dx.stride(0), M, N, rows_per, float(offset),
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, ACC=acc, BLOCK_M=block_m, BLOCK_N=block,
            num_warps=warps)
    else:
        _row_norm_bwd_dx_chunked_kernel[(M,)](
            x, weight if has_w else x, dy, dx, mean_arg, rstd, x.stride(0), dy.stride(0), dx.stride(0), N,
            float(offset), IS_RMS=is_rms, HAS_W=has_w, ACC=acc, BLOCK_N=block, num_warps=warps)
        if not (has_w or has_bias):
            return dx, None, None
        col_tiles = triton.cdiv(N, block)
        groups = max(1, min(persistent_programs(x.device, M * col_tiles) // col_tiles, M))
        rows_per = triton.cdiv(M, groups)
        groups = triton.cdiv(M, rows_per)
        dw_part = empty((groups, N) if has_w else (0,), dtype=p_dtype, device=x.device)
        db_part = empty((groups, N) if has_bias else (0,), dtype=p_dtype, device=x.device)
        _row_norm_bwd_dwdb_kernel[(col_tiles, groups)](
            x, dy, mean_arg, rstd, dw_part if has_w else rstd, db_part if has_bias else rstd,
            x.stride(0), dy.stride(0), M, N, rows_per,
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, ACC=acc, BLOCK_N=block, num_warps=warps)
    dw = dw_part.sum(0).to(w_dtype) if has_w else None
    db = db_part.sum(0).to(w_dtype) if has_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# group_norm. x is (B, C, S) contiguous (S = product of spatial dims); a group is Cg = C/G
# consecutive channel planes of S elements. Per-plane reductions run on 2-D tiles of
# BLOCK_P planes x BLOCK_S elements, so S = 1 (features) and S = 64*64 (UNet maps) both
# fill the tile; the tiny (B, C) results are merged per group with Chan's formula in torch.
# Normalize and dx are flat elementwise kernels, fully parallel even at batch 1.
# ----------------------------------------------------------------------------------------

def group_norm_config(planes: int, S: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_S, BLOCK, num_warps): plane-tile shape for the reductions and block for
    the elementwise kernels; the one place group_norm launch shapes are chosen. float64: half
    the reduction tile (2048 float64 values spilled in the SiLU backward reduction)."""
    gpu = _common.gpu_launch(device)
    tile = 4096 if not gpu else (1024 if dtype == torch.float64 else 2048)
    block_s = min(next_pow2(S), tile)
    block_p = max(1, min(next_pow2(planes), tile // block_s))
    return block_p, block_s, (4096 if not gpu else 1024), 4


@triton.jit
def _plane_stats_kernel(
    X, Mean_c, M2_c,     # X: (P, S) planes; Mean_c, M2_c: (P,) per-plane mean and sum of squared deviations
    P, S, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    planes = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = planes < P
    offs = tl.arange(0, BLOCK_S)
    # Per-lane Welford across the S chunks, then Chan's merge across lanes.
    cnt = tl.zeros((BLOCK_P, BLOCK_S), dtype=ACC)
    lane_mean = tl.zeros((BLOCK_P, BLOCK_S), dtype=ACC)
    lane_m2 = tl.zeros((BLOCK_P, BLOCK_S), dtype=ACC)
    for start in range(0, S, BLOCK_S):
        mask = pmask[:, None] & ((start + offs) < S)[None, :]
        x = tl.load(X + planes[:, None] * S + start + offs[None, :], mask=mask, other=0.0).to(ACC)
        new_cnt = cnt + tl.where(mask, 1.0, 0.0)
        delta = x - lane_mean
        lane_mean += tl.where(mask, delta / tl.maximum(new_cnt, 1.0), 0.0)
        lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
        cnt = new_cnt
    mean = tl.sum(lane_mean * cnt, axis=1) / S
    d = lane_mean - mean[:, None]
    tl.store(Mean_c + planes, mean, mask=pmask)
    tl.store(M2_c + planes, tl.sum(lane_m2, axis=1) + tl.sum(cnt * d * d, axis=1), mask=pmask)


@triton.jit
def _group_norm_apply_kernel(
    X, Y, W, B,          # X, Y: (B*C*S,) flat; W, B: (C,)
    Mean_g, Rstd_g,      # (B*G,)
    numel, C, S, Cg,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    plane = offs // S                 # b * C + c
    c = plane % C
    grp = plane // Cg                 # b * G + c // Cg, since groups are Cg consecutive planes
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = (x - tl.load(Mean_g + grp, mask=mask, other=0.0)) * tl.load(Rstd_g + grp, mask=mask, other=0.0)
    if HAS_W:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(ACC)
    if SILU:
        y = act_fwd(y, _SILU, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_reduce_kernel(
    X, DY, W, B, Mean_g, Rstd_g,
    SumDz, SumDzXhat,    # (P,): per plane sum(dz) and sum(dz * xhat), dz = grad before the affine
    P, C, S, Cg,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    planes = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = planes < P
    c = planes % C
    grp = planes // Cg
    mean = tl.load(Mean_g + grp, mask=pmask, other=0.0)[:, None]
    rstd = tl.load(Rstd_g + grp, mask=pmask, other=0.0)[:, None]
    if HAS_W:
        w = tl.load(W + c, mask=pmask, other=0.0).to(ACC)[:, None]
    else:
        w = 1.0
    if HAS_B:
        b = tl.load(B + c, mask=pmask, other=0.0).to(ACC)[:, None]
    else:
        b = 0.0
    offs = tl.arange(0, BLOCK_S)
    s_dz = tl.zeros((BLOCK_P, BLOCK_S), dtype=ACC)
    s_dzx = tl.zeros((BLOCK_P, BLOCK_S), dtype=ACC)
    for start in range(0, S, BLOCK_S):
        mask = pmask[:, None] & ((start + offs) < S)[None, :]
        ptrs = planes[:, None] * S + start + offs[None, :]
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(DY + ptrs, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        if SILU:
            dz = dz * act_grad(xhat * w + b, _SILU, 0.0)
        s_dz += tl.where(mask, dz, 0.0)
        s_dzx += tl.where(mask, dz * xhat, 0.0)
    tl.store(SumDz + planes, tl.sum(s_dz, axis=1), mask=pmask)
    tl.store(SumDzXhat + planes, tl.sum(s_dzx, axis=1), mask=pmask)


@triton.jit
def _group_norm_bwd_dx_kernel(
    X, DY, DX, W, B, Mean_g, Rstd_g,
    C1, C2,              # (B*G,): mean over the group of w*dz*xhat and of w*dz
    numel, C, S, Cg,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    plane = offs // S
    c = plane % C
    grp = plane // Cg
    rstd = tl.load(Rstd_g + grp, mask=mask, other=0.0)
    xhat = (tl.load(X + offs, mask=mask, other=0.0).to(ACC) - tl.load(Mean_g + grp, mask=mask, other=0.0)) * rstd
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(ACC)
    else:
        w = 1.0
    if SILU:
        if HAS_B:
            b = tl.load(B + c, mask=mask, other=0.0).to(ACC)
        else:
            b = 0.0
        dz = dz * act_grad(xhat * w + b, _SILU, 0.0)
    dx = (dz * w - tl.load(C2 + grp, mask=mask, other=0.0) - xhat * tl.load(C1 + grp, mask=mask, other=0.0)) * rstd
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, silu: bool):
    """x: (B, C, S) contiguous. Returns (y, mean, rstd) with mean/rstd of shape (B*G,)."""
    Bn, C, S = x.shape
    G, Cg = num_groups, C // num_groups
    P, numel = Bn * C, x.numel()
    acc = acc_torch_dtype(x.dtype)
    block_p, block_s, block, warps = group_norm_config(P, S, x.device, x.dtype)
    mean_c = empty((P,), dtype=acc, device=x.device)
    m2_c = empty((P,), dtype=acc, device=x.device)
    _plane_stats_kernel[(triton.cdiv(P, block_p),)](
        x, mean_c, m2_c, P, S, ACC=acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_S=block_s, num_warps=warps)
    # Chan's merge of Cg equal-sized planes per group: exact and stable.
    mean_c, m2_c = mean_c.view(Bn, G, Cg), m2_c.view(Bn, G, Cg)
    mean_g = mean_c.mean(-1)
    m2_g = m2_c.sum(-1) + S * ((mean_c - mean_g.unsqueeze(-1)) ** 2).sum(-1)
    rstd_g = torch.rsqrt(m2_g / (Cg * S) + eps)
    mean_g, rstd_g = mean_g.reshape(-1).contiguous(), rstd_g.reshape(-1).contiguous()
    y = empty((Bn, C, S), dtype=x.dtype, device=x.device)
    _group_norm_apply_kernel[(triton.cdiv(numel, block),)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean_g, rstd_g,
        numel, C, S, Cg, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return y, mean_g, rstd_g


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, silu: bool):
    """Returns (dx, dweight or None, dbias or None). Reads x and dy twice (reduce, then dx)."""
    Bn, C, S = x.shape
    G, Cg = num_groups, C // num_groups
    P, numel = Bn * C, x.numel()
    acc = acc_torch_dtype(x.dtype)
    block_p, block_s, block, warps = group_norm_config(P, S, x.device, x.dtype)
    has_w, has_b = weight is not None, bias is not None
    dy = dy.contiguous()
    w_arg, b_arg = (weight if has_w else x), (bias if has_b else x)
    sum_dz = empty((P,), dtype=acc, device=x.device)
    sum_dzx = empty((P,), dtype=acc, device=x.device)
    _group_norm_bwd_reduce_kernel[(triton.cdiv(P, block_p),)](
        x, dy, w_arg, b_arg, mean, rstd, sum_dz, sum_dzx, P, C, S, Cg,
        HAS_W=has_w, HAS_B=has_b, SILU=silu, ACC=acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_S=block_s,
        num_warps=warps)
    sum_dz, sum_dzx = sum_dz.view(Bn, C), sum_dzx.view(Bn, C)
    w = weight.to(acc) if has_w else torch.ones(C, dtype=acc, device=x.device)
    c1 = (sum_dzx * w).view(Bn, G, Cg).sum(-1).reshape(-1) / (Cg * S)
    c2 = (sum_dz * w).view(Bn, G, Cg).sum(-1).reshape(-1) / (Cg * S)
    dx = empty((Bn, C, S), dtype=x.dtype, device=x.device)
    _group_norm_bwd_dx_kernel[(triton.cdiv(numel, block),)](
        x, dy, dx, w_arg, b_arg, mean, rstd, c1.contiguous(), c2.contiguous(), numel, C, S, Cg,
        HAS_W=has_w, HAS_B=has_b, SILU=silu, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    dw = sum_dzx.sum(0).to(weight.dtype) if has_w else None
    db = sum_dz.sum(0).to(bias.dtype) if has_b else None
    return dx, dw, db
