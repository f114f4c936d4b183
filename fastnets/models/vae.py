"""VAEs: DiagonalGaussian (diffusers' DiagonalGaussianDistribution on the fused
reparameterization + KL kernel, fastnets.ops.gaussian_sample_kl) and AutoencoderKL, the conv
VAE of latent diffusion (diffusers' AutoencoderKL layout and parameter names: GroupNorm + SiLU
ResNet blocks, a self-attention mid block, KL-regularised latent) on fastnets kernels, with
ELBO training, reconstruction, sampling and latent interpolation.

AutoencoderKL parameter names, diffusers' own (so its state dict loads both ways):

    encoder.{conv_in, down_blocks.i.resnets.j, down_blocks.i.downsamplers.0.conv,
             mid_block.{resnets.0, attentions.0, resnets.1}, conv_norm_out, conv_out}
    quant_conv, post_quant_conv
    decoder.{conv_in, mid_block, up_blocks.i.resnets.j, up_blocks.i.upsamplers.0.conv,
             conv_norm_out, conv_out}
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
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


# --- AutoencoderKL ---------------------------------------------------------------------------------

@dataclasses.dataclass
class AutoencoderKLConfig:
    """diffusers' AutoencoderKL config keys and defaults (only the down / up block types it
    builds by default: DownEncoderBlock2D / UpDecoderBlock2D)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config) -> "AutoencoderKLConfig":
        from .unet import UNet2DConfig
        return UNet2DConfig.from_dict.__func__(cls, config)   # the known keys of a diffusers config


@dataclasses.dataclass
class _BlockConfig:
    """What the UNet2D blocks read from their config, for the VAE's (eps 1e-6, no dropout)."""
    norm_num_groups: int
    norm_eps: float = 1e-6
    dropout: float = 0.0
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    attn_norm_num_groups: Optional[int] = None
    attention_head_dim: Optional[int] = None      # one head over all channels, as diffusers' VAE
    add_attention: bool = True


@dataclasses.dataclass
class EncoderOutput:
    """As diffusers' AutoencoderKLOutput: ``.latent_dist``."""
    latent_dist: DiagonalGaussian


@dataclasses.dataclass
class DecoderOutput:
    """As diffusers': ``.sample``."""
    sample: Tensor


class _Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig, bc: _BlockConfig):
        from .unet import UNetMidBlock2D, _DownBlock
        super().__init__()
        chans = tuple(cfg.block_out_channels)
        self.conv_in = fnn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i in range(len(chans)):
            in_ch, out_ch = out_ch, chans[i]
            self.down_blocks.append(_DownBlock(False, cfg.layers_per_block, in_ch, out_ch, None, bc,
                                               add_downsample=i < len(chans) - 1))
        self.mid_block = UNetMidBlock2D(chans[-1], None, bc)
        self.conv_norm_out = fnn.GroupNorm(cfg.norm_num_groups, chans[-1], eps=1e-6, activation="silu")
        self.conv_out = fnn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, None)
        return self.conv_out(self.conv_norm_out(self.mid_block(h, None)))


