"""Convolution as implicit GEMM: conv2d forward with a fused epilogue, its input gradient
(dgrad) and weight gradient (wgrad). conv_transpose2d and conv1d are the same kernels with
the roles swapped (see fastnets/ops/conv.py).

No im2col buffer exists in memory: each program gathers its (BLOCK_M x BLOCK_K) tile of the
virtual im2col matrix straight from the input, with out-of-image taps masked to zero, and
multiplies it with a (BLOCK_K x BLOCK_N) weight tile on the tensor cores.

GEMM views (per group g; M rows, N columns, K reduction):
- forward: M = batch*P*Q output pixels, N = Kg output channels, K = (r, s, Cg input channels).
- dgrad:   M = batch*H*W input pixels, N = Cg input channels, K = (r, s, Kg output channels);
  an input pixel h takes output row p only where (h + pad - r*dil) is a multiple of the
  stride (masked otherwise).
- wgrad:   one GEMM per tap (r, s): M = Kg output channels, N = Cg input channels,
  K = batch*P*Q output pixels; the reduction is split over programs (float32 partials
  summed after, no atomics) so small weights still fill the GPU. It also sums dy per output
  channel: the bias gradient, for free from the tiles it already loads.
The forward and dgrad reductions run as one flat loop over (tap, channel block), so the
software pipeline keeps loads in flight across taps.

Layout: the kernels address every tensor through its four strides, but the launchers hand
them NHWC activations and (K, R, S, C) weights (see "layout" below), so channels are
contiguous and every tile row loads as vectors. Outputs are returned in the input's layout.
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
def _tap(it, c_blocks, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduction step `it` of the flattened (tap, channel block) loop: (r, s, c0)."""
    if KH * KW == 1:
        # A 1x1 kernel's (K, C, 1, 1) weight has degenerate tap strides (often 1): keep the
        # tap offset a literal 0, so the compiler still sees 16-byte aligned weight rows.
        return 0, 0, it * BLOCK_K
    tap = it // c_blocks
    return tap // KW, tap % KW, (it - tap * c_blocks) * BLOCK_K


