"""Attention in plain PyTorch: the (seq x seq) matrix materialised, float32 math (float64
for float64 input). Same semantics as the kernels: fully masked rows give zeros."""
from __future__ import annotations

import math

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def attention(q, k, v, *, scale=None, causal=False, bottom_right=False, attn_mask=None, window=None,
              alibi_slopes=None, dropout_p=0.0, dropout_keep=None):
    """softmax(q k^T * scale + bias) v for q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, DV).

    causal / window: query i sees key j when j - (i + off) lies in [-left, right], off = Sk - Sq
    with bottom_right alignment, else 0; causal sets right = 0; window=(left, right), -1 = unbounded.
    attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Sq, Sk).
    alibi_slopes: (Hq,) or (B, Hq); adds -slope * |i + off - j|.
    dropout_keep: (B, Hq, Sq, Sk) bool mask to apply (fresh Bernoulli when None and dropout_p > 0).
    """
    out_dtype = q.dtype
    q, k, v = _acc(q), _acc(k), _acc(v)
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    if Hq != Hk:
        k = k.repeat_interleave(Hq // Hk, dim=1)
        v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    i = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq if bottom_right else 0)
    j = torch.arange(Sk, device=q.device)[None, :]
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    s = s.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + _acc(attn_mask)
    if alibi_slopes is not None:
        slopes = _acc(alibi_slopes)
        slopes = slopes.view(1, Hq, 1, 1) if slopes.dim() == 1 else slopes.view(B, Hq, 1, 1)
        s = s - slopes * (i - j).abs().to(s.dtype)
    empty_row = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    p = torch.where(empty_row, torch.zeros_like(p), p)
    if dropout_p > 0.0:
        if dropout_keep is None:
            dropout_keep = torch.rand_like(p) >= dropout_p
        p = p * dropout_keep / (1.0 - dropout_p)
    return torch.matmul(p, v).to(out_dtype)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    """Packed batches: q (total_q, Hq, D), k/v (total_k, Hk, D*); sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1]. Each sequence is attended to on its own."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    slopes = kwargs.pop("alibi_slopes", None)
    outs = []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        outs.append(attention(qs, ks, vs, alibi_slopes=sl, **kwargs)[0].transpose(0, 1))
    if not outs:
        return q.new_empty((0, q.shape[1], v.shape[2]))
    return torch.cat(outs, 0)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's semantics (causal is top-left
    aligned), except that fully masked rows give zeros instead of NaN. Any leading dims."""
    lead = query.shape[:-3] if query.dim() >= 4 else ()

    def fold(t):   # (..., H, S, D) -> (B, H, S, D); explicit sizes, so empty tensors fold too
        return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:]) if t.dim() >= 4 else t.unsqueeze(-3)

    q, k, v = fold(query), fold(key), fold(value)
    if q.dim() == 3:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(*query.shape[:-1], key.shape[-2]).reshape(q.shape[0], q.shape[1], q.shape[2],
                                                                           k.shape[2])
    out = attention(q, k, v, scale=scale, causal=is_causal, attn_mask=mask, dropout_p=dropout_p)
    return (out.reshape(*lead, *out.shape[-3:]) if query.dim() >= 4
            else out.reshape(*query.shape[:-1], value.shape[-1]))
