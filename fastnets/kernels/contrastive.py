"""CLIP / SigLIP contrastive losses, tiled: the (N x N) logits are never stored.

With A the image features and B the text features (N x D each), s the logit scale (the
multiplier itself) and b the bias, the logits are L = s * A Bᵀ + b, one tile at a time:

  softmax (CLIP):   loss = 1/(2N) * sum_i (lse_row_i - L_ii) + 1/(2N) * sum_j (lse_col_j - L_jj)
  sigmoid (SigLIP): loss = 1/N * sum_ij softplus(-y_ij L_ij),  y = +1 on the diagonal, -1 off it

Forward, one pass over the tiles for both directions. A program owns row blocks and sweeps
every column block; the row log-sum-exp is the usual online (max, sum) pair in registers.
The column log-sum-exp needs every row block, so each program folds its rows into its own
slot of a (programs x N) float32 buffer of partial column lse (read-modify-write, no atomics,
no races), and a second small kernel merges the slots. The buffer is O(programs * N), the
program count is capped at the SM count on a GPU: memory linear in the batch, never N².

Backward recomputes each tile (flash-attention style). dL / dL_ij is symmetric in form,

  softmax: g/(2N) * (exp(L_ij - lse_row_i) + exp(L_ij - lse_col_j) - 2 δ_ij)
  sigmoid: -g/N * y_ij * sigmoid(-y_ij L_ij),

so one kernel computes dA = s * dL B and is called again with the roles swapped (A <-> B,
lse_row <-> lse_col) for dB = s * dLᵀ A. The first call also leaves per-row partial sums,
from the tiles in registers, for ds = sum_ij dL_ij (A Bᵀ)_ij and db = sum_ij dL_ij, summed in
torch (N floats; deterministic). The (g / 2N) factor is applied to the float32 accumulator after
the matmul, so the tile fed to the tensor cores holds values in [-2, 2], which fp16 / bf16
represent well (at N = 32k the scaled values would sit in fp16's subnormals).

A program's gradient tile is (BLOCK_M x BLOCK_D) columns of the feature dim; when D is wider
than BLOCK_D the tile's logits are recomputed once per D block (the tuner picks between a
512-wide block, which covers CLIP's usual 512-dim features in one, and 256-wide ones). Inputs fp16 / bf16 run on
tensor cores with float32 accumulation; float32 on TF32 exactly when torch's matmuls may;
float64 (gradcheck) in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty, next_pow2

KIND_SOFTMAX = 0
KIND_SIGMOID = 1


@triton.jit
def _dot_tile(A, Bm, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
             ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, D, BLOCK_K):
        kk = k + offs_k
        a = tl.load(A + rows[:, None].to(tl.int64) * stride_a + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < D),
                    other=0.0)
        bt = tl.load(Bm + cols[:, None].to(tl.int64) * stride_b + kk[None, :], mask=col_ok[:, None] & (kk[None, :] < D),
                     other=0.0)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _softplus_neg(z):
    # -logsigmoid(z) = softplus(-z) = max(-z, 0) + log1p(exp(-|z|)), overflow-free both ways.
    # log1p by Goldberg's identity log1p(x) = x * log(u) / (u - 1), u = 1 + x rounded: exact to
    # a few ulps where log(1 + x) would lose every digit of a small x (a well-classified pair's
    # loss, e^-z, is all such digits).
    x = tl.exp(-tl.abs(z))
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(-z, 0.0) + log1p


@triton.jit
def _sigmoid(z):
    # From e^-|z| <= 1: never overflows, and keeps the relative precision of tiny values.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _clip_fwd_kernel(A, Bm, Scale, Bias, RowOut, Diag, ColPart, M, N, D, OFF, stride_a, stride_b, n_programs,
                     KIND: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A: (M, D) rows, Bm: (N, D) columns; row i's positive is column i + OFF. Per row:
    softmax -> RowOut = lse_row_i, Diag = L_i,i+OFF, and this program's column partials in
    ColPart[pid, :]; sigmoid -> RowOut = sum_j softplus(-y_ij L_ij)."""
    pid = tl.program_id(0)
    s = tl.load(Scale).to(ACC)
    b = 0.0
    if HAS_BIAS:
        b = tl.load(Bias).to(ACC)
    n_row_blocks = tl.cdiv(M, BLOCK_M)
    part = ColPart + pid.to(tl.int64) * N
    for rb in range(pid, n_row_blocks, n_programs):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        l_i = tl.zeros([BLOCK_M], dtype=ACC)
        acc_i = tl.zeros([BLOCK_M], dtype=ACC)      # softmax: L_ii; sigmoid: the row's loss
        for cb in range(0, tl.cdiv(N, BLOCK_N)):
            cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            logits = _dot_tile(A, Bm, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                               ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K) * s + b
            valid = row_ok[:, None] & col_ok[None, :]
            on_diag = cols[None, :] == rows[:, None] + OFF
            if KIND == 0:
                lg = tl.where(valid, logits, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(lg, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows past N
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), axis=1)
                m_i = m_new
                acc_i += tl.sum(tl.where(on_diag & valid, logits, 0.0), axis=1)
                # This tile's column lse over its rows, folded into the program's slot.
                cm = tl.max(lg, axis=0)
                cm_safe = tl.where(cm == float("-inf"), 0.0, cm)          # columns past N
                # Columns past N have no terms: log(1) keeps them finite (they are never stored).
                c_sum = tl.sum(tl.exp(lg - cm_safe[None, :]), axis=0)
                c_lse = tl.where(col_ok, cm_safe + tl.log(tl.where(col_ok, c_sum, 1.0)), float("-inf"))
                old = tl.load(part + cols, mask=col_ok, other=float("-inf"))
                hi = tl.maximum(old, c_lse)
                hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
                merged = hi_safe + tl.log(tl.where(col_ok, tl.exp(old - hi_safe) + tl.exp(c_lse - hi_safe), 1.0))
                tl.store(part + cols, merged, mask=col_ok)
            else:
                z = tl.where(on_diag, logits, -logits)
                acc_i += tl.sum(tl.where(valid, _softplus_neg(z), 0.0), axis=1)
        if KIND == 0:
            tl.store(RowOut + rows, m_i + tl.log(tl.where(row_ok, l_i, 1.0)), mask=row_ok)
            tl.store(Diag + rows, acc_i, mask=row_ok)
        else:
            tl.store(RowOut + rows, acc_i, mask=row_ok)


