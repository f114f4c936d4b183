"""Diffusion sampling and training kernels: the fused sampler step, the forward process
(q_sample with its training target) and the sinusoidal timestep embedding.

Every sampler of fastnets.diffusion (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M
and its SDE form) is one affine map per element once its per-step scalars are known:

    x'  = x + k_pre * noise                        (Euler's churn)
    x0  = clip(a_x * x' + a_m * m)                 (prediction type -> predicted x0)
    out = p * x' + q * x0 + s * m + r * std * noise + u * hist
    hist <- x0                                     (DPM-Solver++'s multistep history)

with m the model output (classifier-free guidance applied first: u + g (c - u)). The
schedulers compute those scalars on the host once per schedule, in float64, into a
(steps, N_COEFS) table on the device; the kernel reads row `index[0]`, where index is a
device tensor the sampling loop advances. So a step needs no host scalar at launch time,
a CUDA graph of the step replays with the right coefficients, and nothing syncs.

Memory-bound: one read of x, m (twice with guidance: both halves of the batched output),
noise and hist, one write of out (and x0 / hist when asked). Math in float32 (float64 for
float64 samples); libdevice is avoided so the interpreter runs the same code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty, table_row

# Columns of a coefficient row, in order.
COEFS = ("k_pre", "a_x", "a_m", "p", "q", "s", "r", "u", "lmin", "lmax")
N_COEFS = len(COEFS)
# Per-element noise scale: none (r * noise), the model's predicted variance ("learned":
# std = sqrt(v)) or its interpolation between log bounds ("learned_range").
VAR_MODES = {"none": 0, "learned": 1, "learned_range": 2}
# What q_sample writes besides x_t: nothing (epsilon and sample targets are inputs) or v.
Q_TARGETS = {"none": 0, "v_prediction": 1}


@triton.jit
def _sampler_step_kernel(X, M, Noise, Hist, Out, X0, Coef, Index, Thresh, Rescale,
                         numel, per_sample, m_stride, cond_offset, var_offset, guidance, clip_range, steps,
                         NCOEF: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_HIST: tl.constexpr,
                         WRITE_X0: tl.constexpr, CFG: tl.constexpr, RESCALE: tl.constexpr, CLIP: tl.constexpr,
                         THRESH: tl.constexpr, VAR_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # The step's coefficients: one row of the schedule table, picked by a device index (the
    # user's: a step outside the table reads row 0 and the step comes out NaN).
    step, step_ok = table_row(tl.load(Index).to(tl.int64), steps)
    row = Coef + step * NCOEF
    bad = tl.where(step_ok, 0.0, float("nan")).to(ACC)   # NaN + c poisons every coefficient
    k_pre = tl.load(row + 0).to(ACC) + bad
    a_x = tl.load(row + 1).to(ACC) + bad
    a_m = tl.load(row + 2).to(ACC) + bad
    p = tl.load(row + 3).to(ACC) + bad
    q = tl.load(row + 4).to(ACC) + bad
    s = tl.load(row + 5).to(ACC) + bad
    r = tl.load(row + 6).to(ACC) + bad
    u = tl.load(row + 7).to(ACC) + bad
    # The model output may have more channels per sample (learned variance) and twice the
    # batch (guidance: [uncond | cond]); sample b's element j sits at b * m_stride + j.
    b = offs // per_sample
    m_offs = b * m_stride + (offs - b * per_sample)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    m = tl.load(M + m_offs, mask=mask, other=0.0).to(ACC)
    if CFG:
        mc = tl.load(M + m_offs + cond_offset, mask=mask, other=0.0).to(ACC)
        m = m + guidance * (mc - m)
        if RESCALE:
            m = m * tl.load(Rescale + b, mask=mask, other=1.0).to(ACC)
    if HAS_NOISE:
        n = tl.load(Noise + offs, mask=mask, other=0.0).to(ACC)
        x = x + k_pre * n
    x0 = a_x * x + a_m * m
    if THRESH:
        # Dynamic thresholding: the per-sample quantile s >= 1 comes precomputed.
        thr = tl.load(Thresh + b, mask=mask, other=1.0).to(ACC)
        x0 = tl.minimum(tl.maximum(x0, -thr), thr) / thr
    elif CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    out = p * x + q * x0 + s * m
    if HAS_NOISE:
        if VAR_MODE == 1:
            v = tl.load(M + m_offs + var_offset + cond_offset, mask=mask, other=1.0).to(ACC)
            out += r * tl.sqrt(v) * n
        elif VAR_MODE == 2:
            v = tl.load(M + m_offs + var_offset + cond_offset, mask=mask, other=0.0).to(ACC)
            lmin = tl.load(row + 8).to(ACC)
            lmax = tl.load(row + 9).to(ACC)
            frac = (v + 1.0) * 0.5
            out += r * tl.exp(0.5 * (frac * lmax + (1.0 - frac) * lmin)) * n
        else:
            out += r * n
    if HAS_HIST:
        # Each element's history is read and replaced by the same program: in place is safe.
        h = tl.load(Hist + offs, mask=mask, other=0.0).to(ACC)
        out += u * h
        tl.store(Hist + offs, x0.to(Hist.dtype.element_ty), mask=mask)
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=mask)


def sampler_step(x: torch.Tensor, m: torch.Tensor, coef: torch.Tensor, index: torch.Tensor,
                 noise: torch.Tensor | None, hist: torch.Tensor | None, thresh: torch.Tensor | None,
                 rescale: torch.Tensor | None, guidance: float | None, clip_range: float | None,
                 var_mode: str, write_x0: bool, x0_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, ...) contiguous; m: (B or 2B with guidance, C_m, ...) contiguous, C_m = 2C with a
    learned variance; coef: (steps, N_COEFS) in the compute dtype; index: 1-element integer
    tensor; noise / hist shaped like x; thresh / rescale: (B,) float. hist is updated in place."""
    B = x.shape[0]
    numel = x.numel()
    per_sample = numel // B if B else 0
    m_stride = m.numel() // m.shape[0] if m.shape[0] else 0
    cfg = guidance is not None
    out = empty(x.shape, dtype=x.dtype, device=x.device)
    x0 = empty(x.shape, dtype=x0_dtype, device=x.device) if write_x0 else None
    if numel == 0:
        return out, x0
    block, warps = _common.pointwise_config(numel, x.device)
    _sampler_step_kernel[(triton.cdiv(numel, block),)](
        x, m, noise if noise is not None else x, hist if hist is not None else x, out,
        x0 if x0 is not None else out, coef, index, thresh if thresh is not None else coef,
        rescale if rescale is not None else coef,
        numel, per_sample, m_stride, B * m_stride if cfg else 0, per_sample,
        float(guidance) if cfg else 0.0, float(clip_range) if clip_range is not None else 0.0, coef.shape[0],
        NCOEF=N_COEFS, HAS_NOISE=noise is not None, HAS_HIST=hist is not None, WRITE_X0=write_x0, CFG=cfg,
        RESCALE=rescale is not None, CLIP=clip_range is not None, THRESH=thresh is not None,
        VAR_MODE=VAR_MODES[var_mode], ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    return out, x0


@triton.jit
def _q_sample_kernel(A, Bv, T, Table, Out1, Out2, numel, per_sample, steps,
                     BACKWARD: tl.constexpr, TARGET: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Forward (A = x0, B = noise): Out1 = x_t = c x0 + d noise; with TARGET (v): Out2 =
    c noise - d x0. Backward (A = dx_t, B = dv): Out1 = dx0 = c dx_t - d dv, Out2 = dnoise
    = d dx_t + c dv. c = sqrt(alphas_cumprod[t]), d = sqrt(1 - alphas_cumprod[t]), per sample."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = offs // per_sample
    # timesteps are the user's: one outside the table reads row 0 and its sample comes out NaN
    t, t_ok = table_row(tl.load(T + b, mask=mask, other=0).to(tl.int64), steps)
    bad = tl.where(t_ok, 0.0, float("nan")).to(ACC)
    c = tl.load(Table + 2 * t, mask=mask, other=0.0).to(ACC) + bad
    d = tl.load(Table + 2 * t + 1, mask=mask, other=0.0).to(ACC) + bad
    a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        bv = tl.load(Bv + offs, mask=mask, other=0.0).to(ACC)
    if not BACKWARD:
        tl.store(Out1 + offs, (c * a + d * bv).to(Out1.dtype.element_ty), mask=mask)
        if TARGET == 1:
            tl.store(Out2 + offs, (c * bv - d * a).to(Out2.dtype.element_ty), mask=mask)
    else:
        dx0 = c * a
        dn = d * a
        if HAS_B:
            dx0 -= d * bv
            dn += c * bv
        tl.store(Out1 + offs, dx0.to(Out1.dtype.element_ty), mask=mask)
        tl.store(Out2 + offs, dn.to(Out2.dtype.element_ty), mask=mask)


def _q_launch(a, bv, t, table, out1, out2, backward, target):
    numel = a.numel()
    if numel == 0:
        return
    block, warps = _common.pointwise_config(numel, a.device)
    _q_sample_kernel[(triton.cdiv(numel, block),)](
        a, bv if bv is not None else a, t, table, out1, out2 if out2 is not None else out1, numel,
        numel // a.shape[0], table.shape[0], BACKWARD=backward, TARGET=Q_TARGETS[target], HAS_B=bv is not None,
        ACC=acc_dtype(a.dtype), BLOCK=block, num_warps=warps)


def q_sample_fwd(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                 target: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0, noise: (B, ...) contiguous; t: (B,) integer; table: (T, 2) [sqrt(abar), sqrt(1 - abar)]."""
    xt = empty(x0.shape, dtype=x0.dtype, device=x0.device)
    v = empty(x0.shape, dtype=x0.dtype, device=x0.device) if target == "v_prediction" else None
    _q_launch(x0, noise, t, table, xt, v, False, target)
    return xt, v


def q_sample_bwd(dxt: torch.Tensor, dv: torch.Tensor | None, t: torch.Tensor,
                 table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx0 = empty(dxt.shape, dtype=dxt.dtype, device=dxt.device)
    dnoise = empty(dxt.shape, dtype=dxt.dtype, device=dxt.device)
    _q_launch(dxt, dv, t, table, dx0, dnoise, True, "none")
    return dx0, dnoise


@triton.jit
def _sincos(x):
    """(sin x, cos x) in float32 for |x| up to ~1e5: Cody-Waite reduction by pi/2 in three
    parts (k * the high part is exact), then cephes' minimax polynomials on [-pi/4, pi/4]
    (~1 ulp). tl.sin / tl.cos would carry libdevice's Payne-Hanek path for huge arguments,
    whose local-memory array the compiled code reports as spills."""
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.549789954891882e-8
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = k.to(tl.int32) & 3
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def _timestep_embedding_kernel(T, Freq, Out, n, half, dim, scale,
                               FLIP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Out[i] = [sin(scale * t_i * f) | cos(scale * t_i * f)] (halves swapped when FLIP); an
    odd dim leaves a zero last column. The frequencies come from a table computed by torch
    exactly as diffusers does, so only the product and sin/cos are ours."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    t = tl.load(T + rows, mask=rmask, other=0).to(tl.float32)
    out_row = Out + rows.to(tl.int64)[:, None] * dim
    for start in range(0, half, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        cmask = cols < half
        f = tl.load(Freq + cols, mask=cmask, other=0.0)
        arg = scale * (t[:, None] * f[None, :])
        mask = rmask[:, None] & cmask[None, :]
        sin_cols = cols + half if FLIP else cols
        cos_cols = cols if FLIP else cols + half
        sin, cos = _sincos(arg)
        tl.store(out_row + sin_cols[None, :], sin.to(Out.dtype.element_ty), mask=mask)
        tl.store(out_row + cos_cols[None, :], cos.to(Out.dtype.element_ty), mask=mask)
    if dim > 2 * half:
        tl.store(Out + rows.to(tl.int64) * dim + 2 * half, tl.zeros([BLOCK_N], dtype=tl.float32).to(
            Out.dtype.element_ty), mask=rmask)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor, dim: int, scale: float, flip: bool,
                       dtype: torch.dtype) -> torch.Tensor:
    """t: (N,) any numeric dtype; freqs: (dim // 2,) float32. Returns (N, dim) in dtype."""
    n = t.shape[0]
    half = dim // 2
    out = empty((n, dim), dtype=dtype, device=t.device)
    if n == 0:
        return out
    block_h = min(128, _common.next_pow2(half))
    block_n = 16 if _common.gpu_launch(t.device) else 64
    _timestep_embedding_kernel[(triton.cdiv(n, block_n),)](
        t, freqs, out, n, half, dim, float(scale), FLIP=flip, BLOCK_N=block_n, BLOCK_H=block_h, num_warps=4)
    return out