@triton.jit
def _conv2d_fwd_kernel(
    X, Wt, Bias, Res, Y, Z,
    batch, H, W, P, Q, Cg, Kg,
    sxn, sxc, sxh, sxw,          # input strides (the launcher passes NHWC: sxc == 1)
    swk, swc, swr, sws,          # weight (K, Cg, R, S) strides (the launcher passes (K, R, S, Cg) storage: swc == 1)
    syn, syk, syp, syq,          # output strides (also Z's; NHWC)
    srn, srk, srp, srq,          # residual strides (NHWC)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M = batch * P * Q
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N), GROUP_M)
    g = tl.program_id(1)
    # Pixel and channel indices are int32 (the launcher checks that batch*P*Q and one image
    # fit); only the image offset n * sxn is int64, once per row, outside the loop.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < Kg
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_rows = X + (n.to(tl.int64) * sxn + g.to(tl.int64) * Cg * sxc)
    k_glob = g * Kg + offs_n
    w_cols = Wt + k_glob.to(tl.int64) * swk
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat loop over (tap, channel block), so the software pipeline overlaps the loads
    # of the next tap with the MMAs of this one even when Cg fits one block (64 channels).
    c_blocks = tl.cdiv(Cg, BLOCK_K)
    for it in range(0, KH * KW * c_blocks):
        r, s, c0 = _tap(it, c_blocks, KH, KW, BLOCK_K)
        h = h0 + r * dil_h
        w = w0 + s * dil_w
        row_ok = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c = c0 + offs_k
        c_ok = c < Cg
        # NHWC: each row of the A tile is a contiguous run of channels (vector loads).
        xt = tl.load(x_rows[:, None] + (h * sxh + w * sxw)[:, None] + c[None, :] * sxc,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + (r * swr + s * sws) + c[:, None] * swc,
                     mask=c_ok[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision=PRECISION, out_dtype=ACC)
    # Epilogue: everything a ResNet block does after the conv, while the tile is in registers.
    if HAS_BIAS:
        acc += tl.load(Bias + k_glob, mask=n_mask, other=0.0).to(ACC)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    n64 = n.to(tl.int64)
    if HAS_RES:
        res = tl.load(Res + (n64 * srn + p * srp + q * srq)[:, None] + k_glob[None, :] * srk, mask=out_mask,
                      other=0.0)
        acc += res.to(ACC)
    y_off = (n64 * syn + p * syp + q * syq)[:, None] + k_glob[None, :] * syk
    if STORE_Z:
        tl.store(Z + y_off, acc.to(Z.dtype.element_ty), mask=out_mask)
    acc = act_fwd(acc, ACT, slope)
    tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2d_dgrad_kernel(
    DY, Wt, Bias, DX, Z,
    batch, H, W, P, Q, Cg, Kg,
    syn, syk, syp, syq,          # dy strides (the conv's output; NHWC)
    swk, swc, swr, sws,          # weight strides ((K, R, S, Cg) storage: swc == 1)
    sxn, sxc, sxh, sxw,          # dx strides (the conv's input; NHWC)
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < Cg
    n = offs_m // (H * W)
    hw = offs_m % (H * W)
    h = hw // W
    w = hw % W
    dy_rows = DY + (n.to(tl.int64) * syn + g.to(tl.int64) * Kg * syk)
    c_glob = g * Cg + offs_n
    w_cols = Wt + (g.to(tl.int64) * Kg * swk + offs_n * swc)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_blocks = tl.cdiv(Kg, BLOCK_K)
    for it in range(0, KH * KW * k_blocks):
        r, s, k0 = _tap(it, k_blocks, KH, KW, BLOCK_K)
        # Output row p reads input row h through tap r iff p*stride = h + pad - r*dil.
        # Clamp before % and // so negative numerators never meet C-vs-Python rounding.
        hp = h + pad_h - r * dil_h
        wq = w + pad_w - s * dil_w
        hp_c = tl.where(hp >= 0, hp, 0)
        wq_c = tl.where(wq >= 0, wq, 0)
        p = hp_c // stride_h
        q = wq_c // stride_w
        row_ok = (m_mask & (hp >= 0) & (hp_c - p * stride_h == 0) & (p < P)
                  & (wq >= 0) & (wq_c - q * stride_w == 0) & (q < Q))
        k = k0 + offs_k
        k_ok = k < Kg
        dyt = tl.load(dy_rows[:, None] + (p * syp + q * syq)[:, None] + k[None, :] * syk,
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + (r * swr + s * sws) + k[:, None] * swk,
                     mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(dyt, wt, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(Bias + c_glob, mask=n_mask, other=0.0).to(ACC)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    x_off = (n.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + c_glob[None, :] * sxc
    if STORE_Z:
        tl.store(Z + x_off, acc.to(Z.dtype.element_ty), mask=out_mask)
    acc = act_fwd(acc, ACT, slope)
    tl.store(DX + x_off, acc.to(DX.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2d_wgrad_kernel(
    DY, X, DWp, DBp,             # DWp: (splits, K, R, S, Cg) float32 partials; DBp: (splits, K)
    batch, H, W, P, Q, Cg, Kg, K_total, rows_per_split, splits,
    syn, syk, syp, syq,          # dy strides (NHWC: syk == 1)
    sxn, sxc, sxh, sxw,          # x strides (NHWC: sxc == 1)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_DB: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # One GEMM per tap (r, s): dW[k, r, s, c] = sum over output pixels t of
    # dy[t, k] * x[pixel(t) shifted by the tap, c]. The tap is fixed per program, so both
    # tiles are plain NHWC rows (channels contiguous) with one validity bit per pixel.
    c_tiles = tl.cdiv(Cg, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(Kg, BLOCK_M), KH * KW * c_tiles, GROUP_M)
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    tap = pid_n // c_tiles
    r = tap // KW
    s = tap % KW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                # output channel within the group
    offs_n = (pid_n - tap * c_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    m_mask = offs_m < Kg
    n_mask = offs_n < Cg
    k_glob = g * Kg + offs_m
    dy_cols = DY + k_glob.to(tl.int64) * syk
    x_cols = X + (g * Cg + offs_n).to(tl.int64) * sxc
    h_tap = r * dil_h - pad_h
    w_tap = s * dil_w - pad_w
    PQ = P * Q
    rows = batch * PQ
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    for t0 in range(start, end, BLOCK_K):
        t = t0 + offs_k
        t_ok = t < end
        n = t // PQ
        pq = t - n * PQ
        p = pq // Q
        q = pq - p * Q
        n64 = n.to(tl.int64)
        dyt = tl.load(dy_cols[:, None] + (n64 * syn + p * syp + q * syq)[None, :],
                      mask=m_mask[:, None] & t_ok[None, :], other=0.0)
        h = p * stride_h + h_tap
        w = q * stride_w + w_tap
        x_ok = t_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        xt = tl.load(x_cols[None, :] + (n64 * sxn + h * sxh + w * sxw)[:, None],
                     mask=x_ok[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(dyt, xt, input_precision=PRECISION, out_dtype=ACC)
        if HAS_DB:
            db += tl.sum(dyt.to(ACC), axis=1)
    part = DWp + split.to(tl.int64) * K_total * KH * KW * Cg
    tl.store(part + ((k_glob[:, None] * KH + r) * KW + s) * Cg + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(DBp + split.to(tl.int64) * K_total + k_glob, db, mask=m_mask)


# --- launch configuration ------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    return _common.float32_precision(dtype, device, torch.backends.cudnn.allow_tf32)


def _block_k(reduce_channels: int, cap: int) -> int:
    # tl.dot needs >= 16 along every dim; a 3-channel stem conv should not pad to 64.
    return max(16, min(cap, next_pow2(reduce_channels)))


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Tensor-core tiles for fp16/bf16 (wgmma on
# Hopper: 64 accumulator rows per warpgroup); TF32 halves the K tile (4-byte elements, same
# shared memory). fp32 without TF32 and fp64 run the dot on FMA units, where a 128x128 fp32
# accumulator alone is 128 registers a thread: small tiles, and fp64 (gradcheck) one tile.
_TC_TILES = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
             (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3))
_TF32_TILES = ((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3))
# The FMA and fp64 tiles are the ones ptxas compiles without a spill for every shape the static
# report drives, under Triton 3.9 and 3.6 (it spills a few bytes at 80-170 registers for some
# others, e.g. 64x64x16 on 4 warps, or 64x64x32 dgrad under Triton 3.6).
_FMA_TILES = {"fwd": ((128, 64, 16, 8, 2), (64, 64, 32, 4, 3), (32, 32, 32, 4, 2)),
              "dgrad": ((128, 64, 16, 8, 2), (32, 32, 32, 4, 2)),
              "wgrad": ((64, 64, 32, 8, 2), (64, 32, 32, 4, 2), (32, 32, 32, 4, 2))}
_FP64_TILES = {"fwd": ((32, 32, 16, 4, 2),), "dgrad": ((32, 32, 16, 4, 2),), "wgrad": ((32, 16, 16, 4, 2),)}
SMEM_LIMIT = 232448   # bytes of shared memory one CTA may use on Hopper (sm_90)


def gemm_configs(kind: str, device: torch.device, rows: int, cols: int, red_channels: int, dtype: torch.dtype,
                 heavy_epilogue: bool = False) -> list[dict]:
    """Candidate tiles for an implicit GEMM with `rows` x `cols` outputs whose reduction runs
    over `red_channels` per tap. The GPU list spans tall, wide and square tiles (tuned_launch
    picks by timing), clipped to the problem and pruned to what fits in shared memory; the
    interpreter gets one large tile, since it runs programs serially. kind: fwd, dgrad or wgrad.

    heavy_epilogue (a residual tile, a second output or a transcendental activation): at
    most 64 accumulator registers a thread. A 128-register accumulator (128x128 on one
    warpgroup, 128x256 on two) leaves no room for the epilogue's extra tile and spills
    (the static report shows 40-670 B a thread); a plain epilogue fits beside it."""
    if not _common.gpu_launch(device):
        # The interpreter's cost is per loop iteration and program, nearly flat in tile size.
        return [dict(BLOCK_M=max(16, min(256, next_pow2(rows))), BLOCK_N=max(16, min(256, next_pow2(cols))),
                     BLOCK_K=_block_k(red_channels, 128), GROUP_M=8, num_warps=4)]
    if dtype == torch.float64:
        cands = _FP64_TILES[kind]
    elif dtype == torch.float32:
        cands = _TF32_TILES if _precision(dtype, device) == "tf32" else _FMA_TILES[kind]
    else:
        cands = _TC_TILES
    size = torch.empty((), dtype=dtype).element_size()
    out, seen = [], set()
    for bm, bn, bk, warps, stages in cands:
        bn = max(16, min(bn, next_pow2(cols)))
        bm = max(16, min(bm, next_pow2(rows)))
        bk = _block_k(red_channels, bk)
        if (bm, bn, bk) in seen or stages * (bm + bn) * bk * size > SMEM_LIMIT:
            continue
        if heavy_epilogue and bm * bn > 64 * 32 * warps:
            continue
        seen.add((bm, bn, bk))
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages))
    return out


def _bucket(v: int) -> int:
    return next_pow2(v)


_LIGHT_ACTIVATIONS = ("identity", "relu", "leaky_relu")


def _act_id(activation: str) -> int:
    return ACTIVATIONS[activation]


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


# --- layout ----------------------------------------------------------------------------------
# The kernels read and write NHWC activations and (K, R, S, C) weights: channels are the
# GEMM reduction (or output) axis, so with unit channel stride every tile row is a
# contiguous run that loads as 16-byte vectors through cp.async. A tensor in another layout
# (NCHW, PyTorch's default) is converted once around the kernel, as cuDNN does for NCHW
# tensor-core convolutions; a model moved to channels_last (weights included, as
# `model.to(memory_format=torch.channels_last)` does) pays no conversion at all. Gathering
# NCHW tiles in the kernel instead costs scalar 2-byte loads that cannot go through
# cp.async, and the register-staged pipeline then spills (21.9 KB a thread, issue #9).

def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is dense NHWC (channels_last), else an NHWC copy."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def _as_layout(t: torch.Tensor, like_format: torch.memory_format) -> torch.Tensor:
    return t if like_format == torch.channels_last else t.contiguous()


def _nhwc_out(x: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=torch.channels_last)


def output_like(x: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new (N, C, H, W) tensor in x's memory format: channels_last in, channels_last out."""
    return empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format(x))


_INT32 = 2**31


def _check_int32(what: str, *sizes: int) -> None:
    """The kernels index pixels and one image in int32 (the batch offset is int64)."""
    for size in sizes:
        if size >= _INT32:
            raise ValueError(f"{what}: a single image or the batch's pixel count has {size} elements, more than the "
                             f"2^31 - 1 the conv kernels index in 32 bits; split the batch")


# --- launchers ------------------------------------------------------------------------------

def conv2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
               out_hw: tuple[int, int], activation: str, slope: float, store_z: bool):
    """y = act(conv2d(x, weight) + bias + residual). padding is the top/left pad (the
    bottom/right pad is implied by out_hw). Returns (y, z) in x's memory format, where z is
    the pre-activation (written only when store_z, else an empty tensor)."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = weight.shape
    G = groups
    Kg = K // G
    P, Q = out_hw
    fmt = memory_format(x)
    M = N * P * Q
    if M == 0 or K == 0:
        y = output_like(x, (N, K, P, Q))
        return y, (output_like(x, (N, K, P, Q)) if store_z else x.new_empty((0,)))
    _check_int32("conv2d", M, C * H * W, K * P * Q)
    x, weight = _nhwc(x), _nhwc(weight)
    residual = _nhwc(residual) if residual is not None else None
    y = _nhwc_out(x, (N, K, P, Q))
    z = _nhwc_out(x, (N, K, P, Q)) if store_z else x.new_empty((0,))
    if Cg * KH * KW == 0:  # no input channels: the conv is just the epilogue
        y.zero_()
    res = residual if residual is not None else y
    heavy = residual is not None or store_z or activation not in _LIGHT_ACTIVATIONS
    configs = gemm_configs("fwd", x.device, M, Kg, Cg, x.dtype, heavy)
    key = (_bucket(M), Kg, Cg, KH, KW, stride, G > 1, str(x.dtype), _precision(x.dtype, x.device), heavy)
    tuned_launch(
        _conv2d_fwd_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(Kg, c["BLOCK_N"]), G),
        configs, key, x.device,
        x, weight, bias if bias is not None else weight, res, y, z if store_z else y,
        N, H, W, P, Q, Cg, Kg, *_strides4(x), *_strides4(weight), *_strides4(y), *_strides4(res),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=_act_id(activation),
        STORE_Z=store_z, ACC=acc_dtype(x.dtype), PRECISION=_precision(x.dtype, x.device))
    return _as_layout(y, fmt), (_as_layout(z, fmt) if store_z else z)


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
    fmt = memory_format(dy if like is None else like)
    M = N * H * W
    if M == 0 or C == 0:
        dx = output_like(dy if like is None else like, (N, C, H, W), dy.dtype)
        return dx, (torch.empty_like(dx) if store_z else dy.new_empty((0,)))
    _check_int32("conv2d (input gradient)", M, C * H * W, K * P * Q)
    dy, weight = _nhwc(dy), _nhwc(weight)
    dx = _nhwc_out(dy, (N, C, H, W))
    z = _nhwc_out(dy, (N, C, H, W)) if store_z else dy.new_empty((0,))
    heavy = store_z or activation not in _LIGHT_ACTIVATIONS
    configs = gemm_configs("dgrad", dy.device, M, Cg, Kg, dy.dtype, heavy)
    key = (_bucket(M), Kg, Cg, KH, KW, tuple(stride), G > 1, str(dy.dtype), _precision(dy.dtype, dy.device), heavy)
    tuned_launch(
        _conv2d_dgrad_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(Cg, c["BLOCK_N"]), G),
        configs, key, dy.device,
        dy, weight, bias if bias is not None else weight, dx, z if store_z else dx,
        N, H, W, P, Q, Cg, Kg, *_strides4(dy), *_strides4(weight), *_strides4(dx),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(slope),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, ACT=_act_id(activation), STORE_Z=store_z,
        ACC=acc_dtype(dy.dtype), PRECISION=_precision(dy.dtype, dy.device))
    return _as_layout(dx, fmt), (_as_layout(z, fmt) if store_z else z)


def _wgrad_splits(device: torch.device, tiles: int, rows: int, block_k: int) -> int:
    """Split the batch*P*Q reduction so tiles * splits fills the GPU twice over, keeping at
    least 8 BLOCK_K steps per program (fewer would make the partials dominate)."""
    if not _common.gpu_launch(device):
        return 1
    want = triton.cdiv(_common.persistent_programs(device, 1 << 30, per_sm=2), max(1, tiles))
    return max(1, min(want, rows // (8 * block_k)))


def conv2d_wgrad(dy: torch.Tensor, x: torch.Tensor, weight_shape: tuple[int, int, int, int],
                 stride, padding, dilation, groups: int, need_bias: bool, out_dtype: torch.dtype,
                 weight_format: torch.memory_format = torch.contiguous_format):
    """(dweight, dbias or None): dweight in out_dtype and in weight_format (the weight's own
    layout, so it matches the custom op's fake implementation, torch.empty_like(weight)),
    reduced in float32 partials."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = weight_shape
    G = groups
    Kg = K // G
    _, _, P, Q = dy.shape
    rows = N * P * Q
    acc = acc_torch_dtype(dy.dtype)
    if rows == 0 or Cg * KH * KW == 0 or K == 0:
        return (torch.zeros(weight_shape, dtype=out_dtype, device=x.device, memory_format=weight_format),
                torch.zeros((K,), dtype=out_dtype, device=x.device) if need_bias else None)
    _check_int32("conv2d (weight gradient)", rows, C * H * W, K * P * Q)
    dy, x = _nhwc(dy), _nhwc(x)
    # The reduction runs over output pixels: BLOCK_K from the GPU list, not from channels.
    configs = gemm_configs("wgrad", dy.device, Kg, Cg, 64 if _common.gpu_launch(dy.device) else rows, dy.dtype)
    # Tiles and split count depend on the config, and partial buffers on the split count: take
    # the split from the first config and keep it for every candidate.
    c0 = configs[0]
    tiles = triton.cdiv(Kg, c0["BLOCK_M"]) * triton.cdiv(Cg, c0["BLOCK_N"]) * KH * KW * G
    splits = _wgrad_splits(dy.device, tiles, rows, c0["BLOCK_K"])
    rows_per = triton.cdiv(triton.cdiv(rows, splits), 64) * 64
    splits = triton.cdiv(rows, rows_per)
    dw_part = empty((splits, K, KH, KW, Cg), dtype=acc, device=x.device)
    db_part = empty((splits, K), dtype=acc, device=x.device) if need_bias else dw_part
    key = (_bucket(rows), Kg, Cg, KH, KW, tuple(stride), G > 1, str(dy.dtype), _precision(dy.dtype, dy.device), splits)
    tuned_launch(
        _conv2d_wgrad_kernel,
        lambda c: (triton.cdiv(Kg, c["BLOCK_M"]) * triton.cdiv(Cg, c["BLOCK_N"]) * KH * KW, G * splits),
        configs, key, dy.device,
        dy, x, dw_part, db_part, N, H, W, P, Q, Cg, Kg, K, rows_per, splits,
        *_strides4(dy), *_strides4(x), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, HAS_DB=need_bias, ACC=acc_dtype(dy.dtype), PRECISION=_precision(dy.dtype, dy.device))
    dw = (dw_part[0] if splits == 1 else dw_part.sum(0)).permute(0, 3, 1, 2)   # (K, Cg, R, S), NHWC strides
    dw = dw.to(dtype=out_dtype, memory_format=weight_format)
    db = (db_part[0] if splits == 1 else db_part.sum(0)).to(out_dtype) if need_bias else None
    return dw, db
