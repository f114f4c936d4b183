"""Recurrent cells: one fused launch per time step, forward and backward through time.

The input projection x @ W_ih^T of every step is one GEMM before the recurrence (the op
layer does it with cuBLAS). What is left is sequential, and these kernels fuse each step:

Forward step, a (BLOCK_H hidden units, BLOCK_B batch rows) tile per program: the hidden
projection W_hh h_{t-1} for every gate of those units (one tensor-core dot per gate, with
W_hh's rows as the M side so a small batch still fills a 64-row MMA), the gate
nonlinearities and the state update, written as h_t, c_t (float32) and the activations the
backward needs. LSTM gates are (i, f, g, o), GRU (r, z, n) with b_hn inside the reset
product (torch's formula), Elman RNN tanh or relu.

Backward step (in reverse processing order), a (BLOCK_H units, BLOCK_B rows) tile: the
gradient reaching h_t is the output's gradient + the direct carries + (the next-processed
step's hidden-side gate gradients) @ W_hh -- a dot with the reduction over all G*H gate
rows -- then the pointwise gate gradients, written once for the input side (dxg) and, for
GRU whose n-gate enters W_hh through r, once for the hidden side. The weight gradients are
one GEMM each over all steps afterwards (fastnets/ops/rnn.py).

Variable lengths: a row whose step t >= length keeps its state (h, c copied through) and
gets zero gate gradients; the carries pass its gradient through unchanged. With an LSTM
projection (proj_size) the kernel writes the unprojected o * tanh(c) and the launcher
projects and freezes; the backward step then gets the already projected-back gradient.

Math runs in float32 (float64 for float64 input); c stays float32 across steps; h is
stored in the input dtype, which is what the next step's tensor-core dot reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, acc_torch_dtype, empty, next_pow2
from .activation import _sigmoid, _tanh

# Cell ids (constexpr: each launch compiles only its cell's code).
CELLS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# Activations saved per hidden unit for the backward: LSTM i f g o, GRU r z n hn, RNN h.
SAVED = {"LSTM": 4, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}


@triton.jit
def _gate_dot(acc, W, row0, j, jm, hT, k, km, K, PRECISION: tl.constexpr):
    """acc += W[row0 + j, k] @ hT: one gate's (BLOCK_H, BLOCK_K) slice of W_hh times the
    (BLOCK_K, BLOCK_B) transposed state tile."""
    # int32 offsets (the launcher checks G*H*K < 2**31): 64-bit per-element addresses of an
    # unaligned tile (K not a multiple of 16) cost twice the registers and spilled.
    w = tl.load(W + (row0 + j)[:, None] * K + k[None, :], mask=jm[:, None] & km[None, :], other=0.0)
    return acc + tl.dot(w, hT, input_precision=PRECISION, out_dtype=acc.dtype)


# Whole buffers and step / slot indices are passed, never per-step views: slicing tensors
# for every launch costs the host more than a small step costs the GPU. The indices change
# every step, so they are not specialized (t == 1 would otherwise compile anew).
@triton.jit(do_not_specialize=["s"])
def _rnn_step_fwd_kernel(
    XG, HBUF, W, BHN, CBUF,  # per direction d: XG (T, B, G*H) input projections; HBUF (T+1, B, K) states;
                             # W (G*H, K) W_hh; BHN (H,) GRU b_hn; CBUF (T+1, B, H) float32 cell states
    HRAW, SAVE, LEN,         # HRAW (T, B, H) the unprojected output (PROJ); SAVE (T, B, S*H) activations for
                             # the backward; LEN (B,) lengths, shared by the directions
    s, T, B, H, K,
    CELL: tl.constexpr, NGATE: tl.constexpr, NSAVE: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LEN: tl.constexpr,
    PROJ: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Processing step s of direction d = program_id(2): both directions of a bidirectional
    # layer run in the same launch. Forward: step t = s reads state slot s, writes s + 1;
    # reverse: t = T-1-s reads slot t + 1, writes t (h0 sits in slot 0 / slot T).
    d = tl.program_id(2)
    t = s + d * (T - 1 - 2 * s)
    rd = t + d
    wr = t + 1 - d
    # This direction's buffers, then this step's slice (int64: T * B * G*H may pass 2**31;
    # offsets within a step are int32).
    XG += (d * T + t).to(tl.int64) * B * H * NGATE
    W += d.to(tl.int64) * H * NGATE * K
    BHN += d * H
    HBUF += d.to(tl.int64) * (T + 1) * B * K
    CBUF += d.to(tl.int64) * (T + 1) * B * H
    SAVE += (d * T + t).to(tl.int64) * B * H * NSAVE
    HP = HBUF + rd.to(tl.int64) * B * K
    if PROJ:
        HO = HRAW + (d * T + t).to(tl.int64) * B * H
    else:
        HO = HBUF + wr.to(tl.int64) * B * K
    CP = CBUF + rd.to(tl.int64) * B * H
    CO = CBUF + wr.to(tl.int64) * B * H
    s_xg = H * NGATE
    s_hp = K
    s_ho = H
    j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    jm = j < H
    bm = b < B
    m = jm[:, None] & bm[None, :]
    acc0 = tl.zeros((BLOCK_H, BLOCK_B), dtype=ACC)
    acc1 = tl.zeros((BLOCK_H, BLOCK_B), dtype=ACC)
    acc2 = tl.zeros((BLOCK_H, BLOCK_B), dtype=ACC)
    acc3 = tl.zeros((BLOCK_H, BLOCK_B), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        hT = tl.load(HP + b[None, :] * s_hp + k[:, None], mask=km[:, None] & bm[None, :], other=0.0)
        acc0 = _gate_dot(acc0, W, 0, j, jm, hT, k, km, K, PRECISION)
        if CELL <= 1:
            acc1 = _gate_dot(acc1, W, H, j, jm, hT, k, km, K, PRECISION)
            acc2 = _gate_dot(acc2, W, 2 * H, j, jm, hT, k, km, K, PRECISION)
        if CELL == 0:
            acc3 = _gate_dot(acc3, W, 3 * H, j, jm, hT, k, km, K, PRECISION)

    xo = b[None, :] * s_xg + j[:, None]          # (BLOCK_H, BLOCK_B) offsets into a (B, G*H) row
    so = b[None, :] * (H * NSAVE) + j[:, None]
    ho = b[None, :] * s_ho + j[:, None]
    co = b[None, :] * H + j[:, None]
    if HAS_LEN:
        live = (t < tl.load(LEN + b, mask=bm, other=0))[None, :]
    if CELL == 0:
        i = _sigmoid(acc0 + tl.load(XG + xo, mask=m, other=0.0).to(ACC))
        f = _sigmoid(acc1 + tl.load(XG + xo + H, mask=m, other=0.0).to(ACC))
        g = _tanh(acc2 + tl.load(XG + xo + 2 * H, mask=m, other=0.0).to(ACC))
        o = _sigmoid(acc3 + tl.load(XG + xo + 3 * H, mask=m, other=0.0).to(ACC))
        cp = tl.load(CP + co, mask=m, other=0.0)
        c = f * cp + i * g
        h = o * _tanh(c)
        if HAS_LEN:
            c = tl.where(live, c, cp)
        tl.store(CO + co, c, mask=m)
        tl.store(SAVE + so, i.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + H, f.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + 2 * H, g.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + 3 * H, o.to(SAVE.dtype.element_ty), mask=m)
    elif CELL == 1:
        hn = acc2
        if HAS_BHN:
            hn += tl.load(BHN + j, mask=jm, other=0.0).to(ACC)[:, None]
        r = _sigmoid(acc0 + tl.load(XG + xo, mask=m, other=0.0).to(ACC))
        z = _sigmoid(acc1 + tl.load(XG + xo + H, mask=m, other=0.0).to(ACC))
        n = _tanh(tl.load(XG + xo + 2 * H, mask=m, other=0.0).to(ACC) + r * hn)
        hp = tl.load(HP + b[None, :] * s_hp + j[:, None], mask=m, other=0.0).to(ACC)
        h = (1.0 - z) * n + z * hp
        tl.store(SAVE + so, r.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + H, z.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + 2 * H, n.to(SAVE.dtype.element_ty), mask=m)
        tl.store(SAVE + so + 3 * H, hn.to(SAVE.dtype.element_ty), mask=m)
    else:
        a = acc0 + tl.load(XG + xo, mask=m, other=0.0).to(ACC)
        if CELL == 2:
            h = _tanh(a)
        else:
            h = tl.where(a < 0, 0.0, a)
        tl.store(SAVE + so, h.to(SAVE.dtype.element_ty), mask=m)
    if HAS_LEN and not PROJ:
        h = tl.where(live, h, tl.load(HP + b[None, :] * s_hp + j[:, None], mask=m, other=0.0).to(ACC))
    tl.store(HO + ho, h.to(HO.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["s", "par"])
def _rnn_step_bwd_kernel(
    DGH, W, DY, CHB, CCB,    # per direction d: DGH (T, B, G*H) hidden-side gate grads, the next-processed
                             # step's read (HAS_GEMM), this step's written (GRU); W (G*H, K); DY: this step's
                             # gradient of h_t from the output, (T+1, B, H) state slots (DY_SLOTS) or (1, B, H);
                             # CHB, CCB (2, B, H) float32 carries: half par read, the other written
    SAVE, CBUF, HBUF, DGX, LEN,   # SAVE (T, B, S*H); CBUF (T+1, B, H) float32; HBUF (T+1, B, K);
                                  # DGX (T, B, G*H) input-side gate grads of this step, written
    s, par, T, B, H, K,
    CELL: tl.constexpr, NGATE: tl.constexpr, NSAVE: tl.constexpr, HAS_GEMM: tl.constexpr, HAS_CH: tl.constexpr,
    HAS_LEN: tl.constexpr, DY_SLOTS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Backward step s of direction d runs the forward's steps in reverse: t = T-1-s forward,
    # t = s reverse; the step processed just before (its gradients flow in) is t + 1 / t - 1.
    d = tl.program_id(2)
    t = T - 1 - s - d * (T - 1 - 2 * s)
    rd = t + d
    wr = t + 1 - d
    nxt = t + 1 - 2 * d
    GH = H * NGATE
    step = B * GH
    W += d.to(tl.int64) * GH * K
    DGN = DGH + (d * T + nxt).to(tl.int64) * step
    DGX += (d * T + t).to(tl.int64) * step
    DGH += (d * T + t).to(tl.int64) * step
    if DY_SLOTS:
        DY += (d * (T + 1) + wr).to(tl.int64) * B * H
    else:
        DY += d * B * H
    SAVE += (d * T + t).to(tl.int64) * B * H * NSAVE
    CBUF += d.to(tl.int64) * (T + 1) * B * H
    HBUF += d.to(tl.int64) * (T + 1) * B * K
    CT = CBUF + wr.to(tl.int64) * B * H
    CPREV = CBUF + rd.to(tl.int64) * B * H
    HPREV = HBUF + rd.to(tl.int64) * B * K
    CHB += d * 2 * B * H
    CCB += d * 2 * B * H
    CH = CHB + par * B * H
    CH_OUT = CHB + (1 - par) * B * H
    CC = CCB + par * B * H
    CC_OUT = CCB + (1 - par) * B * H
    s_dy = H
    s_hprev = K
    j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    jm = j < H
    bm = b < B
    m = jm[:, None] & bm[None, :]
    # dh^T (BLOCK_H, BLOCK_B) = W_hh[:, j]^T @ dgn^T: the reduction runs over every gate row.
    dh = tl.zeros((BLOCK_H, BLOCK_B), dtype=ACC)
    if HAS_GEMM:
        for r0 in range(0, GH, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rm = r < GH
            wT = tl.load(W + r[None, :] * K + j[:, None], mask=jm[:, None] & rm[None, :], other=0.0)
            dgT = tl.load(DGN + b[None, :] * GH + r[:, None], mask=rm[:, None] & bm[None, :], other=0.0)
            dh = tl.dot(wT, dgT, dh, input_precision=PRECISION, out_dtype=ACC)
    ho = b[None, :] * H + j[:, None]
    dh += tl.load(DY + b[None, :] * s_dy + j[:, None], mask=m, other=0.0).to(ACC)
    if HAS_CH:
        dh += tl.load(CH + ho, mask=m, other=0.0)
    so = b[None, :] * (H * NSAVE) + j[:, None]
    go = b[None, :] * GH + j[:, None]
    if HAS_LEN:
        live = (t < tl.load(LEN + b, mask=bm, other=0))[None, :]
    ch = dh * 0.0
    if CELL == 0:
        i = tl.load(SAVE + so, mask=m, other=0.0).to(ACC)
        f = tl.load(SAVE + so + H, mask=m, other=0.0).to(ACC)
        g = tl.load(SAVE + so + 2 * H, mask=m, other=0.0).to(ACC)
        o = tl.load(SAVE + so + 3 * H, mask=m, other=0.0).to(ACC)
        tc = _tanh(tl.load(CT + ho, mask=m, other=0.0))
        cin = tl.load(CC + ho, mask=m, other=0.0)
        dc = cin + dh * o * (1.0 - tc * tc)
        d_i = dc * g * i * (1.0 - i)
        d_f = dc * tl.load(CPREV + ho, mask=m, other=0.0) * f * (1.0 - f)
        d_g = dc * i * (1.0 - g * g)
        d_o = dh * tc * o * (1.0 - o)
        cc = dc * f
        if HAS_LEN:
            d_i = tl.where(live, d_i, 0.0)
            d_f = tl.where(live, d_f, 0.0)
            d_g = tl.where(live, d_g, 0.0)
            d_o = tl.where(live, d_o, 0.0)
            cc = tl.where(live, cc, cin)
            ch = tl.where(live, ch, dh)
        tl.store(CC_OUT + ho, cc, mask=m)
        tl.store(DGX + go, d_i.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGX + go + H, d_f.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGX + go + 2 * H, d_g.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGX + go + 3 * H, d_o.to(DGX.dtype.element_ty), mask=m)
    elif CELL == 1:
        r = tl.load(SAVE + so, mask=m, other=0.0).to(ACC)
        z = tl.load(SAVE + so + H, mask=m, other=0.0).to(ACC)
        n = tl.load(SAVE + so + 2 * H, mask=m, other=0.0).to(ACC)
        hn = tl.load(SAVE + so + 3 * H, mask=m, other=0.0).to(ACC)
        hp = tl.load(HPREV + b[None, :] * s_hprev + j[:, None], mask=m, other=0.0).to(ACC)
        d_n = dh * (1.0 - z) * (1.0 - n * n)
        d_z = dh * (hp - n) * z * (1.0 - z)
        d_r = d_n * hn * r * (1.0 - r)
        d_hn = d_n * r
        ch = dh * z
        if HAS_LEN:
            d_n = tl.where(live, d_n, 0.0)
            d_z = tl.where(live, d_z, 0.0)
            d_r = tl.where(live, d_r, 0.0)
            d_hn = tl.where(live, d_hn, 0.0)
            ch = tl.where(live, ch, dh)
        tl.store(DGX + go, d_r.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGX + go + H, d_z.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGX + go + 2 * H, d_n.to(DGX.dtype.element_ty), mask=m)
        tl.store(DGH + go, d_r.to(DGH.dtype.element_ty), mask=m)
        tl.store(DGH + go + H, d_z.to(DGH.dtype.element_ty), mask=m)
        tl.store(DGH + go + 2 * H, d_hn.to(DGH.dtype.element_ty), mask=m)
    else:
        h = tl.load(SAVE + so, mask=m, other=0.0).to(ACC)
        if CELL == 2:
            d_a = dh * (1.0 - h * h)
        else:
            # torch's relu backward passes the gradient unless h <= 0: a NaN pre-activation
            # lets it through (h > 0 would stop it)
            d_a = tl.where(h <= 0, 0.0, dh)
        if HAS_LEN:
            d_a = tl.where(live, d_a, 0.0)
            ch = tl.where(live, ch, dh)
        tl.store(DGX + go, d_a.to(DGX.dtype.element_ty), mask=m)
    tl.store(CH_OUT + ho, ch, mask=m)


# --- launch configuration ------------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # cuDNN's RNNs run float32 on TF32 tensor cores when torch allows it for cuDNN (on a GPU).
    return _common.float32_precision(dtype, device, torch.backends.cudnn.allow_tf32)


def step_config(mode: str, H: int, B: int, K: int, dtype: torch.dtype, device: torch.device,
                backward: bool = False) -> dict:
    """Tile sizes for one step. On a GPU a program owns 64 hidden units (the M side of a
    64-row wgmma; every gate's accumulator in registers) and up to 32 batch rows (64 for
    the single-accumulator Elman cell's forward). Dots without tensor cores (float64, and
    float32 when TF32 is off) hold their operands in registers: 32 units x 16 rows. Sizes
    that are not multiples of 16 get no vectorized (or async) loads, so every staged element
    needs its own address: 16 rows, 32-wide K chunks, no double buffering. The interpreter
    takes the smallest tiles tl.dot allows, sized to the problem."""
    if not _common.gpu_launch(device):
        return dict(BLOCK_H=max(16, min(64, next_pow2(H))), BLOCK_B=max(16, min(64, next_pow2(B))),
                    BLOCK_K=max(16, min(64, next_pow2(K))), num_warps=4)
    aligned = H % 16 == 0 and K % 16 == 0
    if dtype == torch.float64:   # gradcheck's dtype: float64 values take two registers each
        return dict(BLOCK_H=16, BLOCK_B=16, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 and _precision(dtype, device) == "ieee":
        return dict(BLOCK_H=32, BLOCK_B=16, BLOCK_K=16, num_warps=4, num_stages=2 if aligned else 1)
    # The backward's float32 (TF32) tiles hold the reduction operands in float32: 16 rows
    # (32 spilled under Triton 3.6 with lengths).
    cap_b = 64 if GATES[mode] == 1 and not backward else (16 if backward and dtype == torch.float32 else 32)
    return dict(BLOCK_H=64, BLOCK_B=max(16, min(cap_b if aligned else 16, next_pow2(B))),
                BLOCK_K=(64 if dtype != torch.float32 else 32) if aligned else (32 if dtype != torch.float32 else 16),
                num_warps=4,
                num_stages=2 if aligned else 1)


def _check_int32(B: int, H: int, K: int) -> None:
    """The kernels index W_hh and one step's rows (at most (B, 4*H) elements, the saved
    activations) with int32 offsets: one step of the sequence, never the whole of it."""
    if max(4 * H * K, B * 4 * max(H, K)) >= 2 ** 31:
        raise ValueError(f"rnn: batch {B} x hidden {H} (x {K}) is too large for the per-step kernels' 32-bit "
                         "offsets (one step or W_hh would hold 2**31 elements or more)")


def _grid(cfg: dict, H: int, B: int):
    return (triton.cdiv(H, cfg["BLOCK_H"]), triton.cdiv(B, cfg["BLOCK_B"]))


def _slots(t: int, reverse: bool) -> tuple[int, int]:
    """(read, write) slots of step t in a (T+1)-slot state buffer: forward runs slot t -> t+1
    from h0 in slot 0, reverse runs slot t+1 -> t from h0 in slot T."""
    return (t + 1, t) if reverse else (t, t + 1)


def recurrence_fwd(mode: str, xg: torch.Tensor, h0: torch.Tensor, c0, w_hh: torch.Tensor, b_hn, w_hr, lengths):
    """The forward recurrence of one layer, one fused launch per step for both directions.

    Every tensor has a leading direction dim D (1, or 2 for a bidirectional layer: direction
    1 runs backwards in time). xg: (D, T, B, G*H) contiguous; h0: (D, B, K); c0: (D, B, H)
    float32 (LSTM) or None; w_hh: (D, G*H, K) contiguous; b_hn: (D, H) or None; w_hr:
    (D, P, H) or None; lengths: (B,) int64 on xg's device or None. Returns hbuf
    (D, T+1, B, K) in xg's dtype: the state before and after every step (`_slots`: h0 in
    slot 0, or slot T for direction 1), cbuf (D, T+1, B, H) float32 the same for LSTM's cell
    (else None), save (D, T, B, S*H) and hraw (D, T, B, H) (the unprojected output, proj only)."""
    D, T, B, GH = xg.shape
    G = GATES[mode]
    H = GH // G
    K = w_hh.shape[2]
    _check_int32(B, H, K)
    dev, dtype = xg.device, xg.dtype
    acc = acc_torch_dtype(dtype)
    hbuf = empty((D, T + 1, B, K), dtype=dtype, device=dev)
    cbuf = empty((D, T + 1, B, H), dtype=acc, device=dev) if mode == "LSTM" else None
    for d in range(D):
        first = T if d else 0
        hbuf[d, first] = h0[d]
        if cbuf is not None:
            cbuf[d, first] = c0[d]
    save = empty((D, T, B, SAVED[mode] * H), dtype=dtype, device=dev)
    hraw = empty((D, T, B, H), dtype=dtype, device=dev) if w_hr is not None else None
    live = (torch.arange(T, device=dev)[:, None] < lengths[None, :]).unsqueeze(-1) if (
        lengths is not None and w_hr is not None) else None
    cfg = step_config(mode, H, B, K, dtype, dev)
    grid = _grid(cfg, H, B) + (D,)
    dummy = xg   # stands for pointers a specialization never reads
    consts = dict(CELL=CELLS[mode], NGATE=G, NSAVE=SAVED[mode], HAS_BHN=b_hn is not None,
                  HAS_LEN=lengths is not None, PROJ=w_hr is not None, ACC=acc_dtype(dtype),
                  PRECISION=_precision(dtype, dev), **cfg)
    args = (xg, hbuf, w_hh, b_hn if b_hn is not None else dummy, cbuf if cbuf is not None else dummy,
            hraw if hraw is not None else dummy, save, lengths if lengths is not None else dummy)
    for s in range(T):
        _rnn_step_fwd_kernel[grid](*args, s, T, B, H, K, **consts)
        if w_hr is not None:
            # The projection needs every unit of h_raw: a GEMM per step and direction, then the
            # freeze of finished rows (the kernel froze c already).
            for d in range(D):
                t = T - 1 - s if d else s
                rd, wr = _slots(t, d == 1)
                torch.mm(hraw[d, t], w_hr[d].t(), out=hbuf[d, wr])
                if live is not None:
                    hbuf[d, wr] = torch.where(live[t], hbuf[d, wr], hbuf[d, rd])
    return hbuf, cbuf, save, hraw


def recurrence_bwd(mode: str, d_hbuf: torch.Tensor, d_cn, w_hh: torch.Tensor, w_hr, hbuf: torch.Tensor, cbuf,
                   save: torch.Tensor, hraw, lengths):
    """Backward through time of one layer (both directions in each launch).

    d_hbuf: (D, T+1, B, K) gradient of every step's state (the layer output and h_n
    together; the h0 slots are ignored); d_cn: (D, B, H) gradient of c_n or None. Returns
    (dxg (D, T, B, G*H) in the input dtype, dgh (the hidden-side gate gradients: dxg itself
    except for GRU), dh0 (D, B, K) float32, dc0 (D, B, H) float32 or None, dhp (D, T, B, P)
    float32 gradients of the projected states, proj only)."""
    D, T, B, K = hbuf.shape[0], hbuf.shape[1] - 1, hbuf.shape[2], hbuf.shape[3]
    G = GATES[mode]
    H = save.shape[3] // SAVED[mode]
    dev, dtype = hbuf.device, hbuf.dtype
    acc = acc_torch_dtype(dtype)
    dxg = empty((D, T, B, G * H), dtype=dtype, device=dev)
    dgh = empty((D, T, B, G * H), dtype=dtype, device=dev) if mode == "GRU" else dxg
    proj = w_hr is not None
    # Carries ping-pong between two halves per direction: step t reads what step t+1 wrote.
    chb = torch.zeros((D, 2, B, H), dtype=acc, device=dev)
    ccb = torch.zeros((D, 2, B, H), dtype=acc, device=dev) if mode == "LSTM" else chb
    if d_cn is not None and mode == "LSTM":
        ccb[:, 0] = d_cn
    chp = [torch.zeros((B, K), dtype=acc, device=dev) for _ in range(D)] if proj else None
    dhp = empty((D, T, B, K), dtype=acc, device=dev) if proj else None
    live = (torch.arange(T, device=dev)[:, None] < lengths[None, :]).unsqueeze(-1) if (
        lengths is not None and proj) else None
    cfg = step_config(mode, H, B, K, dtype, dev, backward=True)
    cfg = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_B=cfg["BLOCK_B"], BLOCK_R=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
               **({"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}))
    grid = _grid(cfg, H, B) + (D,)
    w_acc = w_hh.to(acc)
    wr_acc = w_hr.to(acc) if proj else None
    consts = dict(CELL=CELLS[mode], NGATE=G, NSAVE=SAVED[mode], HAS_CH=not proj, HAS_LEN=lengths is not None,
                  DY_SLOTS=not proj, ACC=acc_dtype(dtype), PRECISION=_precision(dtype, dev), **cfg)
    dy_proj = torch.empty((D, B, H), dtype=acc, device=dev) if proj else None
    args = (dgh, w_hh, dy_proj if proj else d_hbuf, chb, ccb, save, cbuf if cbuf is not None else hbuf, hbuf, dxg,
            lengths if lengths is not None else hbuf)
    par = 0
    for s in range(T):
        if proj:
            # The state is W_hr h_raw: its gradient (P-dim) gets the hidden-side GEMM here, then
            # goes back through W_hr to the cell's output.
            for d in range(D):
                t = s if d else T - 1 - s
                rd, wr = _slots(t, d == 1)
                dh_p = d_hbuf[d, wr].to(acc) + chp[d]
                if s:
                    dh_p.addmm_(dgh[d, t - 1 if d else t + 1].to(acc), w_acc[d])
                if live is not None:
                    chp[d] = torch.where(live[t], torch.zeros_like(dh_p), dh_p)
                    dh_p = torch.where(live[t], dh_p, torch.zeros_like(dh_p))
                dhp[d, t] = dh_p
                torch.mm(dh_p, wr_acc[d], out=dy_proj[d])
        _rnn_step_bwd_kernel[grid](*args, s, par, T, B, H, K, HAS_GEMM=s > 0 and not proj, **consts)
        par ^= 1
    # The first-processed step's hidden-side gradients reach h0 through W_hh.
    dh0 = torch.stack([(chp[d] if proj else chb[d, par]).addmm(dgh[d, T - 1 if d else 0].to(acc), w_acc[d])
                       for d in range(D)])
    dc0 = ccb[:, par] if mode == "LSTM" else None
    return dxg, dgh, dh0, dc0, dhp
