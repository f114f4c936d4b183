"""The VAE's diagonal Gaussian in one pass: reparameterized sample and KL to N(0, I).

moments is (B, 2C, ...) = [mean | logvar] (diffusers' DiagonalGaussianDistribution layout);
logvar is clamped to [lo, hi] (diffusers: [-30, 20]). Per element:

    sample = mean + exp(logvar / 2) * eps
    kl_b   = 1/2 * sum over the sample's elements of (mean^2 + exp(logvar) - 1 - logvar)

Forward reads moments once (and eps, unless it is drawn in the kernel from a Philox seed)
and writes the sample; the KL leaves one float32 partial sum per (sample, chunk), summed
afterwards in torch (deterministic, no atomics). Backward reads moments, the upstream
gradients (and eps, or regenerates it from the same seed: nothing of size B*C*H*W is saved)
and writes d moments; the clamp passes gradient only inside [lo, hi], as torch.clamp.
Math in float32 (float64 for float64 moments).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty


@triton.jit
def _clamped(lv, lo, hi):
    # Comparisons written so a NaN log-variance stays NaN (torch.clamp propagates it).
    return tl.where(lv < lo, lo, tl.where(lv > hi, hi, lv))


@triton.jit
def _gaussian_fwd_kernel(M, Eps, Seed, Out, KLpart, per_sample, n_chunks, lo, hi,
                         HAS_EPS: tl.constexpr, WANT_SAMPLE: tl.constexpr, WANT_KL: tl.constexpr,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b * 2 * per_sample
    mean = tl.load(M + base + offs, mask=mask, other=0.0).to(ACC)
    lv = _clamped(tl.load(M + base + per_sample + offs, mask=mask, other=0.0).to(ACC), lo, hi)
    if WANT_SAMPLE:
        if HAS_EPS:
            eps = tl.load(Eps + b * per_sample + offs, mask=mask, other=0.0).to(ACC)
        else:
            eps = tl.randn(tl.load(Seed), b * per_sample + offs).to(ACC)
        tl.store(Out + b * per_sample + offs, (mean + tl.exp(0.5 * lv) * eps).to(Out.dtype.element_ty), mask=mask)
    if WANT_KL:
        term = tl.where(mask, mean * mean + tl.exp(lv) - 1.0 - lv, 0.0)
        tl.store(KLpart + b * n_chunks + chunk, 0.5 * tl.sum(term, axis=0))


@triton.jit
def _gaussian_bwd_kernel(M, Eps, Seed, GS, GKL, DM, per_sample, lo, hi,
                         HAS_EPS: tl.constexpr, HAS_GS: tl.constexpr, HAS_GKL: tl.constexpr,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b * 2 * per_sample
    mean = tl.load(M + base + offs, mask=mask, other=0.0).to(ACC)
    raw = tl.load(M + base + per_sample + offs, mask=mask, other=0.0).to(ACC)
    lv = _clamped(raw, lo, hi)
    dmean = tl.zeros([BLOCK], dtype=ACC)
    dlv = tl.zeros([BLOCK], dtype=ACC)
    if HAS_GS:
        gs = tl.load(GS + b * per_sample + offs, mask=mask, other=0.0).to(ACC)
        if HAS_EPS:
            eps = tl.load(Eps + b * per_sample + offs, mask=mask, other=0.0).to(ACC)
        else:
            eps = tl.randn(tl.load(Seed), b * per_sample + offs).to(ACC)   # the forward's numbers again
        dmean += gs
        dlv += gs * eps * 0.5 * tl.exp(0.5 * lv)
    if HAS_GKL:
        gk = tl.load(GKL + b).to(ACC)
        dmean += gk * mean
        dlv += gk * 0.5 * (tl.exp(lv) - 1.0)
    dlv = tl.where((raw >= lo) & (raw <= hi), dlv, 0.0)
    tl.store(DM + base + offs, dmean.to(DM.dtype.element_ty), mask=mask)
    tl.store(DM + base + per_sample + offs, dlv.to(DM.dtype.element_ty), mask=mask)


def _config(per_sample: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 elements on 4 warps (8 per thread) per program on a GPU;
    float64 (gradcheck) 256: at 1024 the Philox state beside double-precision exp spilled
    8-12 bytes under Triton 3.6 or 3.9; the interpreter prefers fewer, bigger programs."""
    if not _common.gpu_launch(device):
        return 4096, 4
    return (256, 4) if dtype == torch.float64 else (1024, 4)


def gaussian_fwd(moments: torch.Tensor, eps: torch.Tensor | None, seed: torch.Tensor | None, lo: float, hi: float,
                 want_sample: bool, want_kl: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """moments: (B, 2C, ...) contiguous. Returns (sample (B, C, ...) or None, kl (B,) in the
    accumulator dtype or None)."""
    B = moments.shape[0]
    per = moments.numel() // (2 * B) if B else 0
    shape = (B, moments.shape[1] // 2) + tuple(moments.shape[2:])
    out = empty(shape, dtype=moments.dtype, device=moments.device) if want_sample else None
    acc = torch.float64 if moments.dtype == torch.float64 else torch.float32
    block, warps = _config(per, moments.device, moments.dtype)
    n_chunks = triton.cdiv(per, block) if per else 0
    part = _common.empty((B, n_chunks), dtype=acc, device=moments.device) if want_kl else None
    if B and per:
        _gaussian_fwd_kernel[(B, n_chunks)](
            moments, eps if eps is not None else moments, seed if seed is not None else moments,
            out if out is not None else moments, part if part is not None else moments, per, n_chunks,
            float(lo), float(hi), HAS_EPS=eps is not None, WANT_SAMPLE=want_sample, WANT_KL=want_kl,
            ACC=acc_dtype(moments.dtype), BLOCK=block, num_warps=warps)
    kl = part.sum(1) if want_kl else None
    return out, kl


def gaussian_bwd(moments: torch.Tensor, eps: torch.Tensor | None, seed: torch.Tensor | None,
                 gs: torch.Tensor | None, gkl: torch.Tensor | None, lo: float, hi: float) -> torch.Tensor:
    B = moments.shape[0]
    per = moments.numel() // (2 * B) if B else 0
    dm = empty(moments.shape, dtype=moments.dtype, device=moments.device)
    block, warps = _config(per, moments.device, moments.dtype)
    if B and per:
        _gaussian_bwd_kernel[(B, triton.cdiv(per, block))](
            moments, eps if eps is not None else moments, seed if seed is not None else moments,
            gs if gs is not None else moments, gkl if gkl is not None else moments, dm, per, float(lo), float(hi),
            HAS_EPS=eps is not None, HAS_GS=gs is not None, HAS_GKL=gkl is not None,
            ACC=acc_dtype(moments.dtype), BLOCK=block, num_warps=warps)
    return dm
