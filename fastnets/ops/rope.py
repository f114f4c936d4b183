"""Fused rotary position embedding (RoPE) for q and k, forward and backward kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from ..reference.rope import rope_cos_sin  # noqa: F401  (re-exported: the tables models build)
from . import _checks


def _common_kernels():
    """fastnets.kernels._common, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import _common
    return _common


def _rope_kernels():
    """fastnets.kernels.rope, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import rope
    return rope

_dispatch.register_op("apply_rotary_emb", "rotary embedding, half-split or interleaved, partial rotary, positions")


@torch.library.custom_op("fastnets::rope", mutates_args=())
def _rope(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], seqlen_offset: int, interleaved: bool,
          conj: bool, full: bool) -> Tensor:
    return _rope_kernels().rope(x, cos, sin, position_ids, seqlen_offset, interleaved, conj, full)


@_rope.register_fake
def _(x, cos, sin, position_ids, seqlen_offset, interleaved, conj, full):
    return _common_kernels().empty_like_layout(x, x.shape[3])


def _rope_setup(ctx, inputs, output):
    _, cos, sin, position_ids, seqlen_offset, interleaved, conj, full = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.args = (seqlen_offset, interleaved, conj, full)


def _rope_backward(ctx, dy):
    cos, sin, position_ids = ctx.saved_tensors
    seqlen_offset, interleaved, conj, full = ctx.args
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    # A rotation's adjoint is the rotation by the opposite angle (with full tables whose
    # halves differ, the transposed map: the kernel's CONJ).
    dx = torch.ops.fastnets.rope(dy, cos, sin, position_ids, seqlen_offset, interleaved, not conj, full)
    return dx, None, None, None, None, None, None, None


_rope.register_autograd(_rope_backward, setup_context=_rope_setup)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                     position_ids: Optional[Tensor] = None, seqlen_offset: int = 0, layout: str = "bhsd",
                     tables: str = "half") -> Tensor:
    """Rotate the first R dims of each head of x by position-dependent angles.

    x: (B, H, S, D) for layout "bhsd", (B, S, H, D) for "bshd"; fp16 / bf16 / fp32 / fp64.
    cos, sin: a (positions, R/2) table (see ``fastnets.reference.rope_cos_sin``), indexed by
    ``seqlen_offset + s`` or by ``position_ids`` ((B, S) or (S,) ints: KV-cache decoding,
    packed or left-padded batches); or per-token values of shape (B, S, R/2). R <= D; dims
    past R pass through unchanged. cos/sin are constants (no gradient).
    A position outside the table raises for CPU tensors; on CUDA (no host sync per call) its
    row comes out NaN and no memory outside the table is read.
    interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + R/2) (GPT-NeoX / Llama).
    tables: "half" (above: R/2 angles a position, one per pair) or "full": R entries a
    position, one per rotated dim, as Hugging Face's rotary embeddings build them
    (``cat((freqs, freqs))``; repeat-interleaved with interleaved=True). Pair (i1, i2) then
    gives y[i1] = x[i1] cos[i1] - x[i2] sin[i1], y[i2] = x[i2] cos[i2] + x[i1] sin[i2]:
    transformers' ``q * cos + rotate_half(q) * sin``, taken as it is (no slice, no check).
    Returns a tensor in x's layout. Backward: x.
    """
    op = "apply_rotary_emb"
    _checks.tensor(op, "x", x)
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"{op}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    if tables not in ("half", "full"):
        raise ValueError(f"{op}: tables must be 'half' or 'full', got {tables!r}")
    full = tables == "full"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D ({layout}), got shape {tuple(x.shape)}")
    x4 = x.transpose(1, 2) if layout == "bshd" else x
    B, H, S, D = x4.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(op, name, t)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")
    per = "R" if full else "R/2"
    rotary = cos.shape[-1] if full else 2 * cos.shape[-1]
    if cos.dim() not in (2, 3) or rotary > D or cos.shape[-1] == 0 or (full and cos.shape[-1] % 2):
        raise ValueError(f"{op}: cos/sin must be (positions, {per}) or (batch, seq, {per}) with 0 < R <= head dim "
                         f"{D}{', R even' if full else ''}, got {tuple(cos.shape)}")
    if cos.dim() == 3 and (cos.shape[1] != S or cos.shape[0] not in (1, B)):
        raise ValueError(f"{op}: per-token cos/sin must be ({B} or 1, {S}, {per}), got {tuple(cos.shape)}")
    if position_ids is not None:
        if cos.dim() != 2:
            raise ValueError(f"{op}: position_ids index a (positions, R/2) table; per-token cos/sin take none")
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"{op}: position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
        if position_ids.dtype not in (torch.int32, torch.int64) or position_ids.shape not in ((B, S), (S,), (1, S)):
            raise ValueError(f"{op}: position_ids must be int of shape ({B}, {S}) or ({S},), got "
                             f"{position_ids.dtype} {tuple(position_ids.shape)}")
        if position_ids.device != x.device:
            raise ValueError(f"{op}: position_ids is on {position_ids.device} but x is on {x.device}")
        # CPU: checked here (no sync to pay). CUDA: no host sync per step; the kernel reads
        # nothing outside the table and makes such rows NaN.
        if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= cos.shape[0]:
                raise ValueError(f"{op}: position_ids hold {lo if lo < 0 else hi}, outside the cos/sin table's "
                                 f"{cos.shape[0]} positions")
    elif cos.dim() == 2 and seqlen_offset + S > cos.shape[0]:
        raise ValueError(f"{op}: the cos/sin table has {cos.shape[0]} positions but positions up to "
                         f"{seqlen_offset + S - 1} are needed")
    if isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int) or seqlen_offset < 0:
        raise ValueError(f"{op}: seqlen_offset must be a non-negative int, got {seqlen_offset!r}")
    if _dispatch.choose(op, x.device, empty=x.numel() == 0) == "torch":   # empty: nothing to launch
        return reference.apply_rotary_emb(x, cos, sin, interleaved, position_ids, seqlen_offset, layout, tables)
    cos, sin = cos.detach().contiguous(), sin.detach().contiguous()
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    pos = None
    if position_ids is not None:
        pos = position_ids.to(torch.int64).reshape(-1, S).expand(B, S)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    y = torch.ops.fastnets.rope(x4, cos, sin, pos, int(seqlen_offset), bool(interleaved), False, full)
    return y.transpose(1, 2) if layout == "bshd" else y


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
         position_ids: Optional[Tensor] = None, seqlen_offset: int = 0, layout: str = "bhsd",
         tables: str = "half") -> tuple[Tensor, Tensor]:
    """apply_rotary_emb to q and to k with the same tables (k may have fewer heads)."""
    return (apply_rotary_emb(q, cos, sin, interleaved, position_ids, seqlen_offset, layout, tables),
            apply_rotary_emb(k, cos, sin, interleaved, position_ids, seqlen_offset, layout, tables))
