"""diffusers on fastnets kernels, as swap rules.

    fastnets.swap(unet)     # GroupNorm, Conv2d (class rules) and every Attention on fastnets
    fastnets.unswap(unet)   # and back, exactly

Four rules here:
- "diffusers.attention" sets `FastnetsAttnProcessor` on diffusers' `Attention` modules whose
  processor is the standard one (AttnProcessor2_0 / AttnProcessor): the same computation
  with the score matrix never formed (flash kernels). Other processors (IP-adapter, LoRA,
  custom) are left alone.
- "diffusers.resnet" gives `ResnetBlock2D` (SiLU, default time conditioning, no resampling
  inside the block) a forward whose two GroupNorm -> SiLU pairs are one fused kernel each:
  two fewer full read+write passes per block.
- "diffusers.geglu" runs `GEGLU` (the feed-forward of every `BasicTransformerBlock`) as one
  GEMM and one fused gelu(gate) * hidden pass.
- "diffusers.timesteps" runs the `Timesteps` module (the sinusoidal embedding every UNet's
  `time_proj` is) as one kernel (fastnets.ops.timestep_embedding).
diffusers is optional: nothing here imports it.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..swap import Match, Rule, patched_class, register_rule

_STANDARD = ("AttnProcessor2_0", "AttnProcessor")


class FastnetsAttnProcessor:
    """AttnProcessor2_0's computation (spatial / group norm, cross-attention with norm_cross,
    attention_mask, q/k norms, output projection, residual, rescale) with fastnets attention."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        batch, seq = (hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _resnet_forward(self, input_tensor: Tensor, temb: Optional[Tensor], *args, **kwargs) -> Tensor:
    """diffusers' ResnetBlock2D.forward with GroupNorm + SiLU fused (fastnets group_norm)."""
    n1, n2 = self.norm1, self.norm2
    h = ops.group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, activation="silu")
    h = self.conv1(h)
    if self.time_emb_proj is not None and temb is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))[:, :, None, None]
    if temb is not None:
        h = h + temb
    h = ops.group_norm(h, n2.num_groups, n2.weight, n2.bias, n2.eps, activation="silu")
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _timesteps_forward(self, timesteps: Tensor) -> Tensor:
    """diffusers' Timesteps.forward (get_timestep_embedding) in one fastnets kernel."""
    return ops.timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift,
                                  self.scale)


def _geglu_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """diffusers' GEGLU (proj -> [hidden | gate] -> hidden * gelu(gate)) as one GEMM and one
    fused pass. fastnets' geglu takes [gate | up], so the projection's two halves are swapped
    in the GEMM's weight (rebuilt per call: the gradients reach the one proj weight)."""
    w, b = self.proj.weight, self.proj.bias
    half = w.shape[0] // 2
    w = torch.cat((w[half:], w[:half]), 0)
    b = torch.cat((b[half:], b[:half]), 0) if b is not None else None
    return ops.bias_act(F.linear(hidden_states, w), b, "geglu")


def _is_geglu(m: nn.Module) -> bool:
    return (type(m).__name__ == "GEGLU" and _from_diffusers(m) and isinstance(getattr(m, "proj", None), nn.Linear)
            and type(m).gelu.__qualname__ == "GEGLU.gelu")


def _from_diffusers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("diffusers.")


def _is_plain_resnet(m: nn.Module) -> bool:
    return (type(m).__name__ == "ResnetBlock2D" and _from_diffusers(m) and isinstance(m.nonlinearity, nn.SiLU)
            and m.time_embedding_norm == "default" and m.upsample is None and m.downsample is None
            and all(isinstance(getattr(m, n, None), nn.GroupNorm) for n in ("norm1", "norm2")))


def _is_standard_attention(m: nn.Module) -> bool:
    return (type(m).__name__ == "Attention" and _from_diffusers(m)
            and type(getattr(m, "processor", None)).__name__ in _STANDARD)


def _find(model: nn.Module) -> list:
    return [Match((name,)) for name, m in model.named_modules() if _is_standard_attention(m)]


def _convert(model: nn.Module, match) -> dict:
    m = model.get_submodule(match.names[0])
    saved = {"processor": m.processor}
    m.processor = FastnetsAttnProcessor()
    return {match.names[0]: saved}


def _revert(m: nn.Module, saved: dict) -> None:
    m.processor = saved["processor"]


def _reclass(model: nn.Module, match, forward) -> dict:
    m = model.get_submodule(match.names[0])
    m.__class__ = patched_class(type(m), forward, sys.modules[__name__])
    return {match.names[0]: {}}


RULES = [
    Rule("diffusers.timesteps", lambda model: [Match((n,)) for n, m in model.named_modules()
                                               if type(m).__name__ == "Timesteps" and _from_diffusers(m)],
         lambda model, match: _reclass(model, match, _timesteps_forward), target="fastnets timestep_embedding"),
    Rule("diffusers.resnet", lambda model: [Match((n,)) for n, m in model.named_modules() if _is_plain_resnet(m)],
         lambda model, match: _reclass(model, match, _resnet_forward), target="fused GroupNorm+SiLU ResnetBlock2D forward"),
    Rule("diffusers.geglu", lambda model: [Match((n,)) for n, m in model.named_modules() if _is_geglu(m)],
         lambda model, match: _reclass(model, match, _geglu_forward), target="one GEMM + fused GeGLU"),
    Rule("diffusers.attention", _find, _convert, _revert, target="FastnetsAttnProcessor (flash kernels)",
         changes_class=False, note="diffusers Attention with the standard processor"),
]
for _rule in RULES:
    register_rule(_rule)
