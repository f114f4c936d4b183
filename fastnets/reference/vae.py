"""The VAE diagonal Gaussian in torch ops (diffusers' DiagonalGaussianDistribution formulas),
float32 math (float64 for float64 moments)."""
from __future__ import annotations

import torch
from torch import Tensor


def gaussian_sample_kl(moments: Tensor, noise: Tensor | None, lo: float = -30.0, hi: float = 20.0):
    """(sample or None, kl (B,)) of moments = [mean | logvar] on dim 1, logvar clamped to [lo, hi]."""
    acc = torch.float64 if moments.dtype == torch.float64 else torch.float32
    mean, logvar = moments.to(acc).chunk(2, dim=1)
    logvar = logvar.clamp(lo, hi)
    sample = (mean + torch.exp(0.5 * logvar) * noise.to(acc)).to(moments.dtype) if noise is not None else None
    dims = list(range(1, moments.dim()))
    kl = (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=dims)).to(moments.dtype)   # as diffusers
    return sample, kl
