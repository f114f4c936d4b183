"""cross_entropy (F.cross_entropy's signature plus a z-loss) and linear_cross_entropy (the LM
head's matmul fused with the loss, chunked over tokens so the (tokens, vocab) logits never
exist in full).

Both stream the vocabulary through fastnets/kernels/loss.py in float32 whatever the input dtype.
linear_cross_entropy computes the gradients of the input, weight and bias during the
forward pass (a chunk's logits are overwritten by their gradient, used for dx and dW, and
freed), accumulating dW and dbias across chunks in float32; the backward only scales them
by the upstream gradient. With reduction="none" the per-row upstream gradients are only
known in the backward, which then recomputes each chunk's logits instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks


def _loss_kernels():
    """fastnets.kernels.loss, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import loss
    return loss

_dispatch.register_op("cross_entropy", "softmax cross-entropy chunked over the vocabulary: ignore_index, "
                                       "label_smoothing, class weights, z-loss")
_dispatch.register_op("linear_cross_entropy", "LM head matmul + cross-entropy, chunked over tokens, fp32 dW")

REDUCTIONS = ("none", "mean", "sum")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The math dtype: float32, or float64 for float64 inputs (exact float64 gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("fastnets::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor], ignore_index: int,
            eps: float, z_loss: float) -> tuple[Tensor, Tensor]:
    return _loss_kernels().cross_entropy_fwd(logits, target, weight, wsum, ignore_index, eps, z_loss)


@_ce_fwd.register_fake
def _(logits, target, weight, wsum, ignore_index, eps, z_loss):
    n = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.custom_op("fastnets::cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
            lse: Tensor, ignore_index: int, eps: float, z_loss: float) -> Tensor:
    return _loss_kernels().cross_entropy_bwd(grad, logits, target, weight, wsum, lse, ignore_index, eps, z_loss)


@_ce_bwd.register_fake
def _(grad, logits, target, weight, wsum, lse, ignore_index, eps, z_loss):
    return torch.empty_like(logits)


@torch.library.custom_op("fastnets::cross_entropy_fwd_grad_", mutates_args=("logits",))
def _ce_fwd_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
                  grad_scale: Tensor, ignore_index: int, eps: float, z_loss: float) -> tuple[Tensor, Tensor]:
    return _loss_kernels().cross_entropy_fwd_grad_(logits, target, weight, wsum, grad_scale, ignore_index, eps,
                                                   z_loss)


@_ce_fwd_grad_.register_fake
def _(logits, target, weight, wsum, grad_scale, ignore_index, eps, z_loss):
    n = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


def _ce_setup(ctx, inputs, output):
    logits, target, weight, wsum, ignore_index, eps, z_loss = inputs
    ctx.save_for_backward(logits, target, weight, wsum, output[1])
    ctx.args = (ignore_index, eps, z_loss)


def _ce_backward(ctx, dloss, _dlse):
    logits, target, weight, wsum, lse = ctx.saved_tensors
    dlogits = torch.ops.fastnets.cross_entropy_bwd(dloss, logits, target, weight, wsum, lse, *ctx.args)
    return dlogits, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


# --- validation --------------------------------------------------------------------------------------

def _reduction(op: str, size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as legacy
        return legacy.legacy_get_string(size_average, reduce, emit_warning=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_target(op: str, target, n_rows: int, V: int, ignore_index: int, device) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{op}: target must hold integer class indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"{op}: target is on {target.device} but input is on {device}")
    if target.numel() != n_rows:
        raise ValueError(f"{op}: target has {target.numel()} entries for {n_rows} rows of logits")
    target = target.reshape(-1).to(torch.int64)
    # CPU targets are checked here (no sync to pay). On a GPU, checking would cost a
    # device-to-host sync every step; the kernel instead never reads out of range and makes
    # such rows' loss NaN.
    if n_rows and target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            raise ValueError(f"{op}: target holds class {int(target[bad][0])}, outside [0, {V}) and not "
                             f"ignore_index={ignore_index}")
    return target


def _class_weight(op: str, name: str, weight, V: int, like: Tensor):
    if weight is None:
        return None, None
    _checks.tensor(op, name, weight)
    if tuple(weight.shape) != (V,):
        raise ValueError(f"{op}: {name} must have shape ({V},), got {tuple(weight.shape)}")
    if weight.device != like.device:
        raise ValueError(f"{op}: {name} is on {weight.device} but input is on {like.device}")
    weight = weight.detach().contiguous()
    return weight, weight.to(_acc(like.dtype)).sum().reshape(1)


def _denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, acc=torch.float32) -> Tensor:
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    return (weight.to(acc)[target.clamp(0, weight.numel() - 1)] * valid).sum()


