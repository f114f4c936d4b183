"""upfirdn2d: upsample by zero insertion, pad (or crop), 2-D FIR filter, downsample, in one
gather pass; and the lrelu epilogues that make filtered_lrelu out of two such passes.

Per output pixel o (each axis alike), with u the zero-inserted input (u[j] = x[j / U] when
U divides j, else 0) and g the correlation filter (the caller folds flip and gain into it):

    y[o] = sum_k g[k] * u[o * D + k - p0]

Only the taps that land on a non-zero of u are visited (polyphase): for output row o the
first one is k = r = (p0 - o D) mod U, then every U-th, so a 4-tap filter upsampling by 2
reads 2 x 2 inputs per output, not 4 x 4. Those reads hit L1 / L2 (neighbouring outputs
share inputs), so DRAM sees one read of x and one write of y: memory-bound, like a copy.

The backward of a pass is another pass (the adjoint swaps U and D and flips g), so one
kernel serves forward and backward. Epilogues (constexpr):
    0  y
    1  clamp(lrelu(y, slope) * gain, +-clamp)             (filtered_lrelu's activation)
    2  y * gain * lrelu'(s) * [|s| < clamp], s = SAVED     (its backward, s the stored output)
A per-channel bias can be added to x as it is read (filtered_lrelu's bias: only real
samples carry it, the inserted zeros do not).
Math in float32 (float64 for float64 inputs); NCHW contiguous planes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty

EPILOGUES = {"none": 0, "lrelu": 1, "lrelu_bwd": 2}


@triton.jit
def _polyphase(o, DOWN: tl.constexpr, UP: tl.constexpr, p0):
    """(first tap, first input index) for output positions o along one axis."""
    base = o * DOWN - p0                     # u index of tap 0
    r = (UP - base % UP) % UP                # first tap with base + k divisible by UP (C-style %)
    return r, (base + r) // UP               # base + r is an exact multiple: truncation is exact


@triton.jit
def _upfirdn2d_kernel(
    X, G, Bias, Saved, Y,        # X: (P, H, W); G: (KH, KW) correlation filter; Bias: (C,); Saved / Y: (P, OH, OW)
    C, H, W, OH, OW, px0, py0, slope, gain, clamp,
    UPX: tl.constexpr, UPY: tl.constexpr, DOWNX: tl.constexpr, DOWNY: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Planes on grid axis 0 (N * C can pass axis 1's 65535); tiles of one plane on axis 1.
    plane = tl.program_id(0).to(tl.int64)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    ty = tl.program_id(1) // tiles_w
    tx = tl.program_id(1) - ty * tiles_w
    oy = ty * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = tx * BLOCK_W + tl.arange(0, BLOCK_W)
    out_mask = (oy < OH)[:, None] & (ox < OW)[None, :]
    ry, iy0 = _polyphase(oy, DOWNY, UPY, py0)
    rx, ix0 = _polyphase(ox, DOWNX, UPX, px0)
    x_plane = X + plane * H * W
    if HAS_BIAS:
        b = tl.load(Bias + plane % C).to(ACC)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=ACC)
    # Dynamic loops, not unrolled: unrolled, the compiler hoists every tap's two gathers
    # ahead of the sums and a 12 x 12 filter spills kilobytes (the static report).
    for ty_ in range((KH + UPY - 1) // UPY):
        ky = ry + ty_ * UPY
        iy = iy0 + ty_
        ok_y = (ky < KH) & (iy >= 0) & (iy < H) & (oy < OH)
        for tx_ in range((KW + UPX - 1) // UPX):
            kx = rx + tx_ * UPX
            ix = ix0 + tx_
            ok_x = (kx < KW) & (ix >= 0) & (ix < W) & (ox < OW)
            ok = ok_y[:, None] & ok_x[None, :]
            g = tl.load(G + ky[:, None] * KW + kx[None, :], mask=ok, other=0.0)
            v = tl.load(x_plane + iy[:, None] * W + ix[None, :], mask=ok, other=0.0).to(ACC)
            if HAS_BIAS:
                v = tl.where(ok, v + b, 0.0)
            acc += g.to(ACC) * v
    y_offs = plane * OH * OW + oy[:, None] * OW + ox[None, :]
    if EPILOGUE == 1:
        # NaN falls through both comparisons and stays NaN, as torch's clamp keeps it.
        acc = tl.where(acc < 0, acc * slope, acc) * gain
        acc = tl.where(acc > clamp, clamp, tl.where(acc < -clamp, -clamp, acc))
    elif EPILOGUE == 2:
        s = tl.load(Saved + y_offs, mask=out_mask, other=0.0).to(ACC)
        # s > 0 exactly where the pre-activation was > 0 (gain > 0); lrelu'(0) = slope, as torch.
        # |s| = clamp is taken as clamped (the pre-clamp value is not kept).
        acc = acc * gain
        acc = tl.where(s > 0, acc, acc * slope)
        acc = tl.where(tl.abs(s) < clamp, acc, 0.0)
    tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=out_mask)


def _tile(OH: int, OW: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps): 64 columns give each row segment whole 128-byte lines of
    fp16 output (256 bytes of fp32); 16 rows on 4 warps give every thread 8 outputs, each
    tap's loads independent of the others' so the L1 latencies overlap."""
    if not _common.gpu_launch(device):
        return min(16, _common.next_pow2(OH)), min(16, _common.next_pow2(OW)), 4
    return 16, 64, 4


def upfirdn2d(x: torch.Tensor, g: torch.Tensor, up: tuple[int, int], down: tuple[int, int],
              pad0: tuple[int, int], out_hw: tuple[int, int], *, bias: torch.Tensor | None = None,
              epilogue: str = "none", saved: torch.Tensor | None = None, slope: float = 0.2, gain: float = 1.0,
              clamp: float | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: (N, C, H, W) contiguous; g: (KH, KW) correlation filter in the accumulator dtype,
    contiguous; up / down: (y, x) factors; pad0: (py0, px0), the top / left padding
    (negative crops); out_hw: (OH, OW). Returns (N, C, OH, OW)."""
    N, C, H, W = x.shape
    OH, OW = out_hw
    KH, KW = g.shape
    y = empty((N, C, OH, OW), dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.numel() == 0:
        return y.zero_()
    bh, bw, warps = _tile(OH, OW, x.device)
    grid = (N * C, triton.cdiv(OH, bh) * triton.cdiv(OW, bw))
    _upfirdn2d_kernel[grid](
        x, g, bias if bias is not None else x, saved if saved is not None else x, y,
        C, H, W, OH, OW, int(pad0[1]), int(pad0[0]), float(slope), float(gain),
        float("inf") if clamp is None else float(clamp),
        UPX=int(up[1]), UPY=int(up[0]), DOWNX=int(down[1]), DOWNY=int(down[0]), KH=KH, KW=KW,
        HAS_BIAS=bias is not None, EPILOGUE=EPILOGUES[epilogue], ACC=acc_dtype(x.dtype),
        BLOCK_H=bh, BLOCK_W=bw, num_warps=warps)
    return y
