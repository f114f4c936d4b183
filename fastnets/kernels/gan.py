"""GAN losses on discriminator logits, and the per-sample squared norm behind the R1 / R2 /
WGAN-GP gradient penalties.

Losses (float32 math; float64 for float64 logits), per element x, with the gradient written
in the same pass (scaled for the reduction) so the backward is one multiply:

    nonsaturating  real / generator: softplus(-x)    fake: softplus(x)
    hinge          real: relu(1 - x)  fake: relu(1 + x)  generator: -x
    bce            softplus(x) - t x, t = 1 - label_smoothing (real / generator), 0 (fake)
    wasserstein    real / generator: -x    fake: x

softplus(z) = max(z, 0) + log(1 + exp(-|z|)): exact for large |z|, no overflow. Partial sums
of the loss per program are summed in torch (deterministic, no atomics).

Squared norm: per sample, sum of g^2 over its elements (partials per chunk, as the loss);
its backward is 2 g times that sample's upstream gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_dtype, empty

KINDS = {"nonsaturating": 0, "hinge": 1, "bce": 2, "wasserstein": 3}


@triton.jit
def _gan_loss_kernel(X, Loss, Part, Grad, n, target, grad_scale,
                     KIND: tl.constexpr, REAL: tl.constexpr, GEN: tl.constexpr, WRITE_LOSS: tl.constexpr,
                     WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if KIND == 0:
        # softplus(s x) with s = -1 when the target is "real" (D on real data, or G).
        s = -1.0 if (REAL or GEN) else 1.0
        z = s * x
        e = tl.exp(-tl.abs(z))
        loss = tl.maximum(z, 0.0) + tl.log(1.0 + e)
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))      # sigmoid(z), stable both ways
        grad = s * sig
    elif KIND == 1:
        if GEN:
            loss = -x
            grad = tl.full([BLOCK], -1.0, ACC)
        elif REAL:
            loss = tl.maximum(1.0 - x, 0.0)
            grad = tl.where(x < 1.0, -1.0, 0.0).to(ACC)
        else:
            loss = tl.maximum(1.0 + x, 0.0)
            grad = tl.where(x > -1.0, 1.0, 0.0).to(ACC)
    elif KIND == 2:
        e = tl.exp(-tl.abs(x))
        loss = tl.maximum(x, 0.0) - target * x + tl.log(1.0 + e)
        grad = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) - target
    else:
        s = -1.0 if (REAL or GEN) else 1.0
        loss = s * x
        grad = tl.full([BLOCK], s, ACC)
    if WRITE_LOSS:
        tl.store(Loss + offs, loss.to(Loss.dtype.element_ty), mask=mask)
    else:
        tl.store(Part + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if WRITE_GRAD:
        tl.store(Grad + offs, (grad * grad_scale).to(Grad.dtype.element_ty), mask=mask)


@triton.jit
def _sq_norm_kernel(G, Part, per_sample, n_chunks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(G + b * per_sample + offs, mask=offs < per_sample, other=0.0).to(ACC)
    tl.store(Part + b * n_chunks + chunk, tl.sum(g * g, axis=0))


@triton.jit
def _sq_norm_bwd_kernel(G, Up, DG, per_sample, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    g = tl.load(G + b * per_sample + offs, mask=mask, other=0.0).to(ACC)
    up = tl.load(Up + b).to(ACC)
    tl.store(DG + b * per_sample + offs, (2.0 * up * g).to(DG.dtype.element_ty), mask=mask)


def _block(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    if not _common.gpu_launch(device):
        return 4096, 4
    return (256, 4) if dtype == torch.float64 else (1024, 4)


def gan_loss(x: torch.Tensor, kind: str, real: bool, generator: bool, target: float, elementwise: bool,
             grad_scale: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: contiguous logits. Returns (per-element loss, or the float32 total, and the
    gradient d loss / d x times grad_scale (None when grad_scale is None))."""
    n = x.numel()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block, warps = _block(x.device, x.dtype)
    grid = triton.cdiv(n, block) if n else 0
    loss = empty(x.shape, dtype=x.dtype, device=x.device) if elementwise else None
    part = _common.empty((grid,), dtype=acc, device=x.device) if not elementwise else None
    grad = empty(x.shape, dtype=acc, device=x.device) if grad_scale is not None else None
    if n:
        _gan_loss_kernel[(grid,)](
            x, loss if loss is not None else x, part if part is not None else x, grad if grad is not None else x, n,
            float(target), float(grad_scale or 0.0), KIND=KINDS[kind], REAL=real, GEN=generator,
            WRITE_LOSS=elementwise, WRITE_GRAD=grad is not None, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps)
    if elementwise:
        return loss, grad
    return (part.sum() if n else torch.zeros((), dtype=acc, device=x.device)), grad


def sq_norm(g: torch.Tensor) -> torch.Tensor:
    """g: (B, ...) contiguous. Returns (B,) sums of squares in the accumulator dtype."""
    B = g.shape[0]
    per = g.numel() // B if B else 0
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    block, warps = _block(g.device, g.dtype)
    n_chunks = triton.cdiv(per, block) if per else 0
    if not (B and per):
        return torch.zeros((B,), dtype=acc, device=g.device)
    part = _common.empty((B, n_chunks), dtype=acc, device=g.device)
    _sq_norm_kernel[(B, n_chunks)](g, part, per, n_chunks, ACC=acc_dtype(g.dtype), BLOCK=block, num_warps=warps)
    return part.sum(1)


def sq_norm_bwd(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    B = g.shape[0]
    per = g.numel() // B if B else 0
    dg = empty(g.shape, dtype=g.dtype, device=g.device)
    block, warps = _block(g.device, g.dtype)
    if B and per:
        _sq_norm_bwd_kernel[(B, triton.cdiv(per, block))](g, up, dg, per, ACC=acc_dtype(g.dtype), BLOCK=block,
                                                          num_warps=warps)
    return dg
