"""Exact attention on flash kernels: ``scaled_dot_product_attention`` (torch's signature) and
``flash_attention`` (causal alignments, sliding windows, ALiBi, packed variable-length
batches, GQA/MQA, dropout, (B, S, H, D) layout).

Memory is linear in sequence length: the forward saves only its output and a float32
log-sum-exp per query row; the backward kernels (fastnets/kernels/attention.py) recompute the
probabilities block by block. Dropout draws a 64-bit seed from torch's generator on the
query's device (so torch.manual_seed makes it reproducible) and the backward regenerates
the same mask from it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks


def _common_kernels():
    """fastnets.kernels._common, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import _common
    return _common


def _attention_kernels():
    """fastnets.kernels.attention, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import attention
    return attention

_dispatch.register_op("scaled_dot_product_attention", "flash attention with torch's SDPA signature (masks, causal, "
                                                      "dropout, GQA)")
_dispatch.register_op("flash_attention", "flash attention: causal alignments, window, ALiBi, varlen, GQA, dropout, "
                                         "split-key decode")

MAX_HEAD_DIM = 256
UNBOUNDED = 1 << 30


# --- fastnets::flash_attn_fwd / fastnets::flash_attn_bwd ---------------------------------------

@torch.library.custom_op("fastnets::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
                    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                    max_seqlen_k: int, scale: float, left: int, right: int, bottom_right: bool, dropout_p: float,
                    seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _attention_kernels().flash_attn_fwd(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, scale, left, right, bottom_right,
                                               dropout_p, seed)


def _like_layout(t: Tensor, last: int) -> Tensor:
    return _common_kernels().empty_like_layout(t, last)   # the launchers' allocation, so strides agree


@_flash_attn_fwd.register_fake
def _(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
      bottom_right, dropout_p, seed):
    varlen = cu_seqlens_q is not None
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], max_seqlen_q)
    return _like_layout(q, v.shape[-1]), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastnets::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
                    alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, left: int, right: int, bottom_right: bool,
                    dropout_p: float, seed: Optional[Tensor], mask_grad: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _attention_kernels().flash_attn_bwd(do, q, k, v, o, lse, attn_mask, alibi_slopes, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                                               bottom_right, dropout_p, seed, mask_grad)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      left, right, bottom_right, dropout_p, seed, mask_grad):
    B = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    dmask = (q.new_empty((B, q.shape[-3], max_seqlen_q, max_seqlen_k), dtype=torch.float32) if mask_grad
             else q.new_empty((0,), dtype=torch.float32))
    return _like_layout(q, q.shape[-1]), _like_layout(k, k.shape[-1]), _like_layout(v, v.shape[-1]), dmask


def _fwd_setup(ctx, inputs, output):
    (q, k, v, attn_mask, slopes, cu_q, cu_k, max_sq, max_sk, scale, left, right, bottom_right, dropout_p,
     seed) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, slopes, cu_q, cu_k, seed)
    ctx.args = (max_sq, max_sk, scale, left, right, bottom_right, dropout_p)
    ctx.mask_dtype = attn_mask.dtype if attn_mask is not None else None


def _fwd_backward(ctx, do, _dlse):
    q, k, v, o, lse, attn_mask, slopes, cu_q, cu_k, seed = ctx.saved_tensors
    max_sq, max_sk, scale, left, right, bottom_right, dropout_p = ctx.args
    mask_grad = attn_mask is not None and attn_mask.dtype != torch.bool and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = torch.ops.fastnets.flash_attn_bwd(
        do, q, k, v, o, lse, attn_mask, slopes, cu_q, cu_k, max_sq, max_sk, scale, left, right, bottom_right,
        dropout_p, seed, mask_grad)
    # The mask came in expanded to (B, H, Sq, Sk); autograd's expand backward sums dmask
    # back to the user's broadcast shape.
    return (dq, dk, dv, dmask.to(ctx.mask_dtype) if mask_grad else None, None, None, None, None, None, None, None,
            None, None, None, None)


_flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# --- validation --------------------------------------------------------------------------------

def _check_qkv(op: str, q, k, v, nd: int | None = None):
    for name, t in (("query", q), ("key", k), ("value", v)):
        _checks.tensor(op, name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    if nd is not None:
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() != nd:
                raise ValueError(f"{op}: {name} must be {nd}-D, got shape {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: query and key head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    for name, t in (("query", q), ("value", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dim of {name} is {t.shape[-1]}; the kernels support head dims up to "
                             f"{MAX_HEAD_DIM}")
        if t.shape[-1] == 0:
            raise ValueError(f"{op}: head dim of {name} must be positive, got shape {tuple(t.shape)}")


def _check_heads(op: str, hq: int, hk: int, hv: int):
    if hk != hv:
        raise ValueError(f"{op}: key and value must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{op}: the number of query heads ({hq}) must be a multiple of the number of key/value "
                         f"heads ({hk})")


def _check_mask(op: str, attn_mask, q: Tensor, target: tuple) -> Optional[Tensor]:
    """attn_mask broadcast (as an expanded view, no copy) to `target` = (B, H, Sq, Sk)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{op}: attn_mask must be bool (True = attend) or floating point (added to the scores), "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, target)
        return attn_mask.expand(target)
    except RuntimeError:
        raise ValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} cannot be broadcast to "
                         f"(batch, heads, L, S) = {tuple(target)}") from None


