"""2-D pooling: max / average, fixed windows or adaptive, forward and backward.

Forward: one lane per output element, in the output's memory order (so NCHW and
channels_last outputs are both written contiguously); each lane loops over the window's
taps (a compile-time bound) with out-of-window taps masked. Max pooling writes the argmax
as torch does (flat h * W + w within the plane, int64), takes the first maximum, and lets a
NaN win, like torch.

Backward is a gather, not a scatter: one lane per input element loops over the few output
windows that can contain it (ceil(window / stride) per dim) and sums their gradient --
for max pooling where the saved index points at this element, for average pooling divided
by that window's divisor. No atomics, so the result is deterministic in every dtype, and
dx is written exactly once (no zero-fill pass). Chosen over recomputing the argmax in the
backward: the int64 indices cost one extra read, the recomputation a window of reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty, memory_format


@triton.jit
def _decompose(offs, C, P, Q, CL: tl.constexpr):
    # Flat memory offset -> (n, c, p, q) in NCHW or NHWC order.
    if CL:
        c = offs % C
        t = offs // C
        q = t % Q
        t = t // Q
        p = t % P
        n = t // P
    else:
        q = offs % Q
        t = offs // Q
        p = t % P
        t = t // P
        c = t % C
        n = t // C
    return n, c, p, q


@triton.jit
def _window(p, P, H, k, s, pad, ADAPTIVE: tl.constexpr):
    # First row of output p's window and its end (exclusive): adaptive windows are
    # [floor(p*H/P), ceil((p+1)*H/P)); fixed windows start at p*stride - pad.
    if ADAPTIVE:
        start = (p * H) // P
        end = ((p + 1) * H + P - 1) // P
    else:
        start = p * s - pad
        end = start + k
    return start, end


@triton.jit
def _avg_divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor,
                 ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, HAS_DIV: tl.constexpr):
    # torch's avg_pool2d: the window is clipped to the padded input for count_include_pad,
    # to the input otherwise; divisor_override wins over both.
    if HAS_DIV:
        d = hs * 0 + divisor
    elif ADAPTIVE:
        d = (he - hs) * (we - ws)
    elif COUNT_PAD:
        d = (tl.minimum(he, H + pad_h) - hs) * (tl.minimum(we, W + pad_w) - ws)
    else:
        d = (tl.minimum(he, H) - tl.maximum(hs, 0)) * (tl.minimum(we, W) - tl.maximum(ws, 0))
    return d


@triton.jit
def _pool2d_fwd_kernel(
    X, Y, Idx, total, C, H, W, P, Q,
    sxn, sxc, sxh, sxw,
    kh, kw, sh, sw, pad_h, pad_w, dil_h, dil_w, divisor,
    IS_MAX: tl.constexpr, ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, HAS_DIV: tl.constexpr,
    STORE_IDX: tl.constexpr, CL: tl.constexpr, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, p, q = _decompose(offs, C, P, Q, CL)
    hs, he = _window(p, P, H, kh, sh, pad_h, ADAPTIVE)
    ws, we = _window(q, Q, W, kw, sw, pad_w, ADAPTIVE)
    base = X + n * sxn + c * sxc
    if IS_MAX:
        best = tl.full((BLOCK,), float("-inf"), ACC)
        idx = tl.full((BLOCK,), -1, tl.int64)
    else:
        acc = tl.zeros((BLOCK,), ACC)
    for i in range(TAPS_H):
        if ADAPTIVE:
            h = hs + i
            h_ok = h < he
        else:
            h = hs + i * dil_h
            h_ok = (h >= 0) & (h < H) & (h < hs + kh * dil_h)
        for j in range(TAPS_W):
            if ADAPTIVE:
                w = ws + j
                ok = mask & h_ok & (w < we)
            else:
                w = ws + j * dil_w
                ok = mask & h_ok & (w >= 0) & (w < W) & (w < ws + kw * dil_w)
            v = tl.load(base + h * sxh + w * sxw, mask=ok, other=0.0).to(ACC)
            if IS_MAX:
                take = ok & ((v > best) | (v != v) | (idx < 0))
                best = tl.where(take, v, best)
                idx = tl.where(take, h * W + w, idx)
            else:
                acc += v
    if IS_MAX:
        tl.store(Y + offs, best.to(Y.dtype.element_ty), mask=mask)
        if STORE_IDX:
            tl.store(Idx + offs, idx, mask=mask)
    else:
        d = _avg_divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor, ADAPTIVE, COUNT_PAD, HAS_DIV)
        tl.store(Y + offs, (acc / tl.where(mask, d, 1)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _first_window(h, H, P, k, s, pad, dil, ADAPTIVE: tl.constexpr):
    # The lowest output index whose window can contain input row h.
    if ADAPTIVE:
        lo = (h * P) // H
    else:
        num = h + pad - (k - 1) * dil
        num = tl.where(num > 0, num, 0)
        lo = (num + s - 1) // s
    return lo


@triton.jit
def _pool2d_bwd_kernel(
    DY, Idx, DX, total, C, H, W, P, Q,
    syn, syc, syp, syq,          # dy strides (Idx shares them)
    kh, kw, sh, sw, pad_h, pad_w, dil_h, dil_w, divisor,
    IS_MAX: tl.constexpr, ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, HAS_DIV: tl.constexpr,
    CL: tl.constexpr, CAND_H: tl.constexpr, CAND_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, h, w = _decompose(offs, C, H, W, CL)
    p0 = _first_window(h, H, P, kh, sh, pad_h, dil_h, ADAPTIVE)
    q0 = _first_window(w, W, Q, kw, sw, pad_w, dil_w, ADAPTIVE)
    base = n * syn + c * syc
    acc = tl.zeros((BLOCK,), ACC)
    for i in range(CAND_H):
        p = p0 + i
        hs, he = _window(p, P, H, kh, sh, pad_h, ADAPTIVE)
        if IS_MAX:
            p_ok = p < P
        else:
            p_ok = (p < P) & (h >= hs) & (h < he)
        for j in range(CAND_W):
            q = q0 + j
            ws, we = _window(q, Q, W, kw, sw, pad_w, ADAPTIVE)
            if IS_MAX:
                ok = mask & p_ok & (q < Q)
            else:
                ok = mask & p_ok & (q < Q) & (w >= ws) & (w < we)
            off = base + p * syp + q * syq
            g = tl.load(DY + off, mask=ok, other=0.0).to(ACC)
            if IS_MAX:
                hit = ok & (tl.load(Idx + off, mask=ok, other=-1) == h * W + w)
                acc += tl.where(hit, g, 0.0)
            else:
                d = _avg_divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor, ADAPTIVE, COUNT_PAD, HAS_DIV)
                acc += tl.where(ok, g / tl.where(ok, d, 1), 0.0)  # masked lanes: no 0/0
    tl.store(DX + offs, acc.to(DX.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

def _block(device: torch.device) -> tuple[int, int]:
    return (512, 4) if _common.gpu_launch(device) else (4096, 4)


def pool2d_fwd(x: torch.Tensor, out_hw, kernel, stride, padding, dilation, *, is_max: bool, adaptive: bool,
               count_include_pad: bool = True, divisor_override: int | None = None, store_idx: bool = False):
    """(y, indices or None). x: (N, C, H, W) NCHW or channels_last; y takes x's layout.
    For adaptive pooling kernel/stride/padding/dilation are ignored."""
    N, C, H, W = x.shape
    P, Q = out_hw
    fmt = memory_format(x)
    y = empty((N, C, P, Q), dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = (torch.empty((N, C, P, Q), dtype=torch.int64, device=x.device, memory_format=fmt)
           if store_idx else None)
    total = y.numel()
    if total == 0:
        return y, idx
    if adaptive:
        taps = (-(-H // P) + 1, -(-W // Q) + 1)
        kernel, stride, padding, dilation = (1, 1), (1, 1), (0, 0), (1, 1)
    else:
        taps = kernel
    block, warps = _block(x.device)
    _pool2d_fwd_kernel[(triton.cdiv(total, block),)](
        x, y, idx if idx is not None else y, total, C, H, W, P, Q, *x.stride(),
        kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        divisor_override or 0,
        IS_MAX=is_max, ADAPTIVE=adaptive, COUNT_PAD=count_include_pad, HAS_DIV=divisor_override is not None,
        STORE_IDX=store_idx, CL=fmt == torch.channels_last, TAPS_H=taps[0], TAPS_W=taps[1],
        ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return y, idx


def pool2d_bwd(dy: torch.Tensor, idx: torch.Tensor | None, x_shape, channels_last: bool, kernel, stride, padding,
               dilation, *, is_max: bool, adaptive: bool, count_include_pad: bool = True,
               divisor_override: int | None = None):
    """dx of shape x_shape (channels_last or NCHW). dy and idx are made to share a layout."""
    N, C, H, W = x_shape
    P, Q = dy.shape[2:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = empty((N, C, H, W), dtype=dy.dtype, device=dy.device, memory_format=fmt)
    if dx.numel() == 0:
        return dx
    if is_max:
        idx_fmt = memory_format(idx)
        dy = dy.contiguous(memory_format=idx_fmt)
        idx = idx.contiguous(memory_format=idx_fmt)
    if adaptive:
        cand = (-(-P // H) + 1, -(-Q // W) + 1)
        kernel, stride, padding, dilation = (1, 1), (1, 1), (0, 0), (1, 1)
    else:
        cand = tuple(-(-((kernel[i] - 1) * dilation[i] + 1) // stride[i]) for i in range(2))
    block, warps = _block(dy.device)
    _pool2d_bwd_kernel[(triton.cdiv(dx.numel(), block),)](
        dy, idx if idx is not None else dy, dx, dx.numel(), C, H, W, P, Q, *dy.stride(),
        kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        divisor_override or 0,
        IS_MAX=is_max, ADAPTIVE=adaptive, COUNT_PAD=count_include_pad, HAS_DIV=divisor_override is not None,
        CL=fmt == torch.channels_last, CAND_H=cand[0], CAND_W=cand[1],
        ACC=acc_dtype(dy.dtype), BLOCK=block, num_warps=warps)
    return dx
