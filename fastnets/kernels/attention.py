"""Flash attention: exact softmax(q k^T * scale + bias) v, never materialising the (seq x seq)
matrix. Forward, backward (dq; dk + dv; the delta preprocessing), and a split-key decode path.

Layout and indexing
- q: (B, Hq, Sq, D), k: (B, Hk, Sk, D), v: (B, Hk, Sk, DV) given as strided views (any
  order of the first three dims, unit stride on the last), so (B, S, H, D) storage needs no
  copy. Packed variable-length batches use (total, H, D) with cu_seqlens: the batch stride is
  0 and sequence b starts at row cu_seqlens[b]; everything else is the same code.
- GQA / MQA: q head h reads k/v head h // (Hq // Hk); nothing is copied. The dk/dv kernel
  sums the group's contributions in registers, so no atomics.
- Scores live in base-2 units: s2 = (q.k) * scale * log2(e), so exp2 is the one
  transcendental in the inner loop. The saved LSE is base-2 too (LSE2 = m + log2(l)).
- Which keys a query row i sees is one rule for causal, sliding window and both causal
  alignments: j in [i + off - left, i + off + right], off = Sk - Sq for bottom-right
  alignment else 0, right = 0 when causal, edges of 1 << 30 mean unbounded. Key blocks
  entirely inside the band run without any index masking (_block_ranges); only the blocks
  crossing an edge pay for it.
- Fully masked rows (every key excluded) output zeros; their LSE is stored as +inf so the
  backward's exp2(s - LSE) is 0 for them as well.
- Dropout: keep(i, j) = philox(seed, ((b*Hq + h)*Sq_max + i)*Sk_max + j) >= p, the same
  counter in forward and backward, so the backward regenerates the forward's mask.

Accumulation is float32 (float64 for float64 inputs); P is rounded to v's dtype before the
P @ V product as every flash kernel does.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common
from ._common import empty, empty_like_layout, next_pow2, tuned_launch

LOG2E = 1.4426950408889634
# Mask kinds (constexpr ids).
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# --- shared device helpers ---------------------------------------------------------------------

@triton.jit
def _block_ranges(start, BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, other_len, off, left, right):
    """For a tile of BLOCK rows starting at `start`, the other axis' block ranges:
    [lo, full_lo) needs masking, [full_lo, full_hi) is entirely inside the band and the
    sequence (no masks at all), [full_hi, hi) needs masking again. Row r sees columns
    [r + off - left, r + off + right]."""
    lo = tl.maximum(start + off - left, 0) // BLOCK_O * BLOCK_O
    hi = tl.minimum(other_len, start + BLOCK + off + right)
    hi = tl.maximum(hi, lo)
    full_lo = (tl.maximum(start + BLOCK - 1 + off - left, 0) + BLOCK_O - 1) // BLOCK_O * BLOCK_O
    full_hi = tl.minimum(other_len, start + off + right + 1) // BLOCK_O * BLOCK_O
    none_full = full_lo >= full_hi
    full_lo = tl.where(none_full, hi, full_lo)
    full_hi = tl.where(none_full, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence(CU_Q, CU_K, b, seqlen_q_max, seqlen_k_max, VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of batch entry b: its rows in a packed batch,
    or the whole (padded) tensors."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_max
        seqlen_k = seqlen_k_max
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D load masked only where a constexpr says the tile can leave the tensor."""
    if CHECK_ROWS:
        if CHECK_COLS:
            t = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            t = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _scores_bias(s, q_pos, q_ok, kv_idx, seqlen_k, left, right, mask_rows, smj, slope, log2e,
                 BOUNDARY: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Apply the band (causal / window / sequence end), attn_mask and ALiBi to base-2 scores
    s (rows = queries, cols = keys). q_pos: query positions already shifted by the causal
    alignment offset; mask_rows: per-row pointers into attn_mask."""
    if BOUNDARY:
        j = kv_idx[None, :]
        keep = (j < seqlen_k) & (j >= q_pos[:, None] - left) & (j <= q_pos[:, None] + right)
        s = tl.where(keep, s, float("-inf"))
    if MASK_KIND != 0:
        mptr = mask_rows[:, None] + kv_idx[None, :] * smj
        mok = q_ok[:, None] & (kv_idx[None, :] < seqlen_k)
        if MASK_KIND == 1:
            mval = tl.load(mptr, mask=mok, other=1)
            s = tl.where(mval != 0, s, float("-inf"))
        else:
            s = s + tl.load(mptr, mask=mok, other=0.0).to(s.dtype) * log2e
    if HAS_ALIBI:
        dist = (q_pos[:, None] - kv_idx[None, :]).to(s.dtype)
        s = s - slope[:, None] * tl.abs(dist)
    return s


@triton.jit
def _dropout_keep(seed, drop_rows, kv_idx, dropout_p):
    """(rows, cols) keep mask; drop_rows are int64 per-row counter bases."""
    return tl.rand(seed, drop_rows[:, None] + kv_idx[None, :]) >= dropout_p


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, lo, hi, q_pos, q_ok, mask_rows, smj, slope, drop_rows, seed,
                sks, svs, seqlen_k, left, right, qk_scale, log2e, dropout_p,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi): the inner loop of the forward and decode kernels."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        kv_idx = start_n + offs_n0
        kv_ok = kv_idx < seqlen_k
        k = _load_tile(k_base + kv_idx[:, None] * sks + offs_d[None, :], kv_ok, offs_d < D, BOUNDARY, BLOCK_D != D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _scores_bias(s, q_pos, q_ok, kv_idx, seqlen_k, left, right, mask_rows, smj, slope, log2e,
                         BOUNDARY, MASK_KIND, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 instead, so exp2 gives
        # 0 rather than NaN (-inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # l keeps the undropped sum: dropout acts on the normalized probabilities.
            p = tl.where(_dropout_keep(seed, drop_rows, kv_idx, dropout_p), p, 0.0)
        v = _load_tile(v_base + kv_idx[:, None] * svs + offs_dv[None, :], kv_ok, offs_dv < DV, BOUNDARY,
                       BLOCK_DV != DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


# --- forward -------------------------------------------------------------------------------------

@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, OUT, LSE,               # q (B,Hq,Sq,D) / k (B,Hk,Sk,D) / v (B,Hk,Sk,DV) / o like q with DV; LSE float32
    MASK, SLOPES, CU_Q, CU_K, SEED,  # optional: attn_mask (broadcast by 0 strides), ALiBi slopes, cu_seqlens, seed
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,   # strides (last dim has stride 1)
    smb, smh, smi, smj, ssb, ssh, slb, slh,   # mask, slopes and LSE strides
    H, GROUP, seqlen_q_max, seqlen_k_max,     # Hq, Hq // Hk, (max) sequence lengths
    SCALES, left, right, dropout_p,           # SCALES: [scale * log2(e), scale, log2(e)] in the accumulator dtype
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, b, seqlen_q_max, seqlen_k_max, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen_q:
        off = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
        b64 = b.to(tl.int64)
        hk64 = (h // GROUP).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ok = offs_m < seqlen_q
        # int64 row offsets: packed varlen batches can exceed 2^31 elements.
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + b64 * sqb + h * sqh + q_rows[:, None] * sqs + offs_d[None, :],
                    mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        k_base = K + b64 * skb + hk64 * skh + k_start.to(tl.int64) * sks
        v_base = V + b64 * svb + hk64 * svh + k_start.to(tl.int64) * svs
        mask_rows = MASK + b64 * smb + h * smh + offs_m.to(tl.int64) * smi
        ACC: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
        s_scale = tl.load(SCALES)
        log2e = tl.load(SCALES + 2)
        slope = tl.zeros([BLOCK_M], dtype=ACC)
        if HAS_ALIBI:
            slope += tl.load(SLOPES + b * ssb + h * ssh).to(ACC) * log2e
        drop_rows = ((bh.to(tl.int64) * seqlen_q_max + offs_m) * seqlen_k_max)
        seed = tl.load(SEED) if DROPOUT else 0
        q_pos = offs_m + off
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
        l_i = tl.zeros([BLOCK_M], dtype=ACC)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        lo, full_lo, full_hi, hi = _block_ranges(m0, BLOCK_M, BLOCK_N, seqlen_k, off, left, right)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, lo, full_lo, q_pos, q_ok, mask_rows, smj,
                                    slope, drop_rows, seed, sks, svs, seqlen_k, left, right, s_scale, log2e, dropout_p,
                                    D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_ALIBI, DROPOUT, PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, full_lo, full_hi, q_pos, q_ok, mask_rows,
                                    smj, slope, drop_rows, seed, sks, svs, seqlen_k, left, right, s_scale,
                                    log2e, dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, MASK_KIND, HAS_ALIBI,
                                    DROPOUT, PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, full_hi, hi, q_pos, q_ok, mask_rows, smj,
                                    slope, drop_rows, seed, sks, svs, seqlen_k, left, right, s_scale, log2e, dropout_p,
                                    D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_ALIBI, DROPOUT, PREC)
        empty_row = l_i == 0.0
        out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - dropout_p))
        lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
        tl.store(OUT + b64 * sob + h * soh + q_rows[:, None] * sos + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=q_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(LSE + b64 * slb + h * slh + q_start + offs_m, lse.to(tl.float32), mask=q_ok)


# --- decode: split the keys across programs, then combine -----------------------------------------

@triton.jit
def _flash_attn_decode_kernel(
    Q, K, V, O_PART, LSE_PART,     # O_PART (B*Hk, SPLITS, ROWS, DV) and LSE_PART (B*Hk, SPLITS, ROWS) float32
    MASK, SLOPES,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    smb, smh, smi, smj, ssb, ssh,
    HK, GROUP, seqlen_q, seqlen_k, keys_per_split, SCALES, left, right,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, PREC: tl.constexpr,
):
    """One program = one key range of one (batch, kv head), for all GROUP * Sq query rows
    that read that kv head: the cache is read once per group, not once per q head.
    Row r is (q head hk*GROUP + r // Sq, query r % Sq)."""
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    splits = tl.num_programs(0)
    b = bhk // HK
    hk = bhk % HK
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    n_rows = GROUP * seqlen_q
    r_ok = rows < n_rows
    h = hk * GROUP + rows // seqlen_q
    i = rows % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * sqb + h[:, None] * sqh + i[:, None] * sqs + offs_d[None, :],
                mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    mask_rows = MASK + b64 * smb + h * smh + i.to(tl.int64) * smi
    qk_scale = tl.load(SCALES)
    log2e = tl.load(SCALES + 2)
    slope = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(SLOPES + b * ssb + h * ssh, mask=r_ok, other=0.0).to(tl.float32) * log2e
    off = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    q_pos = i + off
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seqlen_k)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, lo, hi, q_pos, r_ok, mask_rows, smj, slope,
                                q_pos.to(tl.int64), 0, sks, svs, seqlen_k, left, right, qk_scale, log2e, 0.0,
                                D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_ALIBI, False, PREC)
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    part = bhk.to(tl.int64) * splits + split
    tl.store(O_PART + (part * BLOCK_R + rows[:, None]) * DV + offs_dv[None, :], out,
             mask=r_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_PART + part * BLOCK_R + rows, lse, mask=r_ok)