def _scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _checks.number(op, "scale", scale)


def _dropout(op: str, p) -> float:
    p = _checks.number(op, "dropout_p", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {p}")
    return p


def _seed(q: Tensor, dropout_p: float) -> Optional[Tensor]:
    """A fresh philox seed from torch's generator on q's device: reproducible under
    torch.manual_seed, and a tensor, so no host sync and torch.compile traces it."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=q.device)


def _last_dim_unit(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _run(q, k, v, mask, slopes, cu_q, cu_k, max_sq, max_sk, scale, left, right, bottom_right, dropout_p):
    q, k, v = _checks.autocast(q, k, v, only_from_float32=True)   # SDPA is on autocast's lower-precision list
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, q.dtype):
        mask = mask.to(q.dtype)
    out, _ = torch.ops.fastnets.flash_attn_fwd(q, k, v, mask, slopes, cu_q, cu_k, max_sq, max_sk, scale, left, right,
                                               bottom_right, dropout_p, _seed(q, dropout_p))
    return out


# --- public API ------------------------------------------------------------------------------

def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` on the flash kernels, same signature and semantics.

    query (N, ..., Hq, L, E), key (N, ..., Hk, S, E), value (N, ..., Hk, S, Ev); 3-D inputs
    (N, L, E) are one head, 2-D (L, E) one sequence. Leading dims broadcast as in torch (a
    key / value batch of 1, a 3-D key against a 4-D query): expanded views, no copies. An
    empty batch, no queries or no keys launch nothing (torch's result: zeros without keys). fp16 / bf16 / fp32 (fp64 accepted; float32 accumulation, fp64
    for fp64). E and Ev up to 256, any value including 80 / 96.
    attn_mask: bool (True = take part in attention) or float (added to the scores),
    broadcastable to (N, ..., Hq, L, S); float masks that require grad get a gradient.
    is_causal: top-left aligned lower triangle (query i sees keys j <= i), as torch; may not
    be combined with attn_mask. enable_gqa: Hk may divide Hq; k/v are never copied.
    dropout_p: applied whenever > 0 (the functional form has no training flag, as torch).
    Rows whose every key is masked out give zeros (torch's math backend gives NaN).
    Backward: query, key, value (and a float attn_mask). Backends: triton (CUDA), interpret
    (CPU with TRITON_INTERPRET=1), torch reference (otherwise).
    """
    op = "scaled_dot_product_attention"
    _check_qkv(op, query, key, value)
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise ValueError(f"{op}: query, key and value must have at least 2 dims (..., L, E), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    rank = max(query.dim(), key.dim(), value.dim())
    if key.dim() != query.dim() or value.dim() != query.dim():
        # Leading dims broadcast from the right, as torch's matmul-shaped attention does
        # (a 3-D key against a 4-D query is one sequence per head).
        query, key, value = (t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    if query.dim() == 2:   # one sequence, one head: (L, E), as torch takes it
        mask2 = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() >= 2 else attn_mask
        return scaled_dot_product_attention(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), mask2,
                                            dropout_p, is_causal, scale, enable_gqa).squeeze(0)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{op}: key and value must have the same sequence length, got {key.shape[-2]} and "
                         f"{value.shape[-2]}")
    # Batch dims broadcast as in torch (a key / value batch of 1 against a query batch of N):
    # expanded views, never copies.
    nb = query.dim() - 3 if query.dim() >= 4 else 1
    try:
        batch = torch.broadcast_shapes(query.shape[:nb], key.shape[:nb], value.shape[:nb])
    except RuntimeError:
        raise ValueError(f"{op}: batch dims of query {tuple(query.shape[:nb])}, key {tuple(key.shape[:nb])} and "
                         f"value {tuple(value.shape[:nb])} do not broadcast") from None
    query, key, value = (t.expand(*batch, *t.shape[nb:]) for t in (query, key, value))
    if query.dim() >= 4:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hq != hk and not enable_gqa:
            raise ValueError(f"{op}: query has {hq} heads and key {hk}; pass enable_gqa=True for grouped-query "
                             "attention")
        _check_heads(op, hq, hk, hv)
    if is_causal and attn_mask is not None:
        raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch)")
    scale = _scale(op, scale, query.shape[-1])
    dropout_p = _dropout(op, dropout_p)
    L, S = query.shape[-2], key.shape[-2]
    _check_mask(op, attn_mask, query, (*query.shape[:-1], S))
    # Nothing to attend to or nothing asking (an empty batch, no queries, no keys): no launch;
    # torch's ops make the result (zeros where queries see no key, as torch's math does).
    empty = query.numel() == 0 or key.numel() == 0 or value.numel() == 0
    if _dispatch.choose(op, query.device, empty=empty) == "torch":
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)
    # Canonical (B, H, S, D) views: 3-D is one head; extra leading dims fold into the batch.
    if query.dim() == 3:
        q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    else:
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    mask = None
    if attn_mask is not None:
        # Expanded views (stride 0 on broadcast dims); only > 4-D inputs may need a copy to fold dims.
        mask = attn_mask.expand(*query.shape[:-1], S)
        mask = mask.unsqueeze(1) if query.dim() == 3 else mask.reshape(q.shape[0], q.shape[1], L, S)
    right = 0 if is_causal else UNBOUNDED
    out = _run(q, k, v, mask, None, None, None, L, S, scale, UNBOUNDED, right, False, dropout_p)
    if query.dim() == 3:
        return out.squeeze(1)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def _window(op: str, window, causal: bool) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    elif isinstance(window, numbers.Integral) and not isinstance(window, bool):
        left, right = int(window), int(window)
    elif (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)):
        left, right = int(window[0]), int(window[1])
    else:
        raise TypeError(f"{op}: window must be None, an int or a (left, right) pair of ints, got {window!r}")
    if left < -1 or right < -1:
        raise ValueError(f"{op}: window edges must be >= 0, or -1 for unbounded, got {window!r}")
    if causal:
        right = 0
    return (UNBOUNDED if left < 0 else left), (UNBOUNDED if right < 0 else right)


