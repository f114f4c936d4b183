"""MultiheadAttention on the flash kernels: subclasses torch.nn.MultiheadAttention (same
constructor, attributes and state_dict keys)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _dispatch, ops


def _as_attend_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's masks (bool True = do NOT attend, float = added) as an
    SDPA mask (bool True = attend, float = added)."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask.to(dtype)


def _merge_masks(attn_mask, key_padding_mask, N: int, H: int, L: int, S: int, dtype):
    """One SDPA mask broadcastable to (N, H, L, S), or None."""
    am = _as_attend_mask(attn_mask, dtype)
    if am is not None:
        am = am.view(1, 1, L, S) if am.dim() == 2 else am.view(N, H, L, S)
    kpm = _as_attend_mask(key_padding_mask, dtype)
    if kpm is not None:
        kpm = kpm.view(N, 1, 1, S)
    if am is None or kpm is None:
        return am if kpm is None else kpm
    if am.dtype == torch.bool and kpm.dtype == torch.bool:
        return am & kpm
    as_float = lambda m: (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))  # noqa: E731
                          if m.dtype == torch.bool else m)
    return as_float(am) + as_float(kpm)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention itself on fastnets' flash kernels.

    The output always comes from the flash kernels. ``need_weights=True`` (torch's default:
    SigLIP's pooling head, most user code) also returns the attention weights, formed beside
    the flash output only then (softmax(q k^T * scale + mask), averaged over heads unless
    ``average_attn_weights=False``; differentiable, torch's values). Training-mode dropout with
    need_weights, ``add_bias_kv`` and ``add_zero_attn`` run torch's implementation, with a
    warning once: there the returned weights are the dropped-out ones the output used, or
    the keys include extra tokens. Masks follow torch's convention (bool True = masked out).
    Rows whose keys are all masked give a zero output rather than torch's NaN (the weights,
    as torch's, are NaN there).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        dropout = self.dropout if self.training else 0.0
        if (need_weights and dropout > 0) or self.bias_k is not None or self.add_zero_attn:
            why = ("need_weights=True and dropout in training (the weights returned are the dropped-out ones)"
                   if need_weights and dropout > 0 else "add_bias_kv / add_zero_attn (extra key tokens)")
            _dispatch.fallback("scaled_dot_product_attention", f"nn.MultiheadAttention with {why} runs torch's "
                               "implementation")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the causal mask; "
                               "pass attn_mask too (as torch)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, N, E) from here on, torch's internal layout.
        L, N, E = query.shape
        S = key.shape[0]
        H, Dh = self.num_heads, self.head_dim
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        if query is key and key is value and self._qkv_same_embed_dim:
            q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)   # self-attention: one GEMM
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # (L, N, E) -> (N, H, L, Dh) as strided views: the kernels take any head/seq strides.
        q = q.reshape(L, N, H, Dh).permute(1, 2, 0, 3)
        k = k.reshape(S, N, H, Dh).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, Dh).permute(1, 2, 0, 3)
        causal = is_causal and key_padding_mask is None
        mask = None if causal else _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        out = ops.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        weights = None
        if need_weights:
            weights = _attention_weights(q, k, _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype),
                                         average_attn_weights)
        if unbatched:
            return out.squeeze(1), (None if weights is None else weights.squeeze(0))
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], average: bool) -> Tensor:
    """torch.nn.MultiheadAttention's returned weights: softmax(q k^T / sqrt(d) + mask),
    (N, H, L, S), averaged over heads when `average`. Only formed when asked: the flash
    kernels that computed the output never hold this matrix."""
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    return weights.mean(dim=1) if average else weights
