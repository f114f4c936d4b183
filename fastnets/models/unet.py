"""UNet2D: the DDPM / diffusers ``UNet2DModel`` architecture on fastnets kernels.

ResNet blocks run GroupNorm + SiLU as one fused kernel (twice per block) and fastnets
convolutions; the timestep embedding is one kernel written straight in the model dtype;
self-attention at the resolutions that have it runs on the flash kernels. Parameter names
are diffusers' own, so the state dict of a ``diffusers.UNet2DModel`` of the same config
loads as is:

    conv_in, time_embedding.linear_1 / linear_2, class_embedding,
    down_blocks.i.resnets.j.{norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut},
    down_blocks.i.attentions.j.{group_norm, to_q, to_k, to_v, to_out.0},
    down_blocks.i.downsamplers.0.conv, mid_block.{resnets.0, attentions.0, resnets.1},
    up_blocks.i.{resnets, attentions, upsamplers.0.conv}, conv_norm_out, conv_out

Covered from UNet2DModel's config: DownBlock2D / AttnDownBlock2D, UpBlock2D / AttnUpBlock2D,
UNetMidBlock2D (with or without attention), positional time embedding (flip_sin_to_cos,
freq_shift), class conditioning through num_class_embeds, dropout, mid_block_scale_factor,
downsample_padding, attention_head_dim, norm_num_groups / attn_norm_num_groups, norm_eps,
center_input_sample. Other options (Fourier time embedding, skip blocks, scale-shift time
conditioning, resnet resampling) raise NotImplementedError naming the option.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops


@dataclasses.dataclass
class UNet2DConfig:
    """diffusers' UNet2DModel config keys and defaults (a FrozenDict of one converts with from_dict)."""
    sample_size: Optional[int] = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: Optional[int] = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: Optional[str] = None
    num_class_embeds: Optional[int] = None
    num_train_timesteps: Optional[int] = None

    @classmethod
    def from_dict(cls, config) -> "UNet2DConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})


@dataclasses.dataclass
class UNet2DOutput:
    """As diffusers': ``.sample``."""
    sample: Tensor


_UNSUPPORTED = {"time_embedding_type": "positional", "resnet_time_scale_shift": "default", "downsample_type": "conv",
                "upsample_type": "conv", "act_fn": "silu", "class_embed_type": None}


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2; the bias and SiLU of linear_1 are one fused kernel."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_emb: Tensor) -> Tensor:
        h = ops.bias_act(F.linear(t_emb, self.linear_1.weight), self.linear_1.bias, "silu")
        return self.linear_2(h)