@triton.jit
def _flash_attn_combine_kernel(
    O_PART, LSE_PART, OUT, LSE,      # partials from the decode kernel; OUT like q with DV; LSE (B, Hq, Sq) float32
    sob, soh, sos, HK, GROUP, seqlen_q, SPLITS,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, ROWS_STRIDE: tl.constexpr,
):
    """One program = one query row: weights each split by exp2(lse_s - max) and renormalizes."""
    bhk = tl.program_id(0)
    r = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    h = hk * GROUP + r // seqlen_q
    i = r % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    part = bhk.to(tl.int64) * SPLITS + offs_s
    lse = tl.load(LSE_PART + part * ROWS_STRIDE + r, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    o = tl.load(O_PART + (part[:, None] * ROWS_STRIDE + r) * DV + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b.to(tl.int64) * sob + h * soh + i * sos + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    lse_out = tl.where(total == 0.0, float("inf"), m + tl.math.log2(tl.where(total == 0.0, 1.0, total)))
    tl.store(LSE + (b * HK * GROUP + h) * seqlen_q + i, lse_out)


# --- backward -------------------------------------------------------------------------------------

@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    OUT, DO, DELTA, CU_Q,            # delta = rowsum(dO * O), float32, laid out as the LSE
    sob, soh, sos, sdb, sdh, sds, slb, slh, H, seqlen_q_max,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        seqlen_q = seqlen_q_max
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = offs_m < seqlen_q
    rows = (q_start + offs_m).to(tl.int64)
    mask = ok[:, None] & (offs_dv[None, :] < DV)
    b64 = b.to(tl.int64)
    o = tl.load(OUT + b64 * sob + h * soh + rows[:, None] * sos + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h * sdh + rows[:, None] * sds + offs_dv[None, :], mask=mask, other=0.0)
    ACC: tl.constexpr = tl.float64 if OUT.dtype.element_ty == tl.float64 else tl.float32
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + b64 * slb + h * slh + q_start + offs_m, delta.to(DELTA.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, SLOPES, q_off, do_off, lse_off, mask_off, h0, GROUP,
                   sqh, sdh, slh, smh, ssh, lo, hi, kv_idx, kv_ok, smi, slope_base, drop_base, seed, sqs, sds,
                   seqlen_q, seqlen_q_max, drop_stride, off, left, right, qk_scale, log2e, dropout_p,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """dk, dv of one key block from query blocks [lo, hi) of each of the GROUP q heads
    h0 .. h0 + GROUP - 1 that read this kv head (GQA). The (head, query block) pairs run as
    one flat loop: the software pipeline streams across heads, and no outer head loop keeps
    a second set of values live around the inner one (that spilled). Scores are kept
    transposed (keys x queries) so dv += P^T dO and dk += dS^T q need no transposes."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        start_m = lo + (it - g * n_blocks) * BLOCK_M
        h = h0 + g
        q_idx = start_m + offs_m0
        q_ok = q_idx < seqlen_q
        q = _load_tile(Q + (q_off + h * sqh) + q_idx[:, None].to(tl.int64) * sqs + offs_d[None, :], q_ok,
                       offs_d < D, BOUNDARY, BLOCK_D != D)
        do = _load_tile(DO + (do_off + h * sdh) + q_idx[:, None].to(tl.int64) * sds + offs_dv[None, :], q_ok,
                        offs_dv < DV, BOUNDARY, BLOCK_DV != DV)
        # Rows past the sequence end get LSE = +inf: their probabilities are exactly 0.
        lse = tl.load(LSE + (lse_off + h * slh) + q_idx, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + (lse_off + h * slh) + q_idx, mask=q_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        # The band and masks, transposed: rows are keys, columns are queries.
        if BOUNDARY:
            qp = q_idx[None, :] + off
            j = kv_idx[:, None]
            keep = q_ok[None, :] & (j >= qp - left) & (j <= qp + right)
            sT = tl.where(keep, sT, float("-inf"))
        if MASK_KIND != 0:
            mptr = MASK + (mask_off + h * smh)[:, None] + q_idx[None, :].to(tl.int64) * smi
            mok = kv_ok[:, None] & q_ok[None, :]
            if MASK_KIND == 1:
                sT = tl.where(tl.load(mptr, mask=mok, other=1) != 0, sT, float("-inf"))
            else:
                sT = sT + tl.load(mptr, mask=mok, other=0.0).to(sT.dtype) * log2e
        if HAS_ALIBI:
            slope = tl.load(SLOPES + slope_base + h * ssh).to(sT.dtype) * log2e
            dist = (q_idx[None, :] + off - kv_idx[:, None]).to(sT.dtype)
            sT = sT - slope * tl.abs(dist)
        pT = tl.math.exp2(sT - lse[None, :].to(sT.dtype))
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        if DROPOUT:
            drop_cols = drop_base + h.to(tl.int64) * seqlen_q_max * drop_stride + kv_idx
            keepT = tl.rand(seed, drop_cols[:, None] + q_idx[None, :].to(tl.int64) * drop_stride) >= dropout_p
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keepT, pT * inv_keep, 0.0)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=PREC)
        dsT = pT * (dpT - delta[None, :].to(pT.dtype))
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, MASK, SLOPES, CU_Q, CU_K, SEED,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    smb, smh, smi, smj, ssb, ssh, slb, slh,
    HK, GROUP, seqlen_q_max, seqlen_k_max, SCALES, left, right, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
):
    """One program = one key block of one kv head; loops over the GROUP q heads reading it."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, b, seqlen_q_max, seqlen_k_max, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < seqlen_k:
        off = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
        b64 = b.to(tl.int64)
        kv_idx = n0 + tl.arange(0, BLOCK_N)
        kv_ok = kv_idx < seqlen_k
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        kv_rows = (k_start + kv_idx).to(tl.int64)
        k = tl.load(K + b64 * skb + hk * skh + kv_rows[:, None] * sks + offs_d[None, :],
                    mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + b64 * svb + hk * svh + kv_rows[:, None] * svs + offs_dv[None, :],
                    mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        ACC: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
        s_scale = tl.load(SCALES)
        sm_scale = tl.load(SCALES + 1)
        log2e = tl.load(SCALES + 2)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
        seed = tl.load(SEED) if DROPOUT else 0
        # The query range seen by this key block: the band rule with the roles swapped. It is
        # the same for every q head of the group (same positions).
        lo, full_lo, full_hi, hi = _block_ranges(n0, BLOCK_N, BLOCK_M, seqlen_q, -off, right, left)
        h0 = hk * GROUP
        q_off = b64 * sqb + q_start.to(tl.int64) * sqs
        do_off = b64 * sdb + q_start.to(tl.int64) * sds
        lse_off = b64 * slb + q_start
        mask_off = b64 * smb + kv_idx.to(tl.int64) * smj
        drop_base = b64 * HK * GROUP * seqlen_q_max * seqlen_k_max
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, SLOPES, q_off, do_off, lse_off, mask_off, h0,
                                GROUP, sqh, sdh, slh, smh, ssh, lo, full_lo, kv_idx, kv_ok, smi, b * ssb, drop_base,
                                seed, sqs, sds, seqlen_q, seqlen_q_max, seqlen_k_max, off, left, right, s_scale, log2e,
                                dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, True, MASK_KIND, HAS_ALIBI, DROPOUT,
                                PREC)
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, SLOPES, q_off, do_off, lse_off, mask_off, h0,
                                GROUP, sqh, sdh, slh, smh, ssh, full_lo, full_hi, kv_idx, kv_ok, smi, b * ssb,
                                drop_base, seed, sqs, sds, seqlen_q, seqlen_q_max, seqlen_k_max, off, left, right,
                                s_scale, log2e, dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, False, MASK_KIND,
                                HAS_ALIBI, DROPOUT, PREC)
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, SLOPES, q_off, do_off, lse_off, mask_off, h0,
                                GROUP, sqh, sdh, slh, smh, ssh, full_hi, hi, kv_idx, kv_ok, smi, b * ssb, drop_base,
                                seed, sqs, sds, seqlen_q, seqlen_q_max, seqlen_k_max, off, left, right, s_scale, log2e,
                                dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, True, MASK_KIND, HAS_ALIBI, DROPOUT,
                                PREC)
        dk = dk * sm_scale
        tl.store(DK_OUT + b64 * sdkb + hk * sdkh + kv_rows[:, None] * sdks + offs_d[None, :],
                 dk.to(DK_OUT.dtype.element_ty),
                 mask=kv_ok[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + b64 * sdvb + hk * sdvh + kv_rows[:, None] * sdvs + offs_dv[None, :],
                 dv.to(DV_OUT.dtype.element_ty), mask=kv_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_q_blocks(dq, q, do, lse, delta, k_base, v_base, lo, hi, q_idx, q_pos, q_ok, mask_rows, smj, slope,
                  drop_rows, seed, dmask_rows, sdmj, sks, svs, seqlen_k, left, right, qk_scale, log2e, dropout_p,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        kv_idx = start_n + offs_n0
        kv_ok = kv_idx < seqlen_k
        k = _load_tile(k_base + kv_idx[:, None] * sks + offs_d[None, :], kv_ok, offs_d < D, BOUNDARY, BLOCK_D != D)
        v = _load_tile(v_base + kv_idx[:, None] * svs + offs_dv[None, :], kv_ok, offs_dv < DV, BOUNDARY,
                       BLOCK_DV != DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _scores_bias(s, q_pos, q_ok, kv_idx, seqlen_k, left, right, mask_rows, smj, slope, log2e,
                         BOUNDARY, MASK_KIND, HAS_ALIBI)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(seed, drop_rows, kv_idx, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            # d(loss)/d(additive mask) = dS in natural units; float32, reduced over broadcast dims later.
            tl.store(dmask_rows[:, None] + kv_idx[None, :] * sdmj, ds.to(tl.float32),
                     mask=q_ok[:, None] & kv_ok[None, :])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _flash_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, DMASK, SLOPES, CU_Q, CU_K, SEED,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
    smb, smh, smi, smj, sdmb, sdmh, sdmi, sdmj, ssb, ssh, slb, slh,
    H, GROUP, seqlen_q_max, seqlen_k_max, SCALES, left, right, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, b, seqlen_q_max, seqlen_k_max, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen_q:
        off = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
        b64 = b.to(tl.int64)
        hk64 = (h // GROUP).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ok = offs_m < seqlen_q
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + b64 * sqb + h * sqh + q_rows[:, None] * sqs + offs_d[None, :],
                    mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + b64 * sdb + h * sdh + q_rows[:, None] * sds + offs_dv[None, :],
                     mask=q_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        ACC: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
        s_scale = tl.load(SCALES)
        sm_scale = tl.load(SCALES + 1)
        log2e = tl.load(SCALES + 2)
        lse = tl.load(LSE + b64 * slb + h * slh + q_start + offs_m, mask=q_ok, other=float("inf")).to(ACC)
        delta = tl.load(DELTA + b64 * slb + h * slh + q_start + offs_m, mask=q_ok, other=0.0).to(ACC)
        k_base = K + b64 * skb + hk64 * skh + k_start.to(tl.int64) * sks
        v_base = V + b64 * svb + hk64 * svh + k_start.to(tl.int64) * svs
        mask_rows = MASK + b64 * smb + h * smh + offs_m.to(tl.int64) * smi
        dmask_rows = DMASK + b64 * sdmb + h * sdmh + offs_m.to(tl.int64) * sdmi
        slope = tl.zeros([BLOCK_M], dtype=ACC)
        if HAS_ALIBI:
            slope += tl.load(SLOPES + b * ssb + h * ssh).to(ACC) * log2e
        drop_rows = ((bh.to(tl.int64) * seqlen_q_max + offs_m) * seqlen_k_max)
        seed = tl.load(SEED) if DROPOUT else 0
        q_pos = offs_m + off
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        lo, full_lo, full_hi, hi = _block_ranges(m0, BLOCK_M, BLOCK_N, seqlen_k, off, left, right)
        dq = _bwd_q_blocks(dq, q, do, lse, delta, k_base, v_base, lo, full_lo, offs_m, q_pos, q_ok, mask_rows, smj,
                           slope, drop_rows, seed, dmask_rows, sdmj, sks, svs, seqlen_k, left, right, s_scale,
                           log2e, dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_ALIBI, DROPOUT,
                           MASK_GRAD, PREC)
        dq = _bwd_q_blocks(dq, q, do, lse, delta, k_base, v_base, full_lo, full_hi, offs_m, q_pos, q_ok, mask_rows,
                           smj, slope, drop_rows, seed, dmask_rows, sdmj, sks, svs, seqlen_k, left, right, s_scale,
                           log2e, dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, MASK_KIND, HAS_ALIBI, DROPOUT,
                           MASK_GRAD, PREC)
        dq = _bwd_q_blocks(dq, q, do, lse, delta, k_base, v_base, full_hi, hi, offs_m, q_pos, q_ok, mask_rows, smj,
                           slope, drop_rows, seed, dmask_rows, sdmj, sks, svs, seqlen_k, left, right, s_scale,
                           log2e, dropout_p, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_ALIBI, DROPOUT,
                           MASK_GRAD, PREC)
        dq = dq * sm_scale
        tl.store(DQ + b64 * sdqb + h * sdqh + q_rows[:, None] * sdqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=q_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, H, seqlen_q, seqlen_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask the forward and backward use, materialised (tests and debugging only)."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (bh.to(tl.int64) * seqlen_q + offs_m) * seqlen_k
    keep = _dropout_keep(tl.load(SEED), rows, offs_n, dropout_p)
    ptr = KEEP + rows[:, None] + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


# --- launch configuration ---------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs use TF32 tensor cores exactly when torch's matmuls may (the SDPA rule)."""
    return _common.float32_precision(dtype, device, torch.backends.cuda.matmul.allow_tf32)


def _bucket(n: int) -> int:
    return min(next_pow2(n), 16384)


def _cfg(bm: int, bn: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


# Tile candidates (BLOCK_M, BLOCK_N, warps, stages) per kernel, head-dim class (<= 64, <= 128,
# <= 256) and arithmetic (tc: fp16/bf16 tensor cores; tf32; fma: IEEE fp32 on FMA units; fp64),
# chosen with the static report (`python -m fastnets kernels`, under Triton 3.9 and 3.6): every
# "all" tile compiles without a register spill for every option the launchers pass (masks,
# ALiBi, dropout, varlen, GQA); "plain" adds the larger tiles that fit only without them. The forward and dq
# take wide query tiles (BLOCK_M) over narrow key tiles; dk/dv the mirror image. The tuner
# (tuned_launch) times the candidates once per shape class.
_TILES = {
    ("fwd", 64, "tc"): {"all": ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
                        "plain": ((128, 64, 4, 3), (128, 128, 8, 3))},
    ("fwd", 128, "tc"): {"all": ((128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)),
                         "plain": ((128, 64, 8, 2),)},
    ("fwd", 256, "tc"): {"all": ((64, 32, 8, 2),), "plain": ((64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2))},
    ("dq", 64, "tc"): {"all": ((128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)), "plain": ((128, 32, 4, 3),)},
    ("dq", 128, "tc"): {"all": ((128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)),
                        "plain": ((128, 64, 8, 2),)},
    ("dq", 256, "tc"): {"all": ((32, 32, 8, 2),), "plain": ((32, 32, 4, 2), (32, 16, 4, 2))},
    ("dkdv", 64, "tc"): {"all": ((32, 128, 8, 2), (32, 64, 4, 3)), "plain": ((64, 128, 8, 2), (64, 64, 4, 3))},
    ("dkdv", 128, "tc"): {"all": ((16, 128, 8, 2), (16, 64, 8, 2)), "plain": ((32, 64, 8, 3),)},
    ("dkdv", 256, "tc"): {"all": ((32, 32, 8, 1), (16, 32, 8, 1)), "plain": ((16, 16, 8, 2),)},
    # TF32: 4-byte operands, twice the register fragments of 16-bit ones: narrower key tiles.
    ("fwd", 64, "tf32"): {"all": ((128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)), "plain": ((128, 64, 8, 2),)},
    ("fwd", 128, "tf32"): {"all": ((128, 32, 8, 2), (128, 16, 8, 2), (64, 16, 4, 2)), "plain": ((64, 32, 4, 2),)},
    ("fwd", 256, "tf32"): {"all": ((32, 16, 4, 2),), "plain": ((64, 16, 8, 2),)},
    ("dq", 64, "tf32"): {"all": ((128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)), "plain": ((64, 64, 4, 2),)},
    ("dq", 128, "tf32"): {"all": ((128, 16, 8, 2), (64, 16, 8, 2)), "plain": ((128, 32, 8, 2),)},
    ("dq", 256, "tf32"): {"all": ((16, 16, 8, 2),), "plain": ((32, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2))},
    ("dkdv", 64, "tf32"): {"all": ((16, 64, 4, 2), (16, 64, 8, 2)), "plain": ((32, 64, 4, 2), (32, 128, 8, 2))},
    ("dkdv", 128, "tf32"): {"all": ((32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2)), "plain": ()},
    ("dkdv", 256, "tf32"): {"all": ((16, 32, 8, 1), (16, 16, 8, 2), (16, 16, 4, 2)), "plain": ((16, 32, 8, 2),)},
    # FMA units (IEEE fp32, fp64 for gradcheck): score and accumulator tiles in plain registers,
    # operands re-read per k step; small tiles. Where even the smallest spills a little (IEEE
    # fp32 dq above head dim 64, dk/dv above 128, fp64 above 128), tests/test_static_kernels.py
    # allowlists it, bounded.
    ("fwd", 64, "fma"): {"all": ((32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)), "plain": ()},
    ("fwd", 128, "fma"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("fwd", 256, "fma"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("dq", 64, "fma"): {"all": ((32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)), "plain": ()},
    ("dq", 128, "fma"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("dq", 256, "fma"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("dkdv", 64, "fma"): {"all": ((32, 32, 8, 2), (32, 16, 4, 2)), "plain": ()},
    ("dkdv", 128, "fma"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("dkdv", 256, "fma"): {"all": ((16, 16, 4, 1),), "plain": ()},
    ("fwd", 64, "fp64"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("fwd", 128, "fp64"): {"all": ((16, 32, 4, 2),), "plain": ()},
    ("fwd", 256, "fp64"): {"all": ((16, 16, 4, 1),), "plain": ()},
    ("dq", 64, "fp64"): {"all": ((32, 32, 4, 2),), "plain": ()},
    ("dq", 128, "fp64"): {"all": ((16, 32, 4, 2), (16, 16, 4, 2)), "plain": ()},
    ("dq", 256, "fp64"): {"all": ((16, 16, 4, 2),), "plain": ()},
    ("dkdv", 64, "fp64"): {"all": ((16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)), "plain": ()},
    ("dkdv", 128, "fp64"): {"all": ((16, 16, 4, 1),), "plain": ()},
    ("dkdv", 256, "fp64"): {"all": ((16, 16, 4, 2),), "plain": ()},
}


def _arith(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if _precision(dtype, device) == "tf32" else "fma"
    return "tc"


def attn_configs(kind: str, device: torch.device, head_dim: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype,
                 plain: bool) -> list[dict]:
    """Candidate tiles for kind "fwd", "dq" or "dkdv" (see _TILES). plain: no mask, ALiBi,
    dropout, varlen or GQA. The interpreter runs programs one by one: one big tile."""
    if not _common.gpu_launch(device):
        return [_cfg(max(16, min(64, next_pow2(seqlen_q))), max(16, min(64, next_pow2(seqlen_k))), 4, 1)]
    tiles = _TILES[(kind, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256, _arith(dtype, device))]
    chosen = tiles["all"] + (tiles["plain"] if plain else ())
    return [_cfg(*t) for t in chosen]


DECODE_MAX_ROWS = 64      # GROUP * Sq query rows one decode program holds
DECODE_BLOCK_N = 64


def use_decode(q: torch.Tensor, k: torch.Tensor, varlen: bool, dropout_p: float) -> bool:
    """Split-key decode when few query rows meet a long cache and the ordinary grid (one
    program per query tile) would leave most of the GPU idle."""
    if varlen or dropout_p > 0.0 or q.dtype == torch.float64:
        return False
    B, Hq, Sq, _ = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    if (Hq // Hk) * Sq > DECODE_MAX_ROWS or Sk < 2 * DECODE_BLOCK_N:
        return False
    if not _common.gpu_launch(q.device):
        return True   # the interpreter has no occupancy to weigh: take the path so tests cover it
    return B * Hq * triton.cdiv(Sq, 64) < 2 * _common.persistent_programs(q.device, 1 << 30, per_sm=1)


# --- launchers ------------------------------------------------------------------------------------

path_counts: dict[str, int] = {"flash": 0, "decode": 0}   # which forward ran (tests assert the decode path)

def _bhs(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides of (B, H, S, D) or packed (total, H, D)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


@functools.lru_cache(maxsize=64)
def _scales(scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[scale * log2(e), scale, log2(e)] in the accumulator dtype, read by the kernels (a
    float argument would be float32, too coarse for float64 gradcheck). Cached: a layer calls
    with the same scale every step, so there is no host-to-device copy per call."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor([scale * LOG2E, scale, LOG2E], dtype=acc, device=device)


def _mask_args(mask: torch.Tensor | None, dummy: torch.Tensor, dtype: torch.dtype):
    """(pointer tensor, kind, 4 strides) for an attn_mask already broadcast to (B, H, Sq, Sk).
    float64 (gradcheck sizes) takes a bool mask as the equivalent additive 0 / -inf mask:
    Triton 3.6 cannot lower a float64 dot whose operands meet a uint8 tile ("fp64 don't
    support largeK MMA"), and the additive path computes the same probabilities."""
    if mask is None:
        return dummy, MASK_NONE, (0, 0, 0, 0)
    if mask.dtype == torch.bool and dtype == torch.float64:
        mask = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(~mask, float("-inf"))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), MASK_BOOL, mask.stride()
    return mask, MASK_ADD, mask.stride()


def _slope_args(slopes: torch.Tensor | None, dummy: torch.Tensor):
    """ALiBi slopes (H,) or (B, H), float32."""
    if slopes is None:
        return dummy, (0, 0)
    if slopes.dim() == 1:
        return slopes, (0, slopes.stride(0))
    return slopes, (slopes.stride(0), slopes.stride(1))


def _geometry(q, k, v, cu_q, max_sq, max_sk):
    varlen = cu_q is not None
    if varlen:
        B = cu_q.numel() - 1
        Hq, D = q.shape[1], q.shape[2]
        Hk, DV = k.shape[1], v.shape[2]
    else:
        B, Hq, _, D = q.shape
        Hk, DV = k.shape[1], v.shape[3]
    return varlen, B, Hq, Hk, D, DV


def flash_attn_fwd(q, k, v, attn_mask, alibi_slopes, cu_q, cu_k, max_sq: int, max_sk: int, scale: float,
                   left: int, right: int, bottom_right: bool, dropout_p: float, seed: torch.Tensor | None):
    """(o, lse2): o like q with v's head dim, lse2 float32 base-2 log-sum-exp,
    (B, Hq, Sq) or (Hq, total_q) for packed batches; +inf on fully masked rows.
    left/right: window edges (1 << 30 = unbounded; right = 0 for causal)."""
    varlen, B, Hq, Hk, D, DV = _geometry(q, k, v, cu_q, max_sq, max_sk)
    o = empty_like_layout(q, DV)
    lse = empty((Hq, q.shape[0]) if varlen else (B, Hq, max_sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or B == 0 or max_sq == 0:
        return o, lse
    if max_sk == 0 or k.numel() == 0:
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse
    dummy = lse
    mask, mask_kind, ms = _mask_args(attn_mask, dummy, q.dtype)
    slopes, ss = _slope_args(alibi_slopes, dummy)
    scales = _scales(scale, q.dtype, q.device)
    BLOCK_D, BLOCK_DV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    if not varlen and use_decode(q, k, varlen, dropout_p):
        _decode(q, k, v, o, lse, mask, mask_kind, ms, slopes, ss, alibi_slopes is not None, scales, left, right,
                bottom_right, BLOCK_D, BLOCK_DV)
        return o, lse
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    plain = mask_kind == MASK_NONE and alibi_slopes is None and dropout_p == 0 and not varlen
    configs = attn_configs("fwd", q.device, max(D, DV), max_sq, max_sk, q.dtype, plain)
    key = ("fwd", D, DV, _bucket(max_sq), _bucket(max_sk), mask_kind, alibi_slopes is not None, varlen,
           right == 0, dropout_p > 0, str(q.dtype), _precision(q.dtype, q.device))
    tuned_launch(
        _flash_attn_fwd_kernel, lambda c: (triton.cdiv(max_sq, c["BLOCK_M"]), B * Hq), configs, key, q.device,
        q, k, v, o, lse, mask, slopes, cu_q if varlen else dummy, cu_k if varlen else dummy,
        seed if seed is not None else dummy,
        *_bhs(q, varlen), *_bhs(k, varlen), *_bhs(v, varlen), *_bhs(o, varlen), *ms, *ss, *lse_strides,
        Hq, Hq // Hk, max_sq, max_sk, scales, left, right, float(dropout_p),
        D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=mask_kind, HAS_ALIBI=alibi_slopes is not None,
        VARLEN=varlen, BOTTOM_RIGHT=bottom_right, DROPOUT=dropout_p > 0, PREC=_precision(q.dtype, q.device))
    path_counts["flash"] += 1
    return o, lse



def _decode(q, k, v, o, lse, mask, mask_kind, ms, slopes, ss, has_alibi, scales, left, right, bottom_right, BLOCK_D,
            BLOCK_DV):
    B, Hq, Sq, D = q.shape
    Hk, Sk, DV = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hk
    rows = group * Sq
    BLOCK_R = max(16, next_pow2(rows))
    # 4-byte K/V tiles: two stages (76 KB of shared memory; three spilled). IEEE float32 runs
    # its dots on FMA units in one stage, with 32-key blocks, or 64 with a mask or ALiBi: the
    # shapes that fit in registers under both Triton 3.9 and 3.6.
    fma = _arith(q.dtype, q.device) == "fma"
    block_n = 32 if fma and not (mask_kind or has_alibi) else DECODE_BLOCK_N
    stages = 3 if q.dtype != torch.float32 else (1 if fma else 2)
    blocks = triton.cdiv(Sk, block_n)
    target = max(1, 2 * _common.persistent_programs(q.device, 1 << 30, per_sm=1) // (B * Hk))
    if not _common.gpu_launch(q.device):
        target = min(target, 4)
    keys_per_split = block_n * triton.cdiv(blocks, min(target, blocks))
    splits = triton.cdiv(Sk, keys_per_split)
    o_part = empty((B * Hk, splits, BLOCK_R, DV), dtype=torch.float32, device=q.device)
    lse_part = empty((B * Hk, splits, BLOCK_R), dtype=torch.float32, device=q.device)
    _flash_attn_decode_kernel[(splits, B * Hk)](
        q, k, v, o_part, lse_part, mask, slopes, *_bhs(q, False), *_bhs(k, False), *_bhs(v, False), *ms, *ss,
        Hk, group, Sq, Sk, keys_per_split, scales, left, right,
        D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
        MASK_KIND=mask_kind, HAS_ALIBI=has_alibi, BOTTOM_RIGHT=bottom_right,
        PREC=_precision(q.dtype, q.device), num_warps=4, num_stages=stages)
    _flash_attn_combine_kernel[(B * Hk, rows)](
        o_part, lse_part, o, lse, *_bhs(o, False), Hk, group, Sq, splits,
        DV=DV, BLOCK_DV=BLOCK_DV, BLOCK_S=next_pow2(splits), ROWS_STRIDE=BLOCK_R, num_warps=4)
    path_counts["decode"] += 1


def flash_attn_bwd(do, q, k, v, o, lse, attn_mask, alibi_slopes, cu_q, cu_k, max_sq: int, max_sk: int, scale: float,
                   left: int, right: int, bottom_right: bool, dropout_p: float, seed: torch.Tensor | None,
                   mask_grad: bool):
    """(dq, dk, dv, dmask): dmask is d(loss)/d(attn_mask) broadcast to (B, Hq, Sq, Sk) in
    float32 when mask_grad (an additive mask that requires grad), else an empty tensor."""
    varlen, B, Hq, Hk, D, DV = _geometry(q, k, v, cu_q, max_sq, max_sk)
    group = Hq // Hk
    dq = empty_like_layout(q, D)
    dk = empty_like_layout(k, D)
    dv = empty_like_layout(v, DV)
    dmask = (torch.zeros((B, Hq, max_sq, max_sk), dtype=torch.float32, device=q.device) if mask_grad
             else q.new_empty((0,), dtype=torch.float32))
    if B == 0 or q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, dmask
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = empty(lse.shape, dtype=lse.dtype, device=lse.device)   # poisoned like every output
    dummy = delta
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    BLOCK_D, BLOCK_DV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    # delta is memory-bound: 2048 (o, dO) pairs a program, 16 a thread on 4 warps (1024 for
    # float64); 64 rows of 256 columns kept 256 float32 values a thread and spilled.
    pre_m = (max(1, (1024 if q.dtype == torch.float64 else 2048) // BLOCK_DV) if _common.gpu_launch(q.device)
             else max(16, min(128, next_pow2(max_sq))))
    _flash_attn_bwd_preprocess_kernel[(triton.cdiv(max_sq, pre_m), B * Hq)](
        o, do, delta, cu_q if varlen else dummy, *_bhs(o, varlen), *_bhs(do, varlen), *lse_strides, Hq, max_sq,
        DV=DV, BLOCK_DV=BLOCK_DV, BLOCK_M=pre_m, VARLEN=varlen)
    mask, mask_kind, ms = _mask_args(attn_mask, dummy, q.dtype)
    slopes, ss = _slope_args(alibi_slopes, dummy)
    scales = _scales(scale, q.dtype, q.device)
    common = dict(D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=mask_kind,
                  HAS_ALIBI=alibi_slopes is not None, VARLEN=varlen, BOTTOM_RIGHT=bottom_right,
                  DROPOUT=dropout_p > 0, PREC=_precision(q.dtype, q.device))
    seed_t = seed if seed is not None else dummy
    cu_q_t, cu_k_t = (cu_q, cu_k) if varlen else (dummy, dummy)
    key = (D, DV, _bucket(max_sq), _bucket(max_sk), mask_kind, alibi_slopes is not None, varlen, right == 0,
           dropout_p > 0, group, str(q.dtype), _precision(q.dtype, q.device))
    plain = mask_kind == MASK_NONE and alibi_slopes is None and dropout_p == 0 and not varlen and group == 1
    tuned_launch(
        _flash_attn_bwd_dkdv_kernel, lambda c: (triton.cdiv(max_sk, c["BLOCK_N"]), B * Hk),
        attn_configs("dkdv", q.device, max(D, DV), max_sq, max_sk, q.dtype, plain), ("dkdv",) + key, q.device,
        q, k, v, do, lse, delta, dk, dv, mask, slopes, cu_q_t, cu_k_t, seed_t,
        *_bhs(q, varlen), *_bhs(k, varlen), *_bhs(v, varlen), *_bhs(do, varlen), *_bhs(dk, varlen),
        *_bhs(dv, varlen), *ms, *ss, *lse_strides, Hk, group, max_sq, max_sk, scales, left, right,
        float(dropout_p), **common)
    dm_strides = dmask.stride() if mask_grad else (0, 0, 0, 0)
    tuned_launch(
        _flash_attn_bwd_dq_kernel, lambda c: (triton.cdiv(max_sq, c["BLOCK_M"]), B * Hq),
        attn_configs("dq", q.device, max(D, DV), max_sq, max_sk, q.dtype, plain), ("dq", mask_grad) + key, q.device,
        q, k, v, do, lse, delta, dq, mask, dmask if mask_grad else dummy, slopes, cu_q_t, cu_k_t, seed_t,
        *_bhs(q, varlen), *_bhs(k, varlen), *_bhs(v, varlen), *_bhs(do, varlen), *_bhs(dq, varlen),
        *ms, *dm_strides, *ss, *lse_strides, Hq, group, max_sq, max_sk, scales, left, right, float(dropout_p),
        MASK_GRAD=mask_grad, **common)
    return dq, dk, dv, dmask


def dropout_keep_mask(seed: torch.Tensor, batch_heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The (batch*heads, Sq, Sk) keep mask (bool) that a forward with this seed used."""
    keep = torch.empty((batch_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    bm = 64 if _common.gpu_launch(device) else max(16, min(128, next_pow2(seqlen_q)))
    bn = 64 if _common.gpu_launch(device) else max(16, min(128, next_pow2(seqlen_k)))
    if keep.numel():
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, bm), triton.cdiv(seqlen_k, bn), batch_heads)](
            keep, seed, batch_heads, seqlen_q, seqlen_k, float(dropout_p), BLOCK_M=bm, BLOCK_N=bn)
    return keep.bool()
