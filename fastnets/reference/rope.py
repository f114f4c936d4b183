"""Rotary embedding in plain PyTorch (float32 math, float64 for float64 input)."""
from __future__ import annotations

import torch


def rope_cos_sin(seqlen: int, rotary_dim: int, base: float = 10000.0, device=None, dtype=torch.float32):
    """The (seqlen, rotary_dim / 2) cos and sin tables: angle = pos * base^(-2i / rotary_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float64) / rotary_dim))
    angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_emb(x, cos, sin, interleaved=False, position_ids=None, seqlen_offset=0, layout="bhsd",
                     tables="half"):
    """x (B, H, S, D) ("bhsd") or (B, S, H, D) ("bshd"); cos/sin (positions, R/2) or (B, S, R/2),
    or with tables="full" (positions, R) / (B, S, R): one entry per rotated dim, as Hugging
    Face builds them (y = x * cos + rotate_half(x) * sin on the rotated dims)."""
    xb = x.transpose(1, 2) if layout == "bshd" else x
    B, H, S, D = xb.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    r2 = cos.shape[-1] // 2 if tables == "full" else cos.shape[-1]
    if cos.dim() == 3:
        c, s_ = cos.to(acc)[:, None], sin.to(acc)[:, None]
    elif position_ids is not None:
        pos = position_ids.expand(B, S) if position_ids.dim() == 2 else position_ids.view(1, S).expand(B, S)
        c, s_ = cos.to(acc)[pos][:, None], sin.to(acc)[pos][:, None]
    else:
        c = cos.to(acc)[seqlen_offset:seqlen_offset + S]
        s_ = sin.to(acc)[seqlen_offset:seqlen_offset + S]
    xf = xb.to(acc)
    rot, rest = xf[..., :2 * r2], xf[..., 2 * r2:]
    def pairs(t):
        return (t[..., 0::2], t[..., 1::2]) if interleaved else (t[..., :r2], t[..., r2:])

    x1, x2 = pairs(rot)
    if tables == "full":
        (c1, c2), (s1, s2) = pairs(c), pairs(s_)
    else:
        c1 = c2 = c
        s1 = s2 = s_
    y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    y = torch.cat((y, rest), -1).to(x.dtype)
    return y.transpose(1, 2) if layout == "bshd" else y