class _UpDecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: ResNet blocks (no skip inputs), then a 2x upsample + conv."""

    def __init__(self, num_layers: int, in_ch: int, out_ch: int, bc: _BlockConfig, add_upsample: bool):
        from .unet import ResnetBlock2D, Upsample2D
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, bc.norm_num_groups,
                                                    bc.norm_eps, 0.0) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, h: Tensor) -> Tensor:
        for resnet in self.resnets:
            h = resnet(h, None)
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class _Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig, bc: _BlockConfig):
        from .unet import UNetMidBlock2D
        super().__init__()
        rev = list(reversed(cfg.block_out_channels))
        self.conv_in = fnn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], None, bc)
        self.up_blocks = nn.ModuleList()
        out_ch = rev[0]
        for i in range(len(rev)):
            prev, out_ch = out_ch, rev[i]
            self.up_blocks.append(_UpDecoderBlock(cfg.layers_per_block + 1, prev, out_ch, bc,
                                                  add_upsample=i < len(rev) - 1))
        self.conv_norm_out = fnn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=1e-6, activation="silu")
        self.conv_out = fnn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z), None)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))


class AutoencoderKL(nn.Module):
    """The KL-regularised conv VAE of latent diffusion, in diffusers' AutoencoderKL layout.

    ``encode(x).latent_dist`` is a DiagonalGaussian; ``decode(z).sample`` the image;
    ``forward(x, sample_posterior=False, generator=None)`` reconstructs (diffusers' API), so
    it serves as the latent autoencoder of a diffusion pipeline (latents scaled by
    ``config.scaling_factor``). Training: ``elbo(x)`` gives the loss and its two terms;
    ``sample(n)`` decodes prior draws; ``interpolate(a, b, steps)`` decodes the straight line
    between two posterior means.
    """

    def __init__(self, config: Optional[AutoencoderKLConfig] = None, **kwargs):
        super().__init__()
        if config is not None and not isinstance(config, AutoencoderKLConfig):
            config = AutoencoderKLConfig.from_dict(config)
        cfg = dataclasses.replace(config, **kwargs) if config is not None else AutoencoderKLConfig(**kwargs)
        if cfg.act_fn != "silu":
            raise NotImplementedError(f"AutoencoderKL: act_fn={cfg.act_fn!r} is not implemented (only 'silu')")
        chans = tuple(cfg.block_out_channels)
        for name, types, want in (("down_block_types", cfg.down_block_types, "DownEncoderBlock2D"),
                                  ("up_block_types", cfg.up_block_types, "UpDecoderBlock2D")):
            if len(types) != len(chans) or any(t != want for t in types):
                raise NotImplementedError(f"AutoencoderKL: {name} must be {len(chans)} x {want!r} (one per "
                                          f"block_out_channels), got {tuple(types)}")
        for c in chans:
            if c % cfg.norm_num_groups:
                raise ValueError(f"AutoencoderKL: block_out_channels {chans} must be divisible by "
                                 f"norm_num_groups={cfg.norm_num_groups}")
        cfg.block_out_channels, cfg.down_block_types, cfg.up_block_types = (
            chans, tuple(cfg.down_block_types), tuple(cfg.up_block_types))
        self.config = cfg
        bc = _BlockConfig(cfg.norm_num_groups, add_attention=cfg.mid_block_add_attention)
        self.encoder = _Encoder(cfg, bc)
        self.decoder = _Decoder(cfg, bc)
        L = cfg.latent_channels
        self.quant_conv = fnn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = fnn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def latent_scale(self) -> int:
        """Image size / latent size: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: Tensor, return_dict: bool = True):
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        dist = DiagonalGaussian(moments)
        return EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z: Tensor, return_dict: bool = True, generator=None):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        out = self.decoder(z)
        return DecoderOutput(out) if return_dict else (out,)

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None):
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)

    def elbo(self, x: Tensor, beta: float = 1.0, generator: Optional[torch.Generator] = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction, kl), each a mean over the batch: the reconstruction term is
        the summed squared error of one posterior sample's decoding (a Gaussian likelihood
        up to constants), the KL is to N(0, I) from the fused kernel; loss = recon + beta kl."""
        dist = self.encode(x).latent_dist
        z, kl = dist.sample_and_kl(generator)
        recon = self.decode(z).sample
        rec = (recon.float() - x.float()).square().flatten(1).sum(1).mean()
        kl = kl.float().mean()
        return rec + beta * kl, rec, kl

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x).sample

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, size: Optional[int] = None) -> Tensor:
        """Decode n draws from the prior N(0, I) at the latent size of ``size`` (default
        config.sample_size) images."""
        side = (size or self.config.sample_size) // self.latent_scale
        z = torch.randn(n, self.config.latent_channels, side, side, generator=generator, device=self.device,
                        dtype=self.dtype)
        return self.decode(z).sample

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, steps: int = 8) -> Tensor:
        """Decodings of the straight line between the posterior means of images a and b
        (each (C, H, W) or (1, C, H, W)): (steps, C, H, W), a first and b last."""
        if steps < 2:
            raise ValueError(f"AutoencoderKL.interpolate: steps must be >= 2, got {steps}")
        za = self.encode(a.reshape(1, *a.shape[-3:])).latent_dist.mode()
        zb = self.encode(b.reshape(1, *b.shape[-3:])).latent_dist.mode()
        w = torch.linspace(0, 1, steps, device=za.device, dtype=za.dtype).view(-1, 1, 1, 1)
        return self.decode((1 - w) * za + w * zb).sample
