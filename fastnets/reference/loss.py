"""Cross-entropy in plain PyTorch, float32 math (float64 for float64 input), with the z-loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t):
    return None if t is None else (t.double() if t.dtype == torch.float64 else t.float())


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """F.cross_entropy plus ``z_loss * logsumexp(x)^2`` per (non-ignored) row. input (N, C) or
    (N, C, d...); target class indices (mean divides by the summed target-class weights, as
    torch) or class probabilities shaped like input (mean divides by the number of rows)."""
    x = _acc(input)
    w = None if weight is None else weight.to(x.dtype)
    soft = target.is_floating_point()   # class probabilities, shaped like input: no ignore_index
    rows = F.cross_entropy(x, target.to(x.dtype) if soft else target, weight=w, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)
    valid = torch.ones_like(rows, dtype=torch.bool) if soft else target != ignore_index
    if z_loss:
        lse = torch.logsumexp(x, dim=1)
        rows = rows + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return rows.to(input.dtype)
    if reduction == "sum":
        return rows.sum().to(input.dtype)
    if soft:   # torch divides by the number of rows for probability targets, weights or not
        return (rows.sum() / rows.numel()).to(input.dtype)
    w = weight.to(x.dtype)[target.clamp_min(0)] if weight is not None else torch.ones_like(rows)
    return (rows.sum() / (w * valid).sum()).to(input.dtype)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, class_weight=None):
    """cross_entropy(input @ weight.T + bias, target): the unfused computation."""
    logits = F.linear(_acc(input), _acc(weight), _acc(bias))
    logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    out = cross_entropy(logits, target, class_weight, ignore_index, reduction, label_smoothing,
                         z_loss).to(input.dtype)
    return out.view(input.shape[:-1]) if reduction == "none" else out
