"""Convolution as implicit GEMM: conv2d forward with a fused epilogue, its input gradient
(dgrad) and weight gradient (wgrad). conv_transpose2d and conv1d are the same kernels with
the roles swapped (see fastnets/ops/conv.py).

No im2col buffer exists in memory: each program gathers its (BLOCK_M x BLOCK_K) tile of the
virtual im2col matrix straight from the input, with out-of-image taps masked to zero, and
multiplies it with a (BLOCK_K x BLOCK_N) weight tile on the tensor cores.

GEMM views (per group g; M rows, N columns, K reduction):
- forward: M = batch*P*Q output pixels, N = Kg output channels, K = (r, s, Cg input channels).
  The reduction walks the taps (r, s) outermost and channels innermost, so with a
  channels_last input every row of the gathered tile is a contiguous run of channels.
- dgrad:   M = batch*H*W input pixels, N = Cg input channels, K = (r, s, Kg output channels);
  an input pixel h takes output row p only where (h + pad - r*dil) is a multiple of the
  stride (masked otherwise).
- wgrad:   M = Kg output channels, N = Cg*R*S weight columns (torch's (c, r, s) order),
  K = batch*P*Q; the reduction is split over programs (float32 partials summed after, no
  atomics) so small weights still fill the GPU. It also sums dy per output channel: the
  bias gradient, for free from the tiles it already loads.

Every tensor is addressed through its four strides, so NCHW and channels_last (and any
other strided layout) go through the same code; the outputs take the input's layout.
Accumulation is float32 (float64 for float64); fp32 inputs use TF32 exactly when torch's
cuDNN convolutions would (torch.backends.cudnn.allow_tf32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, acc_torch_dtype, empty, memory_format, next_pow2, tuned_launch
from .activation import ACTIVATIONS, act_fwd


@triton.jit
def _swizzle(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    # Programs that run together share weight tiles (same pid_n) and input tiles (nearby
    # pid_m): walk GROUP_M row tiles down a column band before moving right (L2 reuse).
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _conv2d_fwd_kernel(
    X, Wt, Bias, Res, Y, Z,
    batch, H, W, P, Q, Cg, Kg,
    sxn, sxc, sxh, sxw,          # input strides
    swk, swc, swr, sws,          # weight (K, Cg, R, S) strides
    syn, syk, syp, syq,          # output strides (also Z's)
    srn, srk, srp, srq,          # residual strides
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M = batch * P * Q
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N), GROUP_M)
    g = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < Kg
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_rows = X + n * sxn + g.to(tl.int64) * Cg * sxc
    k_glob = g * Kg + offs_n
    w_cols = Wt + k_glob.to(tl.int64) * swk
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r in range(KH):
        h = h0 + r * dil_h
        h_ok = m_mask & (h >= 0) & (h < H)
        for s in range(KW):
            w = w0 + s * dil_w
            row_ok = h_ok & (w >= 0) & (w < W)
            x_ptrs = x_rows + h * sxh + w * sxw
            w_ptrs = w_cols + r * swr + s * sws
            for c0 in range(0, Cg, BLOCK_K):
                c = c0 + offs_k
                c_ok = c < Cg
                xt = tl.load(x_ptrs[:, None] + c[None, :] * sxc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs[None, :] + c[:, None] * swc, mask=c_ok[:, None] & n_mask[None, :], other=0.0)
                acc += tl.dot(xt, wt, input_precision=PRECISION, out_dtype=ACC)
    # Epilogue: everything a ResNet block does after the conv, while the tile is in registers.
    if HAS_BIAS:
        acc += tl.load(Bias + k_glob, mask=n_mask, other=0.0).to(ACC)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        res = tl.load(Res + (n * srn + p * srp + q * srq)[:, None] + k_glob[None, :] * srk, mask=out_mask, other=0.0)
        acc += res.to(ACC)
    y_off = (n * syn + p * syp + q * syq)[:, None] + k_glob[None, :] * syk
    if STORE_Z:
        tl.store(Z + y_off, acc.to(Z.dtype.element_ty), mask=out_mask)
    acc = act_fwd(acc, ACT, slope)
    tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2d_dgrad_kernel(
    DY, Wt, Bias, DX, Z,
    batch, H, W, P, Q, Cg, Kg,
    syn, syk, syp, syq,          # dy strides (the conv's output)
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,          # dx strides (the conv's input)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The epilogue (bias, activation) serves conv_transpose2d, whose forward is this kernel.
    M = batch * H * W
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Cg, BLOCK_N), GROUP_M)
    g = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < Cg
    n = offs_m // (H * W)
    hw = offs_m % (H * W)
    h = hw // W
    w = hw % W
    dy_rows = DY + n * syn + g.to(tl.int64) * Kg * syk
    c_glob = g * Cg + offs_n
    w_cols = Wt + g.to(tl.int64) * Kg * swk + offs_n * swc
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r in range(KH):
        # Output row p reads input row h through tap r iff p*stride = h + pad - r*dil.
        # Clamp before % and // so negative numerators never meet C-vs-Python rounding.
        hp = h + pad_h - r * dil_h
        hp_c = tl.where(hp >= 0, hp, 0)
        p = hp_c // stride_h
        p_ok = m_mask & (hp >= 0) & (hp_c % stride_h == 0) & (p < P)
        for s in range(KW):
            wq = w + pad_w - s * dil_w
            wq_c = tl.where(wq >= 0, wq, 0)
            q = wq_c // stride_w
            row_ok = p_ok & (wq >= 0) & (wq_c % stride_w == 0) & (q < Q)
            dy_ptrs = dy_rows + p * syp + q * syq
            w_ptrs = w_cols + r * swr + s * sws
            for k0 in range(0, Kg, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < Kg
                dyt = tl.load(dy_ptrs[:, None] + k[None, :] * syk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs[None, :] + k[:, None] * swk, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
                acc += tl.dot(dyt, wt, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(Bias + c_glob, mask=n_mask, other=0.0).to(ACC)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    x_off = (n * sxn + h * sxh + w * sxw)[:, None] + c_glob[None, :] * sxc
    if STORE_Z:
        tl.store(Z + x_off, acc.to(Z.dtype.element_ty), mask=out_mask)
    acc = act_fwd(acc, ACT, slope)
    tl.store(DX + x_off, acc.to(DX.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2d_wgrad_kernel(
    DY, X, DWp, DBp,             # DWp: (splits, K, Cg*KH*KW) partials; DBp: (splits, K)
    batch, H, W, P, Q, Cg, Kg, K_total, rows_per_split, splits,
    syn, syk, syp, syq,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_DB: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    CRS = Cg * KH * KW
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(Kg, BLOCK_M), tl.cdiv(CRS, BLOCK_N), GROUP_M)
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)       # output channel within the group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)       # (c, r, s) weight column
    m_mask = offs_m < Kg
    n_mask = offs_n < CRS
    c = offs_n // (KH * KW)
    r = (offs_n % (KH * KW)) // KW
    s = offs_n % KW
    k_glob = g * Kg + offs_m
    dy_cols = DY + k_glob.to(tl.int64) * syk
    x_cols = X + (g * Cg + c).to(tl.int64) * sxc
    h_tap = r * dil_h - pad_h
    w_tap = s * dil_w - pad_w
    PQ = P * Q
    rows = batch * PQ
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, rows)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    for t0 in range(start, end, BLOCK_K):
        t = t0 + offs_k
        t_ok = t < end
        n = t // PQ
        pq = t % PQ
        p = pq // Q
        q = pq % Q
        dyt = tl.load(dy_cols[:, None] + (n * syn + p * syp + q * syq)[None, :],
                      mask=m_mask[:, None] & t_ok[None, :], other=0.0)
        h = (p * stride_h)[:, None] + h_tap[None, :]
        w = (q * stride_w)[:, None] + w_tap[None, :]
        x_ok = t_ok[:, None] & n_mask[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        xt = tl.load(x_cols[None, :] + (n * sxn)[:, None] + h * sxh + w * sxw, mask=x_ok, other=0.0)
        acc += tl.dot(dyt, xt, input_precision=PRECISION, out_dtype=ACC)
        if HAS_DB:
            db += tl.sum(dyt.to(ACC), axis=1)
    part = DWp + split.to(tl.int64) * K_total * CRS
    tl.store(part + k_glob[:, None].to(tl.int64) * CRS + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(DBp + split.to(tl.int64) * K_total + k_glob, db, mask=m_mask)


# --- launch configuration ------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _block_k(reduce_channels: int, cap: int) -> int:
    # tl.dot needs >= 16 along every dim; a 3-channel stem conv should not pad to 64.
    return max(16, min(cap, next_pow2(reduce_channels)))


def gemm_configs(device: torch.device, rows: int, cols: int, red_channels: int, dtype: torch.dtype) -> list[dict]:
    """Candidate tiles for an implicit GEMM with `rows` x `cols` outputs whose reduction runs
    over `red_channels` per tap. The GPU list spans tall, wide and square tiles (tuned_launch
    picks by timing); the interpreter gets one large tile, since it runs programs serially."""
    if not _common.gpu_launch(device):
        # The interpreter's cost is per loop iteration and program, nearly flat in tile size.
        return [dict(BLOCK_M=max(16, min(256, next_pow2(rows))), BLOCK_N=max(16, min(256, next_pow2(cols))),
                     BLOCK_K=_block_k(red_channels, 128), GROUP_M=8, num_warps=4)]
    wide = dtype == torch.float64 or dtype == torch.float32
    cands = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
             (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
    if wide:  # 4- and 8-byte elements: halve the K tile so stages fit in shared memory
        cands = [(bm, bn, bk // 2, w, min(st, 3)) for bm, bn, bk, w, st in cands[:5]]
    out, seen = [], set()
    for bm, bn, bk, warps, stages in cands:
        bn = max(16, min(bn, next_pow2(cols)))
        bm = max(16, min(bm, next_pow2(rows)))
        bk = _block_k(red_channels, bk)
        if (bm, bn, bk) in seen:
            continue
        seen.add((bm, bn, bk))
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages))
    return out


def _bucket(v: int) -> int:
    return next_pow2(v)


def _act_id(activation: str) -> int:
    return ACTIVATIONS[activation]


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def output_like(x: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new (N, C, H, W) tensor in x's memory format: channels_last in, channels_last out."""
    return empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format(x))


