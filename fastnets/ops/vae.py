"""gaussian_sample_kl: a VAE's reparameterized sample and its KL to N(0, I) from the
encoder's moments, one fused kernel forward and one backward (fastnets/kernels/vae.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._random import randn_like_diffusers
from . import _checks

LOGVAR_RANGE = (-30.0, 20.0)   # diffusers' DiagonalGaussianDistribution clamp


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vae_kernels():
    from ..kernels import vae
    return vae


_dispatch.register_op("gaussian_sample_kl", "VAE reparameterization mean + exp(logvar/2) eps and the KL to N(0, I) "
                                            "in one pass (eps given, from a generator, or Philox in the kernel)")


@torch.library.custom_op("fastnets::gaussian_fwd", mutates_args=())
def _gaussian_fwd(moments: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], lo: float, hi: float,
                  want_sample: bool, want_kl: bool) -> tuple[Tensor, Tensor]:
    out, kl = _vae_kernels().gaussian_fwd(moments, eps, seed, lo, hi, want_sample, want_kl)
    return out if out is not None else moments.new_empty((0,)), kl if kl is not None else moments.new_empty((0,))


@_gaussian_fwd.register_fake
def _(moments, eps, seed, lo, hi, want_sample, want_kl):
    shape = (moments.shape[0], moments.shape[1] // 2) + tuple(moments.shape[2:])
    return (moments.new_empty(shape) if want_sample else moments.new_empty((0,)),
            moments.new_empty((moments.shape[0],), dtype=_acc(moments.dtype)) if want_kl else moments.new_empty((0,)))


@torch.library.custom_op("fastnets::gaussian_bwd", mutates_args=())
def _gaussian_bwd(moments: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], gs: Optional[Tensor],
                  gkl: Optional[Tensor], lo: float, hi: float) -> Tensor:
    return _vae_kernels().gaussian_bwd(moments, eps, seed, gs, gkl, lo, hi)


@_gaussian_bwd.register_fake
def _(moments, eps, seed, gs, gkl, lo, hi):
    return torch.empty_like(moments)


def _setup(ctx, inputs, output):
    moments, eps, seed, lo, hi, want_sample, want_kl = inputs
    ctx.save_for_backward(moments, eps, seed)
    ctx.lo, ctx.hi, ctx.want_sample, ctx.want_kl = lo, hi, want_sample, want_kl


def _backward(ctx, g_sample, g_kl):
    moments, eps, seed = ctx.saved_tensors
    gs = g_sample.contiguous() if ctx.want_sample and g_sample is not None else None
    gk = g_kl.contiguous() if ctx.want_kl and g_kl is not None else None
    dm = torch.ops.fastnets.gaussian_bwd(moments, eps, seed, gs, gk, ctx.lo, ctx.hi)
    return dm, None, None, None, None, None, None


_gaussian_fwd.register_autograd(_backward, setup_context=_setup)


def gaussian_sample_kl(moments: Tensor, *, noise: Optional[Tensor] = None, generator=None, sample: bool = True,
                       kl: bool = True, logvar_range: tuple[float, float] = LOGVAR_RANGE
                       ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(sample, kl)`` of the diagonal Gaussian whose ``moments`` are ``[mean | logvar]`` on
    dim 1 (diffusers' ``DiagonalGaussianDistribution``: logvar clamped to ``logvar_range``):

        sample = mean + exp(logvar / 2) * eps          (B, C, ...), moments' dtype
        kl     = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar) over all but the batch dim
                 (B,), float32 (float64 for float64 moments): a sum over a whole latent
                 overflows float16 long before its terms do

    eps: ``noise`` if given; else drawn from ``generator`` exactly as diffusers draws it (same
    generator, same sample); else generated inside the kernel from a Philox seed taken from
    torch's generator (reproducible under ``torch.manual_seed``; regenerated in the backward,
    so no noise tensor is stored). ``sample=False`` / ``kl=False`` skip either output (None).
    Differentiable in moments (one fused backward kernel); not in noise. fp16 / bf16 / fp32 /
    fp64 (float32 math; float64 for fp64). Backends: triton, interpret, torch.
    """
    op = "gaussian_sample_kl"
    _checks.tensor(op, "moments", moments, min_dim=2)
    if moments.shape[1] % 2:
        raise ValueError(f"{op}: moments must hold [mean | logvar] on dim 1, so an even channel count; got "
                         f"{moments.shape[1]} channels (shape {tuple(moments.shape)})")
    lo, hi = (_checks.number(op, "logvar_range[0]", logvar_range[0]),
              _checks.number(op, "logvar_range[1]", logvar_range[1]))
    if not lo <= hi:
        raise ValueError(f"{op}: logvar_range must be (low, high) with low <= high, got {logvar_range}")
    if not (sample or kl):
        raise ValueError(f"{op}: nothing to compute (sample=False and kl=False)")
    shape = (moments.shape[0], moments.shape[1] // 2) + tuple(moments.shape[2:])
    if noise is not None and generator is not None:
        raise ValueError(f"{op}: pass noise or generator, not both")
    if noise is not None:
        _checks.tensor(op, "noise", noise)
        if tuple(noise.shape) != shape or noise.device != moments.device:
            raise ValueError(f"{op}: noise must have shape {shape} on {moments.device}, got "
                             f"{tuple(noise.shape)} on {noise.device}")
    elif generator is not None and sample:
        noise = randn_like_diffusers(shape, generator, moments.device, moments.dtype)
    backend = _dispatch.choose(op, moments.device, empty=moments.numel() == 0)
    if backend == "torch":
        if sample and noise is None:
            noise = torch.randn(shape, device=moments.device, dtype=moments.dtype)
        s, k = reference.vae.gaussian_sample_kl(moments, noise if sample else None, lo, hi)
        return (s if sample else None), (k.to(_acc(moments.dtype)) if kl else None)
    seed = None
    if sample and noise is None:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=moments.device)
    s, k = torch.ops.fastnets.gaussian_fwd(moments.contiguous(), noise.detach().contiguous() if noise is not None
                                           else None, seed, lo, hi, sample, kl)
    return (s if sample else None), (k if kl else None)
