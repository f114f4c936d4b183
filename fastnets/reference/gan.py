"""GAN losses and the gradient penalties in torch ops (float32 math; float64 for float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def gan_loss_elementwise(x: Tensor, kind: str, real: bool, generator: bool, target: float) -> Tensor:
    """Per-element loss (fastnets/kernels/gan.py's table), differentiable to any order."""
    x = _acc(x)
    pos = real or generator
    if kind == "nonsaturating":
        return F.softplus(-x) if pos else F.softplus(x)
    if kind == "hinge":
        if generator:
            return -x
        return F.relu(1.0 - x) if real else F.relu(1.0 + x)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, target), reduction="none")
    return -x if pos else x


def gan_loss(x: Tensor, kind: str, real: bool, generator: bool, target: float, reduction: str) -> Tensor:
    loss = gan_loss_elementwise(x, kind, real, generator, target)
    out = loss if reduction == "none" else (loss.sum() if reduction == "sum" else loss.mean())
    return out.to(x.dtype) if reduction == "none" else out


def sq_norm(g: Tensor) -> Tensor:
    """(B,) per-sample sum of squares."""
    g = _acc(g)
    return g.pow(2).sum(dim=list(range(1, g.dim()))) if g.dim() > 1 else g.pow(2)
