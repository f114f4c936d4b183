"""Rotary position embedding: y = x rotated pairwise by angles pos * inv_freq, fwd and bwd.

x: (B, H, S, D) as a strided view (unit stride on D), so (B, S, H, D) storage needs no copy.
cos / sin: a table (positions, R/2) indexed by seqlen_offset + s or by position_ids[b, s],
or per-token (B, S, R/2) values. The first R dims of each head rotate, the rest pass through.
Pairs are (d, d + R/2) in the half-split convention (GPT-NeoX, Llama) or (2d, 2d + 1)
interleaved (GPT-J, the original RoFormer). The backward is the rotation by -angle: the
same kernel with sin negated (CONJ). Math in float32 (float64 for float64 input).

FULL tables hold R entries a position, one per rotated dim, as Hugging Face's rotary
embeddings build them (cat((freqs, freqs)) or repeat_interleave): pair (i1, i2) computes
y1 = x1 c[i1] - x2 s[i1], y2 = x2 c[i2] + x1 s[i2], exactly transformers' rotate_half form,
so the tables need not repeat (HF passes them as they are: no slicing copy, no check that
costs a host sync). That map is not a rotation when the halves differ; its backward is the
transpose, y1 = x1 c[i1] + x2 s[i2], y2 = x2 c[i2] - x1 s[i1] (CONJ), which for repeated
halves is again the rotation by -angle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import empty_like_layout, next_pow2


@triton.jit
def _rope_kernel(
    X, Y, COS, SIN, POS,            # x / y (B, H, S, D) strided; cos / sin see module docstring; POS (B, S) int64
    sxb, sxh, sxs, syb, syh, sys,   # strides of x and y (unit stride on D)
    scb, scs, spb, sps,             # cos/sin batch and row strides (batch 0 for a table); position_ids strides
    H, S, D, R_HALF, offset, P,     # R_HALF = rotary dims / 2; offset = seqlen_offset (tables without POS);
                                    # P = table positions (a position outside [0, P) reads nothing: NaN rows)
    CONJ: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, FULL: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R_HALF
    mask = s_ok[:, None] & r_ok[None, :]
    if HAS_POS:
        rows = tl.load(POS + b * spb + s * sps, mask=s_ok, other=0)
        # position_ids come from the user: checked on the host for CPU tensors, but checking a
        # CUDA tensor would cost a device-to-host sync per call. An out-of-range position reads
        # no memory and gives a NaN row instead (as cross-entropy does with a bad class).
        pos_ok = (rows >= 0) & (rows < P)
        rows = tl.where(pos_ok, rows, 0)
    else:
        rows = (s + offset).to(tl.int64)
    if INTERLEAVED:
        i1 = 2 * r[None, :]
        i2 = i1 + 1
    else:
        i1 = r[None, :]
        i2 = i1 + R_HALF
    c_row = b * scb + rows[:, None] * scs
    if FULL:
        c1 = tl.load(COS + c_row + i1, mask=mask, other=1.0).to(tl.float32)
        c2 = tl.load(COS + c_row + i2, mask=mask, other=1.0).to(tl.float32)
        s1 = tl.load(SIN + c_row + i1, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_row + i2, mask=mask, other=0.0).to(tl.float32)
    else:
        c1 = tl.load(COS + c_row + r[None, :], mask=mask, other=1.0).to(tl.float32)
        s1 = tl.load(SIN + c_row + r[None, :], mask=mask, other=0.0).to(tl.float32)
        c2 = c1
        s2 = s1
    if HAS_POS:
        c1 = tl.where(pos_ok[:, None], c1, float("nan"))
        c2 = tl.where(pos_ok[:, None], c2, float("nan"))
    if X.dtype.element_ty == tl.float64:
        c1 = c1.to(tl.float64)
        c2 = c2.to(tl.float64)
        s1 = s1.to(tl.float64)
        s2 = s2.to(tl.float64)
    # y1 = x1 c1 - x2 sa, y2 = x2 c2 + x1 sb; the backward (CONJ) is the transpose of that map.
    if CONJ:
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    x_row = X + b * sxb + h * sxh + s.to(tl.int64)[:, None] * sxs
    y_row = Y + b * syb + h * syh + s.to(tl.int64)[:, None] * sys
    ACC: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x1 = tl.load(x_row + i1, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_row + i2, mask=mask, other=0.0).to(ACC)
    tl.store(y_row + i1, (x1 * c1 - x2 * sa).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + i2, (x2 * c2 + x1 * sb).to(Y.dtype.element_ty), mask=mask)
    if BLOCK_P > 0:
        # Dims past the rotary part are copied (partial rotary, e.g. GPT-NeoX rotary_pct).
        p = 2 * R_HALF + tl.arange(0, BLOCK_P)
        pmask = s_ok[:, None] & (p[None, :] < D)
        tl.store(y_row + p[None, :], tl.load(x_row + p[None, :], mask=pmask), mask=pmask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None,
         seqlen_offset: int, interleaved: bool, conj: bool, full: bool = False) -> torch.Tensor:
    """x (B, H, S, D) view -> y with x's layout. cos/sin (P, R/2) table or (B, S, R/2); with
    full, (P, R) or (B, S, R) (one entry per rotated dim)."""
    B, H, S, D = x.shape
    r_half = cos.shape[-1] // 2 if full else cos.shape[-1]
    y = empty_like_layout(x, D)
    if x.numel() == 0:
        return y
    if cos.dim() == 3:
        scb, scs = cos.stride(0), cos.stride(1)
    else:
        scb, scs = 0, cos.stride(0)
    pos = position_ids if position_ids is not None else cos
    spb, sps = (position_ids.stride(0), position_ids.stride(1)) if position_ids is not None else (0, 0)
    rest = D - 2 * r_half
    gpu = _common.gpu_launch(x.device)
    # 1024 (row, pair) elements a program on a GPU: 8 a thread, each with x1, x2, cos, sin and
    # a 64-bit table offset live (2048 spilled in fp16); the interpreter prefers big tiles.
    # Full tables load two cos and two sin values a pair: half the tile keeps the same registers.
    block_s = max(1, min(next_pow2(S), ((512 if full else 1024) if gpu else 8192) // next_pow2(r_half)))
    _rope_kernel[(triton.cdiv(S, block_s), B * H)](
        x, y, cos, sin, pos, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        scb, scs, spb, sps, H, S, D, r_half, seqlen_offset, cos.shape[0] if cos.dim() == 2 else S,
        CONJ=conj, INTERLEAVED=interleaved, HAS_POS=position_ids is not None, FULL=full,
        BLOCK_S=block_s, BLOCK_R=next_pow2(r_half), BLOCK_P=next_pow2(rest) if rest > 0 else 0,
        num_warps=4)
    return y
