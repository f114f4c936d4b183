"""Cross-entropy fused with the softmax, streamed over the vocabulary in BLOCK_V chunks, so
no (rows, vocab) float32 copy of the logits is ever made.

One program per row. Pass 1 (skipped when the log-sum-exp is given): online max / sum of
exp and, for label smoothing, the (class-weighted) sum of the logits. The loss per row is
    (1 - eps) * w[t] * (lse - x[t]) + eps / V * (W * lse - sum_c w[c] x[c]) + z * lse^2
with W = sum_c w[c] (w = 1 without class weights), and 0 on ignored rows. Pass 2 (when a
gradient is wanted) writes, scaled by that row's upstream gradient g,
    dx[c] = g * ((1 - eps) w[t] (p[c] - [c == t]) + eps / V (W p[c] - w[c]) + 2 z lse p[c])
where p = softmax(x). All arithmetic is float32 whatever the logits dtype (float64 for float64); dx may overwrite
the logits in place (each program reads a chunk before writing it), which is how the fused
linear + cross-entropy keeps one chunk of logits alive at a time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import empty, next_pow2


@triton.jit
def _cross_entropy_kernel(
    LOGITS, TARGET, WEIGHT, WSUM, LOSS, LSE, DLOGITS, GRAD,   # WSUM: 1-element float32 sum of class weights
    stride_l, stride_d, stride_g, V, ignore_index, eps, z_loss,
    HAS_WEIGHT: tl.constexpr, LSE_GIVEN: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # float32 math (float64 for float64 logits, so float64 gradcheck is exact).
    ACC: tl.constexpr = tl.float64 if LOGITS.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    t = tl.load(TARGET + row).to(tl.int64)
    ignored = t == ignore_index
    # A class outside [0, V) that is not ignore_index is never read: its row's loss and
    # gradient become NaN (the launcher checks CPU targets on the host; on a GPU this avoids
    # a device-to-host sync per call while keeping the error visible).
    t_ok = (t >= 0) & (t < V)
    bad = (t_ok == 0) & (ignored == 0)   # (bool tensors: no `not` in Triton)
    cols0 = tl.arange(0, BLOCK_V)
    w_sum = tl.load(WSUM) if HAS_WEIGHT else V * 1.0
    w_t = tl.load(WEIGHT + t, mask=t_ok, other=0.0).to(ACC) if HAS_WEIGHT else 1.0
    if LSE_GIVEN:
        lse = tl.load(LSE + row)
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        sum_x = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            # -inf logits (masked vocabulary entries): while every logit so far is -inf the
            # running max is too, and exp(-inf - -inf) would be NaN; shift by 0 then (s stays 0).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            m = m_new
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cols, mask=ok, other=0.0).to(ACC)
                sum_x += tl.sum(tl.where(ok, x, 0.0) * w, 0)
            else:
                sum_x += tl.sum(tl.where(ok, x, 0.0), 0)
        lse = m + tl.log(s)
        if WRITE_LOSS:
            x_t = tl.load(base + t, mask=t_ok, other=0.0).to(ACC)
            loss = (1.0 - eps) * w_t * (lse - x_t) + z_loss * lse * lse
            # The smoothing term only with smoothing: at eps = 0 a -inf logit would make it 0 * inf.
            loss += tl.where(eps != 0.0, eps / V * (w_sum * lse - sum_x), 0.0)
            loss = tl.where(bad, float("nan"), loss)
            tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
            tl.store(LSE + row, lse)
    if WRITE_GRAD:
        g = tl.load(GRAD + row * stride_g).to(ACC)
        g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
        coef_p = (1.0 - eps) * w_t + eps / V * w_sum + 2.0 * z_loss * lse
        out = DLOGITS + row * stride_d
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(ACC)
            d = coef_p * tl.exp(x - lse)
            if HAS_WEIGHT:
                d -= eps / V * tl.load(WEIGHT + cols, mask=ok, other=0.0).to(ACC)
            else:
                d -= eps / V
            d = tl.where(cols == t, d - (1.0 - eps) * w_t, d)
            tl.store(out + cols, (d * g).to(DLOGITS.dtype.element_ty), mask=ok)


def _launch(logits, target, weight, wsum, loss, lse, dlogits, grad, stride_g, ignore_index, eps, z_loss,
            lse_given, write_loss, write_grad):
    N, V = logits.shape
    if N == 0:
        return
    gpu = _common.gpu_launch(logits.device)
    # 8192 columns on 16 warps: 16 a thread. float64 (float64 math, two registers a value) takes
    # 512 on 4 warps: every larger tile, and 256, left a 4-8 byte spill in some variant under
    # Triton 3.6's ptxas (at 32-72 registers; the static report was read for each).
    block_v = min(next_pow2(V), (512 if logits.dtype == torch.float64 else 8192) if gpu else 65536)
    if logits.dtype == torch.float64:
        warps = 4
    else:
        warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    dummy = lse
    _cross_entropy_kernel[(N,)](
        logits, target, weight if weight is not None else dummy, wsum if wsum is not None else dummy,
        loss if loss is not None else dummy, lse, dlogits if dlogits is not None else logits,
        grad if grad is not None else dummy, logits.stride(0), dlogits.stride(0) if dlogits is not None else 0,
        stride_g, V, ignore_index, float(eps), float(z_loss),
        HAS_WEIGHT=weight is not None, LSE_GIVEN=lse_given, WRITE_LOSS=write_loss, WRITE_GRAD=write_grad,
        BLOCK_V=block_v, num_warps=warps if gpu else 4)


def cross_entropy_fwd(logits, target, weight, wsum, ignore_index: int, eps: float, z_loss: float):
    """(loss per row, lse per row), both float32 (float64 for float64 logits). logits (N, V)
    with unit column stride."""
    N = logits.shape[0]
    loss = empty((N,), dtype=_common.acc_torch_dtype(logits.dtype), device=logits.device)
    lse = empty((N,), dtype=_common.acc_torch_dtype(logits.dtype), device=logits.device)
    _launch(logits, target, weight, wsum, loss, lse, None, None, 0, ignore_index, eps, z_loss, False, True, False)
    return loss, lse


def cross_entropy_bwd(grad, logits, target, weight, wsum, lse, ignore_index: int, eps: float, z_loss: float):
    """dlogits (logits' dtype) for per-row upstream gradients `grad` (any stride, 0 = broadcast)."""
    dlogits = empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch(logits, target, weight, wsum, None, lse, dlogits, grad, grad.stride(0) if grad.dim() else 0,
            ignore_index, eps, z_loss, True, False, True)
    return dlogits


def cross_entropy_fwd_grad_(logits, target, weight, wsum, grad_scale, ignore_index: int, eps: float, z_loss: float):
    """Loss per row and, in place of the logits, their gradient times grad_scale (a 1-element
    float32 tensor): the fused linear + cross-entropy's per-chunk step."""
    N = logits.shape[0]
    loss = empty((N,), dtype=_common.acc_torch_dtype(logits.dtype), device=logits.device)
    lse = empty((N,), dtype=_common.acc_torch_dtype(logits.dtype), device=logits.device)
    _launch(logits, target, weight, wsum, loss, lse, logits, grad_scale, 0, ignore_index, eps, z_loss,
            False, True, True)
    return loss, lse
