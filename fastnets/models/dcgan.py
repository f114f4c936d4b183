"""DCGAN (Radford et al. 2016) on fastnets kernels, in the layout of PyTorch's DCGAN example
(`main` = one nn.Sequential with the same indices, so its checkpoints load as is).

Generator: z (N, nz, 1, 1) -> ConvTranspose 4x4 (stride 1) -> [ConvTranspose 4x4 stride 2]*
-> tanh, BatchNorm + ReLU between; the BN and its ReLU are one fused kernel (the ReLU slot
holds an nn.Identity, keeping the indices), and the last transposed conv carries the tanh in
its epilogue. Discriminator: [Conv 4x4 stride 2 -> (BatchNorm) -> LeakyReLU(0.2)]* -> Conv 4x4
-> logits (N,); the LeakyReLU is fused into the BN, or into the conv where there is no BN.
`spectral_norm=True` wraps the discriminator's convs in torch's spectral_norm
parametrization (and drops its BatchNorms, as SN-GAN does).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import nn as fnn


def _layers(image_size: int) -> int:
    n = int(round(math.log2(image_size)))
    if image_size < 8 or 2 ** n != image_size:
        raise ValueError(f"DCGAN: image_size must be a power of two >= 8, got {image_size}")
    return n - 2            # 4x4 after the first layer, doubling up to image_size


class DCGANGenerator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        n = _layers(image_size)
        mult = 2 ** (n - 1)
        layers: list[nn.Module] = [fnn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False),
                                   fnn.BatchNorm2d(ngf * mult, activation="relu"), nn.Identity()]
        for _ in range(n - 1):
            layers += [fnn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                       fnn.BatchNorm2d(ngf * mult // 2, activation="relu"), nn.Identity()]
            mult //= 2
        layers += [fnn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False, activation="tanh"), nn.Identity()]
        self.main = nn.Sequential(*layers)
        self.nz = nz

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    def __init__(self, nc: int = 3, ndf: int = 64, image_size: int = 64, batch_norm: bool = True,
                 spectral_norm: bool = False):
        super().__init__()
        n = _layers(image_size)
        bn = batch_norm and not spectral_norm
        sn = torch.nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(fnn.Conv2d(nc, ndf, 4, 2, 1, bias=False, activation="leaky_relu",
                                                 negative_slope=0.2)), nn.Identity()]
        mult = 1
        for _ in range(n - 1):
            if bn:
                layers += [sn(fnn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False)),
                           fnn.BatchNorm2d(ndf * mult * 2, activation="leaky_relu", negative_slope=0.2), nn.Identity()]
            else:
                layers += [sn(fnn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False, activation="leaky_relu",
                                         negative_slope=0.2)), nn.Identity()]
            mult *= 2
        layers += [sn(fnn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False))]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).view(-1)