@triton.jit
def _clip_col_lse_kernel(ColPart, Out, N, n_parts, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """lse_col_j = logsumexp over the programs' partial column lse (each is finite: every
    program saw at least one row)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    hi = tl.full([BLOCK], float("-inf"), dtype=ACC)
    for p in range(0, n_parts):
        hi = tl.maximum(hi, tl.load(ColPart + p * N + cols, mask=ok, other=0.0))
    total = tl.zeros([BLOCK], dtype=ACC)
    for p in range(0, n_parts):
        total += tl.exp(tl.load(ColPart + p * N + cols, mask=ok, other=0.0) - hi)
    tl.store(Out + cols, hi + tl.log(total), mask=ok)


@triton.jit
def _clip_bwd_kernel(A, Bm, LseA, LseB, Scale, Bias, Gout, DA, RowDS, RowDB, M, N, D, OFF, stride_a, stride_b,
                     stride_da,
                     KIND: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_SUMS: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """dA[rows, d block] = s * g * (dL~ B)[rows, d block], dL~ the unscaled tile above and
    Gout = g already divided by the loss's normaliser (2M softmax, M sigmoid). WANT_SUMS: RowDS[row, d block] = A·(dL B) over the
    block, RowDB[row] = sum_j dL_ij (d block 0 only)."""
    rb = tl.program_id(0)
    db_id = tl.program_id(1)
    s = tl.load(Scale).to(ACC)
    b = 0.0
    if HAS_BIAS:
        b = tl.load(Bias).to(ACC)
    g = tl.load(Gout).to(ACC)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_d = db_id * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if KIND == 0:
        lse_a = tl.load(LseA + rows, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC)
    row_ds = tl.zeros([BLOCK_M], dtype=ACC)
    for cb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dots = _dot_tile(A, Bm, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                         ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        logits = dots * s + b
        valid = row_ok[:, None] & col_ok[None, :]
        on_diag = cols[None, :] == rows[:, None] + OFF
        if KIND == 0:
            lse_b = tl.load(LseB + cols, mask=col_ok, other=0.0).to(ACC)
            dl = tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :]) - tl.where(on_diag, 2.0, 0.0)
        else:
            y = tl.where(on_diag, 1.0, -1.0)
            dl = -y * _sigmoid(-y * logits)
        dl = tl.where(valid, dl, 0.0)
        if WANT_SUMS:
            row_sum += tl.sum(dl, axis=1)
            # ds = sum_ij dL_ij S_ij from the tile in registers: no second read of A.
            row_ds += tl.sum(dl * dots, axis=1)
        bd = tl.load(Bm + cols[:, None].to(tl.int64) * stride_b + offs_d[None, :],
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(dl.to(bd.dtype), bd, acc, input_precision=PREC, out_dtype=ACC)
    acc = acc * g
    out_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(DA + rows[:, None].to(tl.int64) * stride_da + offs_d[None, :], (acc * s).to(DA.dtype.element_ty),
             mask=out_mask)
    if WANT_SUMS:
        if db_id == 0:
            tl.store(RowDS + rows, row_ds * g, mask=row_ok)
            tl.store(RowDB + rows, row_sum * g, mask=row_ok)


@triton.jit
def _zero_shot_logits_kernel(X, W, Scale, Out, B, C, D, stride_x, stride_wd, stride_wc, stride_o,
                             NORMALIZE: tl.constexpr, W_BY_CLASS: tl.constexpr, ACC: tl.constexpr,
                             PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """Out = scale * normalize(X) @ W. A row's L2 norm scales the whole row of X @ W, so it is
    accumulated beside the dot in the same K loop and applied to the tile at the end: the
    features are read once, the normalised copy is never written."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < B, cols < C
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    sq = tl.zeros([BLOCK_M], dtype=ACC)
    for k in range(0, D, BLOCK_K):
        kk = k + offs_k
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < D),
                    other=0.0)
        if W_BY_CLASS:
            # (C, D) storage seen as (D, C): load (classes, k) rows, contiguous in k, and
            # transpose the tile in the dot (a strided (k, classes) load spilled 100-440 B).
            wt = tl.load(W + cols[:, None].to(tl.int64) * stride_wc + kk[None, :].to(tl.int64) * stride_wd,
                         mask=col_ok[:, None] & (kk[None, :] < D), other=0.0)
            acc = tl.dot(x, tl.trans(wt.to(x.dtype)), acc, input_precision=PREC, out_dtype=ACC)
        else:
            w = tl.load(W + kk[:, None].to(tl.int64) * stride_wd + cols[None, :].to(tl.int64) * stride_wc,
                        mask=(kk[:, None] < D) & col_ok[None, :], other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC, out_dtype=ACC)
        if NORMALIZE:
            xf = x.to(ACC)
            sq += tl.sum(xf * xf, axis=1)
    factor = tl.load(Scale).to(ACC) + tl.zeros([BLOCK_M], dtype=ACC)
    if NORMALIZE:
        # F.normalize: x / max(||x||, 1e-12).
        factor = factor / tl.maximum(tl.sqrt(sq), 1e-12)
    tl.store(Out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], (acc * factor[:, None]).to(
        Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --- launch configuration ---------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 features use TF32 tensor cores exactly when torch's matmuls may (so the loss is
    as exact as torch's own A @ B.T under the same setting)."""
    return _common.float32_precision(dtype, device, torch.backends.cuda.matmul.allow_tf32)


def _arith(dtype: torch.dtype, device: torch.device) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "tc"
    if dtype == torch.float32:
        return "tf32" if _precision(dtype, device) == "tf32" else "fma"
    return "fp64"


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the forward and (BLOCK_M, BLOCK_N, BLOCK_K,
# BLOCK_D, warps, stages) of the backward, per arithmetic. The forward is a GEMM with a
# softmax epilogue per tile (flash attention's forward without the PV product): wide row
# tiles over the K loop. The backward holds a (BLOCK_M x BLOCK_D) float32 accumulator beside
# the logits tile, so BLOCK_D = 128 at 8 warps (64 registers of accumulator a thread); wider
# feature dims take more D blocks. FMA (IEEE fp32) and fp64 tiles live in plain registers:
# small. Chosen spill-free in the static report (`python -m fastnets kernels`).
_FWD_TILES = {
    "tc": (64, 64, 64, 8, 3),
    "tf32": (128, 32, 32, 8, 3),
    "fma": (16, 16, 16, 4, 2),
    "fp64": (32, 16, 16, 4, 1),
}
_BWD_TILES = {
    # Tuned between: the whole of a 512-wide feature dim in one program (no logits recompute
    # across D blocks, 128 accumulator registers a thread) and 256-wide D blocks with wider
    # column tiles.
    "tc": ((64, 32, 64, 512, 8, 2), (64, 64, 64, 256, 8, 2)),
    "tf32": ((64, 32, 32, 128, 8, 2),),
    "fma": ((16, 32, 16, 32, 4, 1),),
    "fp64": ((16, 16, 16, 16, 4, 1),),
}
# The interpreter runs programs one after another: fewer, bigger tiles are faster on a CPU.
_INTERPRET_FWD = (64, 64, 64, 4, 1)
_INTERPRET_BWD = (64, 64, 64, 64, 4, 1)


def _fwd_tiles(dtype: torch.dtype, device: torch.device):
    return _FWD_TILES[_arith(dtype, device)] if _common.gpu_launch(device) else _INTERPRET_FWD


def _bwd_configs(dtype: torch.dtype, D: int, device: torch.device) -> list[dict]:
    cands = _BWD_TILES[_arith(dtype, device)] if _common.gpu_launch(device) else (_INTERPRET_BWD,)
    out = []
    for bm, bn, bk, bd, w, st in cands:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": min(bk, max(16, next_pow2(D))),
               "BLOCK_D": min(bd, max(16, next_pow2(D))), "num_warps": w, "num_stages": st}
        if cfg not in out:
            out.append(cfg)
    return out


def _bias_ptr(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else like


def clip_loss_stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kind: int,
                    off: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a: (M, D) rows, b: (N, D) columns, unit stride on D; row i's positive is column i + off.
    scale / bias: 1-element tensors on the device. Returns, in the accumulator dtype:
      softmax: (lse_row (M,), L_i,i+off (M,), lse_col over these M rows (N,))
      sigmoid: (per-row sum of softplus(-y L) (M,), empty, empty)"""
    M, D = a.shape
    N = b.shape[0]
    acc = _common.acc_torch_dtype(a.dtype)
    bm, bn, bk, warps, stages = _fwd_tiles(a.dtype, a.device)
    bk = min(bk, max(16, next_pow2(D)))
    n_row_blocks = triton.cdiv(M, bm)
    programs = (_common.persistent_programs(a.device, n_row_blocks, per_sm=1) if _common.gpu_launch(a.device)
                else n_row_blocks)
    row_out = empty((M,), dtype=acc, device=a.device)
    nothing = a.new_empty((0,), dtype=acc)
    if kind == KIND_SOFTMAX:
        diag = empty((M,), dtype=acc, device=a.device)
        # -inf is the empty log-sum-exp: a program's first visit to a column merges into it.
        part = torch.full((programs, N), float("-inf"), dtype=acc, device=a.device)
    else:
        diag = part = row_out
    _clip_fwd_kernel[(programs,)](
        a, b, scale, _bias_ptr(bias, scale), row_out, diag, part, M, N, D, off, a.stride(0), b.stride(0), programs,
        KIND=kind, HAS_BIAS=bias is not None, ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype, a.device),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if kind == KIND_SIGMOID:
        return row_out, nothing, a.new_empty((0,), dtype=acc)
    lse_col = empty((N,), dtype=acc, device=a.device)
    block = 1024 if _common.gpu_launch(a.device) else 4096
    _clip_col_lse_kernel[(triton.cdiv(N, block),)](part, lse_col, N, programs, ACC=acc_dtype(a.dtype), BLOCK=block,
                                                   num_warps=4)
    return row_out, diag, lse_col


def clip_loss_bwd(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  lse_row: torch.Tensor, lse_col: torch.Tensor, kind: int, off: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da (M, D), db (N, D), dscale (1,), dbias (1,)) for g: the upstream gradient already
    divided by the loss's normaliser, a 1-element accumulator-dtype tensor. db is this row
    block's contribution (the whole gradient in one process)."""
    M, D = a.shape
    N = b.shape[0]
    acc = _common.acc_torch_dtype(a.dtype)
    da = empty((M, D), dtype=a.dtype, device=a.device)
    dbm = empty((N, D), dtype=b.dtype, device=b.device)
    row_ds = empty((M,), dtype=acc, device=a.device)
    row_db = empty((M,), dtype=acc, device=a.device)
    common = dict(KIND=kind, HAS_BIAS=bias is not None, ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype, a.device))
    lse_r = lse_row if kind == KIND_SOFTMAX else row_db
    lse_c = lse_col if kind == KIND_SOFTMAX else row_db
    bias_p = _bias_ptr(bias, scale)
    configs = _bwd_configs(a.dtype, D, a.device)
    key = (str(a.dtype), next_pow2(D), kind, bias is not None)
    if M and N:
        _common.tuned_launch(
            _clip_bwd_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(D, c["BLOCK_D"])), configs,
            key + ("a",), a.device, a, b, lse_r, lse_c, scale, bias_p, g, da, row_ds, row_db, M, N, D, off,
            a.stride(0), b.stride(0), da.stride(0), WANT_SUMS=True, **common)
        # The transpose: B's rows against A's columns, each column j's positive at row j - off.
        _common.tuned_launch(
            _clip_bwd_kernel, lambda c: (triton.cdiv(N, c["BLOCK_M"]), triton.cdiv(D, c["BLOCK_D"])), configs,
            key + ("b",), a.device, b, a, lse_c, lse_r, scale, bias_p, g, dbm, row_ds, row_db, N, M, D, -off,
            b.stride(0), a.stride(0), dbm.stride(0), WANT_SUMS=False, **common)
    else:
        da.zero_(), dbm.zero_(), row_ds.zero_(), row_db.zero_()
    return da, dbm, row_ds.sum().reshape(1), row_db.sum().reshape(1)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): a plain GEMM tile with a per-row epilogue.
_ZERO_SHOT_TILES = {"tc": (64, 64, 32, 4, 3), "tf32": (64, 64, 32, 4, 3), "fma": (32, 32, 16, 4, 2),
                    "fp64": (16, 32, 16, 4, 1)}


def zero_shot_logits(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """scale * normalize(x) @ w for x (B, D) with unit stride on D and w (D, C) (any strides)."""
    B, D = x.shape
    C = w.shape[1]
    out = empty((B, C), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = (_ZERO_SHOT_TILES[_arith(x.dtype, x.device)] if _common.gpu_launch(x.device)
                                 else (64, 64, 64, 4, 1))
    bk = min(bk, max(16, next_pow2(D)))
    if B and C:
        _zero_shot_logits_kernel[(triton.cdiv(B, bm), triton.cdiv(C, bn))](
            x, w, scale, out, B, C, D, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
            NORMALIZE=normalize, W_BY_CLASS=w.stride(0) == 1 and C > 1, ACC=acc_dtype(x.dtype),
            PREC=_precision(x.dtype, x.device),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out
