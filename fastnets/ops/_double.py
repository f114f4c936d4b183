"""Second derivatives for ops whose backward runs fused kernels.

A backward kernel is a custom op without an autograd formula of its own, so a backward taken
with ``create_graph=True`` (gradient penalties: R1, WGAN-GP) cannot go through it. When
autograd asks for a graph of the backward (grad mode is on inside the backward function),
these ops compute their first derivatives from the plain-torch reference instead: the same
numbers, and a graph autograd can differentiate again. The common case, a plain
``.backward()``, never comes here and keeps the kernels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def wanted() -> bool:
    """True inside a backward that must itself be differentiable (create_graph=True)."""
    return torch.is_grad_enabled()


def reference_grads(fn: Callable, inputs: Sequence[Optional[Tensor]], grad_out: Tensor) -> list:
    """d <fn(*inputs), grad_out> / d input for every tensor input, as a differentiable graph
    of the inputs (the saved originals, so the graph reaches back to the forward's inputs)
    and of grad_out. None inputs give None; an input the output does not use, zeros."""
    with torch.enable_grad():
        ins = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in inputs]
        out = fn(*ins)
        tensors = [t for t in ins if t is not None]
        grads = torch.autograd.grad(out, tensors, grad_out, create_graph=True, allow_unused=True)
    it = iter(grads)
    result = []
    for t in ins:
        if t is None:
            result.append(None)
            continue
        g = next(it)
        result.append(torch.zeros_like(t) if g is None else g)
    return result
