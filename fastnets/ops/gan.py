"""GAN losses (non-saturating, hinge, BCE with label smoothing, Wasserstein) in one fused
kernel with the gradient written in the forward, and the R1 / R2 / WGAN-GP gradient
penalties from the input gradient with the squared-norm reduction fused (fastnets/kernels/gan.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks

KINDS = ("nonsaturating", "hinge", "bce", "wasserstein")
PENALTIES = ("r1", "wgan_gp")
REDUCTIONS = ("mean", "sum", "none")


def _gan_kernels():
    from ..kernels import gan
    return gan


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_dispatch.register_op("gan_loss", "GAN losses on logits (non-saturating, hinge, BCE + label smoothing, Wasserstein), "
                                  "the gradient written in the forward pass")
_dispatch.register_op("gradient_penalty", "R1 / R2 / WGAN-GP penalty from the input gradient: per-sample squared "
                                          "norm fused")


@torch.library.custom_op("fastnets::gan_loss_fwd", mutates_args=())
def _gan_loss_fwd(x: Tensor, kind: str, real: bool, generator: bool, target: float,
                  reduction: str) -> tuple[Tensor, Tensor]:
    n = x.numel()
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    loss, grad = _gan_kernels().gan_loss(x, kind, real, generator, target, reduction == "none", scale)
    if reduction != "none":
        loss = (loss * scale if reduction == "mean" else loss).to(x.dtype)
    return loss, grad


@_gan_loss_fwd.register_fake
def _(x, kind, real, generator, target, reduction):
    loss = torch.empty_like(x) if reduction == "none" else x.new_empty(())
    return loss, torch.empty_like(x, dtype=_acc(x.dtype))


def _gan_setup(ctx, inputs, output):
    x, kind, real, generator, target, reduction = inputs
    ctx.save_for_backward(x, output[1])
    ctx.args = (kind, real, generator, target, reduction)


def _gan_backward(ctx, g_loss, _g_grad):
    x, grad = ctx.saved_tensors
    kind, real, generator, target, reduction = ctx.args
    if torch.is_grad_enabled():
        # create_graph: the saved gradient is a constant to autograd, so differentiate the
        # torch formula instead (second derivatives stay right).
        with torch.enable_grad():
            # x itself (not a detached copy): the result must stay a function of x.
            xr = x if x.requires_grad else x.detach().requires_grad_()
            loss = reference.gan.gan_loss(xr, kind, real, generator, target, reduction)
            (dx,) = torch.autograd.grad(loss, xr, g_loss, create_graph=True)
        return dx, None, None, None, None, None
    return (grad * g_loss).to(x.dtype), None, None, None, None, None


_gan_loss_fwd.register_autograd(_gan_backward, setup_context=_gan_setup)


def gan_loss(logits: Tensor, target_is_real: bool, kind: str = "nonsaturating", *, for_generator: bool = False,
             label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """A GAN loss on discriminator logits in one pass (float32 math):

    - "nonsaturating": softplus(-x) for real data and for the generator, softplus(x) for fakes;
    - "hinge": relu(1 - x) real, relu(1 + x) fake, -x for the generator (``for_generator``);
    - "bce": BCE with logits against 1 - label_smoothing (real / generator; one-sided
      smoothing, Salimans et al. 2016) or 0 (fake);
    - "wasserstein": -x real / generator, x fake.

    ``target_is_real``: the discriminator's target (for the generator's loss pass True, or
    ``for_generator=True``, which also picks hinge's -x). reduction "mean", "sum" or "none".
    The gradient is written in the forward pass; ``create_graph=True`` differentiates the
    torch formula instead, so second derivatives are right. Backends: triton, interpret, torch.
    """
    op = "gan_loss"
    _checks.tensor(op, "logits", logits)
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    smoothing = _checks.number(op, "label_smoothing", label_smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {smoothing}")
    if smoothing and kind != "bce":
        raise ValueError(f"{op}: label_smoothing applies to kind='bce' only, got kind={kind!r}")
    real, gen = bool(target_is_real) or bool(for_generator), bool(for_generator)
    target = (1.0 - smoothing if not gen else 1.0) if real else 0.0
    backend = _dispatch.choose(op, logits.device, empty=logits.numel() == 0)
    if backend == "torch":
        return reference.gan.gan_loss(logits, kind, real, gen, target, reduction)
    loss, _ = torch.ops.fastnets.gan_loss_fwd(logits.contiguous(), kind, real, gen, target, reduction)
    return loss


@torch.library.custom_op("fastnets::sq_norm", mutates_args=())
def _sq_norm(g: Tensor) -> Tensor:
    return _gan_kernels().sq_norm(g)


@_sq_norm.register_fake
def _(g):
    return g.new_empty((g.shape[0],), dtype=_acc(g.dtype))


@torch.library.custom_op("fastnets::sq_norm_bwd", mutates_args=())
def _sq_norm_bwd(g: Tensor, up: Tensor) -> Tensor:
    return _gan_kernels().sq_norm_bwd(g, up)


@_sq_norm_bwd.register_fake
def _(g, up):
    return torch.empty_like(g)


def _sq_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sq_backward(ctx, up):
    (g,) = ctx.saved_tensors
    if torch.is_grad_enabled():      # create_graph through the penalty: differentiable torch ops
        return (2.0 * up.view(-1, *([1] * (g.dim() - 1))) * g).to(g.dtype)
    return torch.ops.fastnets.sq_norm_bwd(g, up.contiguous())


_sq_norm.register_autograd(_sq_backward, setup_context=_sq_setup)


def gradient_penalty(input_grad: Tensor, kind: str = "r1", gamma: float = 10.0, *,
                     reduction: str = "mean") -> Tensor:
    """The discriminator's gradient penalty from ``input_grad`` = dD/dx (take it with
    ``torch.autograd.grad(D(x).sum(), x, create_graph=True)``), per sample:

    - "r1": ``gamma / 2 * ||g||^2`` (Mescheder et al. 2018; R1 on real data, R2 on fakes);
    - "wgan_gp": ``gamma * (||g|| - 1)^2`` (Gulrajani et al. 2017; g at interpolates).

    The squared norm over each sample is one fused reduction (float32, no atomics); its
    backward one fused pass. reduction "mean" (over the batch), "sum" or "none" ((B,)).
    """
    op = "gradient_penalty"
    _checks.tensor(op, "input_grad", input_grad, min_dim=1)
    if kind not in PENALTIES:
        raise ValueError(f"{op}: kind must be one of {', '.join(PENALTIES)}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    gamma = _checks.number(op, "gamma", gamma, min_value=0.0)
    backend = _dispatch.choose(op, input_grad.device, empty=input_grad.numel() == 0)
    if backend == "torch":
        sq = reference.gan.sq_norm(input_grad)
    else:
        sq = torch.ops.fastnets.sq_norm(input_grad.contiguous())
    # clamp_min: a zero gradient has norm 0 and, as torch.norm's, a zero subgradient (no 0 * inf).
    per = gamma / 2 * sq if kind == "r1" else gamma * (sq.clamp_min(1e-30).sqrt() - 1.0) ** 2
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()