class ResnetBlock2D(nn.Module):
    """GroupNorm+SiLU -> conv -> + time projection -> GroupNorm+SiLU -> dropout -> conv, plus
    the (1x1-projected) input; divided by output_scale_factor. temb arrives already SiLU'd
    (UNet2D applies it once for every block)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float,
                 dropout: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = fnn.GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = fnn.Conv2d(in_channels, out_channels, 3, padding=1)
        # temb_channels=None: no time projection (the VAE's blocks, as in diffusers).
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = fnn.GroupNorm(groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = fnn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = fnn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1 else out


class SpatialSelfAttention(nn.Module):
    """diffusers' Attention as UNet2D blocks build it (group_norm, to_q/k/v, to_out.0, a
    residual connection, rescale_output_factor), over the H*W positions, on the flash kernels."""

    def __init__(self, channels: int, head_dim: Optional[int], groups: int, eps: float,
                 rescale_output_factor: float = 1.0, dropout: float = 0.0):
        super().__init__()
        head_dim = head_dim or channels
        if channels % head_dim:
            raise ValueError(f"UNet2D: attention channels {channels} not divisible by attention_head_dim {head_dim}")
        self.heads = channels // head_dim
        self.group_norm = fnn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(dropout)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.reshape(B, C, H * W)).transpose(1, 2)          # (B, HW, C)
        q, k, v = (proj(h).view(B, H * W, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        o = ops.scaled_dot_product_attention(q, k, v)
        o = self.to_out[1](self.to_out[0](o.transpose(1, 2).reshape(B, H * W, C)))
        out = o.transpose(1, 2).reshape(B, C, H, W) + x
        return out / self.rescale_output_factor if self.rescale_output_factor != 1 else out


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = fnn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = fnn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attentions(attn: bool, n: int, ch: int, cfg: UNet2DConfig) -> Optional[nn.ModuleList]:
    """The n self-attention layers of an Attn*Block2D (None for a plain block)."""
    if not attn:
        return None
    return nn.ModuleList([SpatialSelfAttention(ch, cfg.attention_head_dim or ch, cfg.norm_num_groups, cfg.norm_eps)
                          for _ in range(n)])


class _DownBlock(nn.Module):
    def __init__(self, attn: bool, num_layers: int, in_ch: int, out_ch: int, temb: int, cfg: UNet2DConfig,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, cfg.norm_num_groups,
                                                    cfg.norm_eps, cfg.dropout) for i in range(num_layers)])
        self.attentions = _attentions(attn, num_layers, out_ch, cfg)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, h: Tensor, temb_act: Tensor) -> tuple[Tensor, tuple]:
        states = ()
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb_act)
            if self.attentions is not None:
                h = self.attentions[i](h)
            states += (h,)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            states += (h,)
        return h, states


class _UpBlock(nn.Module):
    def __init__(self, attn: bool, num_layers: int, in_ch: int, prev_ch: int, out_ch: int, temb: int,
                 cfg: UNet2DConfig, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch), out_ch, temb,
                          cfg.norm_num_groups, cfg.norm_eps, cfg.dropout) for i in range(num_layers)])
        self.attentions = _attentions(attn, num_layers, out_ch, cfg)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, h: Tensor, skips: tuple, temb_act: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb_act)
            if self.attentions is not None:
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class UNetMidBlock2D(nn.Module):
    def __init__(self, ch: int, temb: int, cfg: UNet2DConfig):
        super().__init__()
        scale = cfg.mid_block_scale_factor
        res = lambda: ResnetBlock2D(ch, ch, temb, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, scale)  # noqa: E731
        self.resnets = nn.ModuleList([res(), res()])
        groups = cfg.attn_norm_num_groups or cfg.norm_num_groups
        self.attentions = (nn.ModuleList([SpatialSelfAttention(ch, cfg.attention_head_dim or ch, groups, cfg.norm_eps,
                                                               rescale_output_factor=scale)])
                           if cfg.add_attention else None)

    def forward(self, h: Tensor, temb_act: Tensor) -> Tensor:
        h = self.resnets[0](h, temb_act)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, temb_act)


class UNet2D(nn.Module):
    """The denoiser of DDPM-style image diffusion: ``forward(sample, timestep, class_labels=None,
    return_dict=True)`` returns ``UNet2DOutput(sample=...)`` (or a tuple), as diffusers'
    UNet2DModel does, so it drops into diffusers pipelines and fastnets.diffusion.sample."""

    def __init__(self, config: Optional[UNet2DConfig] = None, **kwargs):
        super().__init__()
        if config is not None and not isinstance(config, UNet2DConfig):
            config = UNet2DConfig.from_dict(config)
        cfg = dataclasses.replace(config, **kwargs) if config is not None else UNet2DConfig(**kwargs)
        for key, want in _UNSUPPORTED.items():
            if getattr(cfg, key) != want:
                raise NotImplementedError(f"UNet2D: {key}={getattr(cfg, key)!r} is not implemented (only {want!r})")
        for t in cfg.down_block_types:
            if t not in ("DownBlock2D", "AttnDownBlock2D"):
                raise NotImplementedError(f"UNet2D: down block {t!r} is not implemented")
        for t in cfg.up_block_types:
            if t not in ("UpBlock2D", "AttnUpBlock2D"):
                raise NotImplementedError(f"UNet2D: up block {t!r} is not implemented")
        if cfg.mid_block_type not in ("UNetMidBlock2D", None):
            raise NotImplementedError(f"UNet2D: mid block {cfg.mid_block_type!r} is not implemented")
        chans = tuple(cfg.block_out_channels)
        if not (len(chans) == len(cfg.down_block_types) == len(cfg.up_block_types)):
            raise ValueError("UNet2D: block_out_channels, down_block_types and up_block_types need the same length")
        cfg.block_out_channels, cfg.down_block_types, cfg.up_block_types = (
            chans, tuple(cfg.down_block_types), tuple(cfg.up_block_types))
        self.config = cfg
        temb = cfg.time_embedding_dim or chans[0] * 4
        self.conv_in = fnn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb) if cfg.num_class_embeds else None
        self.down_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, chans[i]
            self.down_blocks.append(_DownBlock(kind == "AttnDownBlock2D", cfg.layers_per_block, in_ch, out_ch, temb,
                                               cfg, add_downsample=i < len(chans) - 1))
        self.mid_block = UNetMidBlock2D(chans[-1], temb, cfg) if cfg.mid_block_type else None
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        out_ch = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(chans) - 1)]
            self.up_blocks.append(_UpBlock(kind == "AttnUpBlock2D", cfg.layers_per_block + 1, in_ch, prev_ch, out_ch,
                                           temb, cfg, add_upsample=i < len(chans) - 1))
        groups_out = cfg.norm_num_groups if cfg.norm_num_groups is not None else min(chans[0] // 4, 32)
        # conv_norm_out + conv_act: one fused GroupNorm+SiLU (conv_act has no parameters).
        self.conv_norm_out = fnn.GroupNorm(groups_out, chans[0], eps=cfg.norm_eps, activation="silu")
        self.conv_out = fnn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    # dtype / device: what diffusers' pipelines read from their UNet (ModelMixin's properties).
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: Tensor, timestep, class_labels: Optional[Tensor] = None, return_dict: bool = True):
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long,
                                                                    device=sample.device)
        t = t.reshape(-1).to(sample.device)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        elif t.numel() != sample.shape[0]:
            raise ValueError(f"UNet2D: timestep must be a scalar or hold one value per sample ({sample.shape[0]}), "
                             f"got {t.numel()}")
        emb_dtype = torch.get_autocast_dtype(sample.device.type) if torch.is_autocast_enabled(
            sample.device.type) else self.dtype
        t_emb = ops.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift,
                                       dtype=emb_dtype if emb_dtype != torch.float64 else self.dtype)
        emb = self.time_embedding(t_emb)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("UNet2D: class_labels must be given when num_class_embeds is set")
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("UNet2D: class_labels given but the model has no class embedding (num_class_embeds)")
        temb_act = F.silu(emb)   # every resnet's time projection reads SiLU(emb): computed once
        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            h, states = block(h, temb_act)
            skips += states
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], temb_act)
            skips = skips[:-n]
        out = self.conv_out(self.conv_norm_out(h))
        return UNet2DOutput(out) if return_dict else (out,)