# --- launchers ------------------------------------------------------------------------------

def conv2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
               out_hw: tuple[int, int], activation: str, slope: float, store_z: bool):
    """y = act(conv2d(x, weight) + bias + residual). padding is the top/left pad (the
    bottom/right pad is implied by out_hw). Returns (y, z) where z is the pre-activation
    (written only when store_z, else an empty tensor)."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = weight.shape
    G = groups
    Kg = K // G
    P, Q = out_hw
    y = output_like(x, (N, K, P, Q))
    z = output_like(x, (N, K, P, Q)) if store_z else x.new_empty((0,))
    M = N * P * Q
    if M == 0 or K == 0:
        return y, z
    if Cg * KH * KW == 0:  # no input channels: the conv is just the epilogue
        y.zero_()
    res = residual if residual is not None else y
    configs = gemm_configs(x.device, M, Kg, Cg, x.dtype)
    key = (_bucket(M), Kg, Cg, KH, KW, stride, G > 1, str(x.dtype), x.is_contiguous())
    tuned_launch(
        _conv2d_fwd_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(Kg, c["BLOCK_N"]), G),
        configs, key, x.device,
        x, weight, bias if bias is not None else weight, res, y, z if store_z else y,
        N, H, W, P, Q, Cg, Kg, *_strides4(x), *_strides4(weight), *_strides4(y), *_strides4(res),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=_act_id(activation),
        STORE_Z=store_z, ACC=acc_dtype(x.dtype), PRECISION=_precision(x.dtype))
    return y, z


def conv2d_dgrad(dy: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, int, int, int],
                 stride, padding, dilation, groups: int, bias: torch.Tensor | None = None,
                 activation: str = "identity", slope: float = 0.0, store_z: bool = False, like: torch.Tensor | None = None):
    """dx of conv2d (= conv_transpose2d's forward, with its optional bias + activation
    epilogue). Output layout follows `like` (default dy). Returns (dx, z)."""
    N, C, H, W = input_shape
    K, Cg, KH, KW = weight.shape
    G = groups
    Kg = K // G
    _, _, P, Q = dy.shape
    like = dy if like is None else like
    dx = output_like(like, (N, C, H, W), dy.dtype)
    z = output_like(like, (N, C, H, W), dy.dtype) if store_z else dy.new_empty((0,))
    M = N * H * W
    if M == 0 or C == 0:
        return dx, z
    configs = gemm_configs(dy.device, M, Cg, Kg, dy.dtype)
    key = (_bucket(M), Kg, Cg, KH, KW, tuple(stride), G > 1, str(dy.dtype), dy.is_contiguous())
    tuned_launch(
        _conv2d_dgrad_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(Cg, c["BLOCK_N"]), G),
        configs, key, dy.device,
        dy, weight, bias if bias is not None else weight, dx, z if store_z else dx,
        N, H, W, P, Q, Cg, Kg, *_strides4(dy), *_strides4(weight), *_strides4(dx),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, ACT=_act_id(activation), STORE_Z=store_z,
        ACC=acc_dtype(dy.dtype), PRECISION=_precision(dy.dtype))
    return dx, z


def _wgrad_splits(device: torch.device, tiles: int, rows: int, block_k: int) -> int:
    """Split the batch*P*Q reduction so tiles * splits fills the GPU twice over, keeping at
    least 8 BLOCK_K steps per program (fewer would make the partials dominate)."""
    if not _common.gpu_launch(device):
        return 1
    want = triton.cdiv(_common.persistent_programs(device, 1 << 30, per_sm=2), max(1, tiles))
    return max(1, min(want, rows // (8 * block_k)))


def conv2d_wgrad(dy: torch.Tensor, x: torch.Tensor, weight_shape: tuple[int, int, int, int],
                 stride, padding, dilation, groups: int, need_bias: bool, out_dtype: torch.dtype):
    """(dweight, dbias or None): dweight in out_dtype, reduced in float32 partials."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = weight_shape
    G = groups
    Kg = K // G
    _, _, P, Q = dy.shape
    CRS = Cg * KH * KW
    rows = N * P * Q
    acc = acc_torch_dtype(dy.dtype)
    if rows == 0 or CRS == 0 or K == 0:
        return (torch.zeros(weight_shape, dtype=out_dtype, device=x.device),
                torch.zeros((K,), dtype=out_dtype, device=x.device) if need_bias else None)
    configs = gemm_configs(dy.device, Kg, CRS, 64 if _common.gpu_launch(dy.device) else rows, dy.dtype)
    # Tiles and split count depend on the config, and partial buffers on the split count: take
    # the split from the first config and keep it for every candidate.
    c0 = configs[0]
    tiles = triton.cdiv(Kg, c0["BLOCK_M"]) * triton.cdiv(CRS, c0["BLOCK_N"]) * G
    splits = _wgrad_splits(dy.device, tiles, rows, c0["BLOCK_K"])
    rows_per = triton.cdiv(triton.cdiv(rows, splits), 64) * 64
    splits = triton.cdiv(rows, rows_per)
    dw_part = empty((splits, K, CRS), dtype=acc, device=x.device)
    db_part = empty((splits, K), dtype=acc, device=x.device) if need_bias else dw_part
    key = (_bucket(rows), Kg, Cg, KH, KW, tuple(stride), G > 1, str(dy.dtype), splits)
    tuned_launch(
        _conv2d_wgrad_kernel, lambda c: (triton.cdiv(Kg, c["BLOCK_M"]) * triton.cdiv(CRS, c["BLOCK_N"]), G * splits),
        configs, key, dy.device,
        dy, x, dw_part, db_part, N, H, W, P, Q, Cg, Kg, K, rows_per, splits,
        *_strides4(dy), *_strides4(x), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, HAS_DB=need_bias, ACC=acc_dtype(dy.dtype), PRECISION=_precision(dy.dtype))
    dw = (dw_part[0] if splits == 1 else dw_part.sum(0)).view(weight_shape).to(out_dtype)
    db = (db_part[0] if splits == 1 else db_part.sum(0)).to(out_dtype) if need_bias else None
    return dw, db
