"""VAE pieces: DiagonalGaussian, diffusers' DiagonalGaussianDistribution on the fused
reparameterization + KL kernel (fastnets.ops.gaussian_sample_kl)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..ops.vae import LOGVAR_RANGE


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)) from an encoder's ``parameters`` =
    ``[mean | logvar]`` on dim 1, with diffusers' ``DiagonalGaussianDistribution`` methods and
    attributes: ``sample(generator)``, ``kl(other=None)``, ``nll(sample, dims)``, ``mode()``,
    ``mean``, ``logvar`` (clamped to [-30, 20]), ``std``, ``var``, ``deterministic``.

    ``sample()`` and ``kl()`` (against N(0, I)) run the fused kernel; ``sample_and_kl()``
    gets both from one pass. ``std`` / ``var`` are computed when first read (diffusers
    computes them eagerly, two extra full passes). Same generator -> same sample as diffusers.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(f"DiagonalGaussian: parameters must be [mean | logvar] on dim 1 (an even channel "
                             f"count), got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = deterministic
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, *LOGVAR_RANGE)
        self._std = self._var = None

    @property
    def std(self) -> Tensor:
        if self._std is None:
            self._std = torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)
        return self._std

    @property
    def var(self) -> Tensor:
        if self._var is None:
            self._var = torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)
        return self._var

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.deterministic:
            # diffusers adds 0 * noise drawn from the generator; the draw keeps its stream in step.
            noise = _draw(self, generator)
            return self.mean + self.std * noise
        return ops.gaussian_sample_kl(self.parameters, generator=generator, kl=False)[0]

    def sample_and_kl(self, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(sample, KL to N(0, I) per batch element) in one kernel (the KL in the parameters'
        dtype, as kl(); fastnets.ops.gaussian_sample_kl keeps it in float32)."""
        if self.deterministic:
            return self.sample(generator), self.kl()
        s, k = ops.gaussian_sample_kl(self.parameters, generator=generator)
        return s, k.to(self.parameters.dtype)

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Tensor:
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            # diffusers returns the KL in the parameters' dtype; the op keeps float32.
            return ops.gaussian_sample_kl(self.parameters, sample=False)[1].to(self.parameters.dtype)
        dims = list(range(1, self.mean.dim()))
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: Tensor, dims=(1, 2, 3)) -> Tensor:
        if self.deterministic:
            return torch.Tensor([0.0])
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))

    def mode(self) -> Tensor:
        return self.mean


def _draw(dist: DiagonalGaussian, generator) -> Tensor:
    from .._random import randn_like_diffusers
    return randn_like_diffusers(dist.mean.shape, generator, dist.parameters.device, dist.parameters.dtype)