def _reduce(rows: Tensor, target: Tensor, weight, ignore_index: int, reduction: str, dtype) -> Tensor:
    if reduction == "none":
        return rows.to(dtype)
    if reduction == "sum":
        return rows.sum().to(dtype)
    return (rows.sum() / _denominator(target, weight, ignore_index, rows.dtype)).to(dtype)


def _smoothing(op: str, label_smoothing, z_loss) -> tuple[float, float]:
    eps = _checks.number(op, "label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {eps}")
    return eps, _checks.number(op, "z_loss", z_loss, min_value=0.0)


# --- public API ----------------------------------------------------------------------------------------

def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  z_loss: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.cross_entropy`` with class-index targets, plus an optional z-loss.

    input: (N, C), (C,) or (N, C, d1, ...) logits, fp16 / bf16 / fp32 / fp64; target: class
    indices of shape (N,), () or (N, d1, ...); ignore_index rows add nothing and get zero
    gradient. weight: (C,) class weights; label_smoothing in [0, 1] (torch's formula,
    weights included). z_loss: adds ``z_loss * logsumexp(logits)^2`` per non-ignored row
    (PaLM's stabilizer), reduced like the loss. reduction "mean" divides by the summed
    weights of the non-ignored targets (NaN when every row is ignored, as torch).
    A target class outside [0, C) (other than ignore_index) raises for CPU tensors and
    makes the loss NaN on CUDA (torch raises a device-side assert there).
    The loss has input's dtype (float32 under autocast, as torch) unless out_dtype is given
    (e.g. float32 for bf16 logits, skipping a rounding); all arithmetic is float32 (float64
    for float64 logits).
    Probability (float) targets (input's shape) run the torch reference, z_loss and out_dtype
    included, with a warning once (counted as a fallback in backend_report()).
    Backward: input. Backends: triton (CUDA), interpret (CPU + TRITON_INTERPRET=1), torch.
    """
    op = "cross_entropy"
    _checks.tensor(op, "input", input)
    reduction = _reduction(op, size_average, reduce, reduction)
    eps, z_loss = _smoothing(op, label_smoothing, z_loss)
    if input.dim() == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a 0-D tensor")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    weight, wsum = _class_weight(op, "weight", weight, C, input)
    if out_dtype is None:
        out_dtype = torch.float32 if (input.device.type in ("cuda", "cpu")
                                      and torch.is_autocast_enabled(input.device.type)) else input.dtype
    if isinstance(target, Tensor) and target.is_floating_point():
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(f"{op}: probability targets must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if target.device != input.device:
            raise ValueError(f"{op}: target is on {target.device} but input is on {input.device}")
        _dispatch.choose(op, input.device, unsupported="probability (float) targets")
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, eps, z_loss).to(out_dtype)
    if input.dim() == 1:
        logits, tshape = input.unsqueeze(0), ()
    elif input.dim() == 2:
        logits, tshape = input, (input.shape[0],)
    else:
        logits, tshape = input.movedim(1, -1).reshape(-1, C), (input.shape[0], *input.shape[2:])
    if isinstance(target, Tensor) and tuple(target.shape) != tuple(tshape):
        raise ValueError(f"{op}: target must have shape {tuple(tshape)} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    flat_target = _check_target(op, target, logits.shape[0], C, ignore_index, input.device)
    if _dispatch.choose(op, input.device, empty=logits.numel() == 0) == "torch":
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, eps, z_loss).to(out_dtype)
    logits = _checks.rows(logits, C)
    rows, _ = torch.ops.fastnets.cross_entropy_fwd(logits, flat_target, weight, wsum, int(ignore_index), eps, z_loss)
    out = _reduce(rows, flat_target, weight, ignore_index, reduction, out_dtype)
    return out.view(tshape) if reduction == "none" else out


def _chunk_rows(n: int, vocab: int, elem: int) -> int:
    """Rows per chunk. Each chunk reads and writes the float32 (V, H) dW accumulator
    (~12 V H bytes) for 2 C V H FLOPs of GEMM, so C must be in the thousands for that to be
    compute-bound (Liger's ~N H / V rows would make it bandwidth-bound); at most 4096 rows
    and at most 1 GiB of logits per chunk, which keeps peak memory far below the unfused
    step's (rows, vocab) logits + float32 softmax + gradient."""
    cap = max(1, (1 << 30) // max(1, vocab * elem))
    return max(1, min(n, 4096, cap))


def _accumulate_float32(acc: Tensor, a: Tensor, b: Tensor, block_bytes: int = 64 << 20) -> None:
    """acc (float32) += a @ b. Each product is summed in float32 inside the GEMM and rounded
    once; low-precision products go through row blocks so the temporary stays small
    instead of a full (V, H) copy in two dtypes."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    rows = max(1, block_bytes // max(1, b.shape[1] * 6))
    for r in range(0, a.shape[0], rows):
        acc[r:r + rows] += (a[r:r + rows] @ b).to(acc.dtype)


def _grad_buffers(x: Tensor, weight: Tensor, needs) -> tuple:
    """dx (x's dtype), dW and dbias (float32 accumulators), None where not needed."""
    return (torch.empty_like(x) if needs[0] else None,
            torch.zeros(weight.shape, dtype=_acc(x.dtype), device=x.device) if needs[1] else None,
            torch.zeros(weight.shape[0], dtype=_acc(x.dtype), device=x.device) if needs[2] else None)


def _backprop_chunk(dlogits: Tensor, xc: Tensor, weight: Tensor, dx_rows, dw, db) -> None:
    """One chunk's logits gradient into dx (its rows), dW and dbias."""
    if dx_rows is not None:
        torch.mm(dlogits, weight, out=dx_rows)
    if dw is not None:
        _accumulate_float32(dw, dlogits.t(), xc)
    if db is not None:
        db += dlogits.sum(0, dtype=db.dtype)


def _chunk_logits(x: Tensor, weight: Tensor, bias) -> Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, wsum, ignore_index, reduction, eps, z_loss, chunk,
                out_dtype):
        N, _ = x.shape
        needs = ctx.needs_input_grad[:3]
        precompute = any(needs) and reduction != "none"
        acc = _acc(x.dtype)
        denom = _denominator(target, class_weight, ignore_index, acc)
        scale = (1.0 / denom if reduction == "mean" else torch.ones((), device=x.device)).reshape(1).to(acc)
        rows = x.new_empty((N,), dtype=acc)
        lse = x.new_empty((N,), dtype=acc)
        dx, dw, db = _grad_buffers(x, weight, needs if precompute else (False,) * 3)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = _chunk_logits(x[s:e], weight, bias)
            if precompute:
                # logits become d(loss)/d(logits) * scale, in place.
                r, ls = torch.ops.fastnets.cross_entropy_fwd_grad_(logits, target[s:e], class_weight, wsum, scale,
                                                                   ignore_index, eps, z_loss)
                _backprop_chunk(logits, x[s:e], weight, dx[s:e] if dx is not None else None, dw, db)
            else:
                r, ls = torch.ops.fastnets.cross_entropy_fwd(logits, target[s:e], class_weight, wsum, ignore_index,
                                                             eps, z_loss)
            rows[s:e] = r
            lse[s:e] = ls
            del logits
        ctx.precompute, ctx.chunk, ctx.acc = precompute, chunk, acc
        ctx.args = (ignore_index, eps, z_loss)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        if precompute:
            ctx.save_for_backward(dx, dw, db)
        else:
            ctx.save_for_backward(x, weight, bias, target, class_weight, wsum, lse)
        if reduction == "none":
            return rows.to(out_dtype)
        total = rows.sum()
        return (total / denom if reduction == "mean" else total).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad[:3]
        w_dtype, b_dtype = ctx.dtypes
        if ctx.precompute:
            dx, dw, db = ctx.saved_tensors
            g = g.to(ctx.acc)
            return ((dx * g.to(dx.dtype)) if needs[0] else None, (dw * g).to(w_dtype) if needs[1] else None,
                    (db * g).to(b_dtype) if needs[2] else None, None, None, None, None, None, None, None, None, None)
        x, weight, bias, target, class_weight, wsum, lse = ctx.saved_tensors
        N, chunk = x.shape[0], ctx.chunk
        dx, dw, db = _grad_buffers(x, weight, needs)
        g = g.to(_acc(x.dtype))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = _chunk_logits(x[s:e], weight, bias)
            dlogits = torch.ops.fastnets.cross_entropy_bwd(g[s:e], logits, target[s:e], class_weight, wsum,
                                                           lse[s:e], *ctx.args)
            del logits
            _backprop_chunk(dlogits, x[s:e], weight, dx[s:e] if dx is not None else None, dw, db)
        return (dx, dw.to(w_dtype) if dw is not None else None, db.to(b_dtype) if db is not None else None,
                None, None, None, None, None, None, None, None, None)


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                         z_loss: float = 0.0, class_weight: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None) -> Tensor:
    """``cross_entropy(input @ weight.T + bias, target)`` without the full logits in memory.

    input: (..., H) hidden states; weight: (V, H) (the LM head / tied embedding); bias: (V,)
    or None; target: (...) class indices. Other options as ``cross_entropy``.
    chunk_size: rows per chunk (default: up to 4096 rows and at most 1 GiB of logits, large
    enough that the float32 dW accumulation stays compute-bound). Peak extra memory is one
    chunk of logits plus a float32 (V, H) gradient accumulator, instead of (rows, V)
    logits, their float32 softmax and their gradient.
    Backward: input, weight, bias (weight / bias gradients summed over chunks in float32).
    Under autocast the matmuls run in the autocast dtype, as the unfused torch step.
    """
    op = "linear_cross_entropy"
    _checks.tensor(op, "input", input, min_dim=1)
    _checks.tensor(op, "weight", weight)
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{op}: weight must be (vocab, {input.shape[-1]}), got {tuple(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    V, H = weight.shape
    bias = _checks.optional_param(op, "bias", bias, like=input, shape=(V,))
    # Under autocast torch's unfused head runs the linear in the autocast dtype and the
    # cross-entropy (on autocast's float32 list) in float32: the loss is float32.
    autocast_loss = input.dtype != torch.float64 and input.device.type in ("cuda", "cpu") and \
        torch.is_autocast_enabled(input.device.type)
    input, weight, bias = _checks.autocast(input, weight, bias)
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f"{op}: input, weight and bias must share a dtype, got {input.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    reduction = _reduction(op, None, None, reduction)
    eps, z_loss = _smoothing(op, label_smoothing, z_loss)
    x = input.reshape(-1, H)
    if isinstance(target, Tensor) and tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{op}: target must have shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    flat_target = _check_target(op, target, x.shape[0], V, ignore_index, input.device)
    class_weight, wsum = _class_weight(op, "class_weight", class_weight, V, input)
    if chunk_size is None:
        chunk_size = _chunk_rows(x.shape[0], V, x.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if _dispatch.choose(op, input.device) == "torch":
        out = reference.linear_cross_entropy(input, weight, target, bias, ignore_index, reduction, eps, z_loss,
                                             class_weight)
        return out.float() if autocast_loss else out
    x = x if x.stride(-1) == 1 else x.contiguous()
    with torch.autocast(input.device.type, enabled=False):
        out = _LinearCrossEntropy.apply(x, weight, bias, flat_target, class_weight, wsum, int(ignore_index),
                                        reduction, eps, z_loss, int(chunk_size),
                                        torch.float32 if autocast_loss else x.dtype)
    return out.view(input.shape[:-1]) if reduction == "none" else out