def _causal(op: str, causal) -> tuple[bool, bool]:
    """(causal, bottom_right)."""
    if causal is False or causal is None:
        return False, True
    if causal is True or causal == "bottom_right":
        return True, True
    if causal == "top_left":
        return True, False
    raise ValueError(f"{op}: causal must be False, True, 'bottom_right' or 'top_left', got {causal!r}")


def _cu_seqlens(op: str, name: str, cu, total: int, max_seqlen, q: Tensor) -> tuple[Tensor, int]:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of batch + 1 offsets, got {cu.dtype} shape "
                         f"{tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
    if max_seqlen is None or not torch.compiler.is_compiling():
        offsets = cu.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{op}: {name} must rise from 0 to the packed length {total}, got {offsets}")
        longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
        if max_seqlen is None:
            max_seqlen = longest
        elif max_seqlen < longest:
            raise ValueError(f"{op}: max_seqlen for {name} is {max_seqlen} but a sequence is {longest} long")
    return cu.to(torch.int32).contiguous(), int(max_seqlen)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal=False, scale: Optional[float] = None,
                    attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, window=None,
                    alibi_slopes: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None, layout: str = "bhsd") -> Tensor:
    """Flash attention with the options SDPA lacks. Returns the output in q's layout.

    layout: "bhsd" q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, DV); "bshd" the same
    with S before H (no transpose copies); "thd" packed variable-length batches q
    (total_q, Hq, D), k/v (total_k, Hk, D*), with cu_seqlens_q / cu_seqlens_k (int32,
    batch + 1 offsets from 0 to total). max_seqlen_*: the longest sequence; when omitted
    it is read from cu_seqlens (one host sync, which also validates the offsets).
    causal: False, True / "bottom_right" (FlashAttention's convention: the last query
    sees every key, so a query chunk appended to a KV cache is causal), or "top_left"
    (torch's is_causal: query i sees keys j <= i). Both agree when Sq == Sk.
    window: (left, right) sliding window, query i sees keys in [i + off - left, i + off + right]
    with off the causal alignment offset (Sk - Sq for bottom-right); -1 = unbounded; an
    int w means (w, w); causal forces right = 0.
    alibi_slopes: (Hq,) or (B, Hq) float32: adds -slope * |i + off - j| (no gradient).
    attn_mask: as in scaled_dot_product_attention (not with "thd").
    GQA / MQA: Hk divides Hq; k/v are read in place. Head dims up to 256 (q and k equal).
    Rows with no visible key give zeros. dropout_p: reproducible under torch.manual_seed.
    Decoding (few queries against a long cache) splits the keys across programs
    (flash-decoding) automatically.
    """
    op = "flash_attention"
    if layout not in ("bhsd", "bshd", "thd"):
        raise ValueError(f"{op}: layout must be 'bhsd', 'bshd' or 'thd', got {layout!r}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and layout != "thd":
        raise ValueError(f"{op}: cu_seqlens_q / cu_seqlens_k need layout='thd' (packed (total, heads, dim) tensors)")
    _check_qkv(op, q, k, v, 3 if layout == "thd" else 4)
    causal, bottom_right = _causal(op, causal)
    scale = _scale(op, scale, q.shape[-1])
    dropout_p = _dropout(op, dropout_p)
    left, right = _window(op, window, causal)
    if layout == "thd":
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: layout='thd' needs both cu_seqlens_q and cu_seqlens_k")
        if attn_mask is not None:
            raise ValueError(f"{op}: attn_mask is not supported with packed variable-length batches; mask by "
                             "sequence lengths (cu_seqlens) instead")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"{op}: key and value must have the same packed length, got {k.shape[0]} and "
                             f"{v.shape[0]}")
        _check_heads(op, q.shape[1], k.shape[1], v.shape[1])
        cu_q, max_sq = _cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q)
        cu_k, max_sk = _cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                             f"{cu_q.numel() - 1} and {cu_k.numel() - 1} sequences")
        B, Hq = cu_q.numel() - 1, q.shape[1]
    else:
        if layout == "bshd":
            q4, k4, v4 = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q4, k4, v4 = q, k, v
        if q4.shape[0] != k4.shape[0] or k4.shape[0] != v4.shape[0]:
            raise ValueError(f"{op}: batch sizes of q, k and v differ: {q4.shape[0]}, {k4.shape[0]}, {v4.shape[0]}")
        if k4.shape[2] != v4.shape[2]:
            raise ValueError(f"{op}: k and v must have the same sequence length, got {k4.shape[2]} and {v4.shape[2]}")
        _check_heads(op, q4.shape[1], k4.shape[1], v4.shape[1])
        B, Hq, max_sq, max_sk = q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2]
        cu_q = cu_k = None
    slopes = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError(f"{op}: alibi_slopes must be a floating-point tensor")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"{op}: alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got "
                             f"{tuple(alibi_slopes.shape)}")
        slopes = alibi_slopes.detach().float()
    if layout == "thd":
        if _dispatch.choose(op, q.device) == "torch":
            return reference.varlen_attention(q, k, v, cu_q, cu_k, scale=scale, causal=causal,
                                              bottom_right=bottom_right, window=_ref_window(left, right),
                                              alibi_slopes=slopes, dropout_p=dropout_p)
        return _run(q, k, v, None, slopes, cu_q, cu_k, max_sq, max_sk, scale, left, right, bottom_right, dropout_p)
    mask = _check_mask(op, attn_mask, q4, (B, Hq, max_sq, max_sk))
    if _dispatch.choose(op, q.device) == "torch":
        out = reference.attention(q4, k4, v4, scale=scale, causal=causal, bottom_right=bottom_right, attn_mask=mask,
                                  window=_ref_window(left, right), alibi_slopes=slopes, dropout_p=dropout_p)
    else:
        out = _run(q4, k4, v4, mask, slopes, None, None, max_sq, max_sk, scale, left, right, bottom_right, dropout_p)
    return out.transpose(1, 2) if layout == "bshd" else out


def _ref_window(left: int, right: int) -> tuple[int, int]:
    return (-1 if left >= UNBOUNDED else left), (-1 if right >= UNBOUNDED else right)


def dropout_mask(q: Tensor, seed: Tensor, seqlen_k: int, dropout_p: float) -> Tensor:
    """The (B, Hq, Sq, Sk) keep mask a kernel forward on q (B, Hq, Sq, D) with this seed
    applies (testing and debugging)."""
    B, H, Sq, _ = q.shape
    keep = _attention_kernels().dropout_keep_mask(seed, B * H, Sq, seqlen_k, dropout_p, q.device)
    return keep.view(B, H, Sq, seqlen_k)
