"""GAN losses and gradient penalties: against the float64 torch formulas and torch eager
(values and gradients, every kind, target and reduction), second derivatives with
create_graph, the R1 penalty through a discriminator equal to the plain torch computation
(value and every parameter gradient), bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fastnets import ops, reference
from helpers import DEVICE, assert_close, expect_backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (kind, target_is_real, for_generator, label_smoothing)
SETTINGS = [("nonsaturating", True, False, 0.0), ("nonsaturating", False, False, 0.0),
            ("nonsaturating", True, True, 0.0), ("hinge", True, False, 0.0), ("hinge", False, False, 0.0),
            ("hinge", False, True, 0.0), ("bce", True, False, 0.1), ("bce", False, False, 0.0),
            ("bce", True, True, 0.0), ("wasserstein", True, False, 0.0), ("wasserstein", False, False, 0.0)]


def _torch_loss(x, kind, real, gen, smoothing):
    """The textbook formulas, written independently of fastnets.reference."""
    if kind == "nonsaturating":
        return F.softplus(-x) if (real or gen) else F.softplus(x)
    if kind == "hinge":
        return -x if gen else (F.relu(1 - x) if real else F.relu(1 + x))
    if kind == "bce":
        t = (1.0 if gen else 1.0 - smoothing) if (real or gen) else 0.0
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, t), reduction="none")
    return -x if (real or gen) else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["-".join(map(str, s)) for s in SETTINGS])
def test_gan_loss_matches_float64_and_torch(setting, reduction, dtype):
    kind, real, gen, smoothing = setting
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 3, generator=g) * 4)
    x[0, 0], x[1, 1], x[2, 2] = 1.0, -1.0, 60.0                        # hinge kinks and a large logit
    x = x.to(DEVICE, dtype).requires_grad_()
    with expect_backend("gan_loss"):
        out = ops.gan_loss(x, real, kind, for_generator=gen, label_smoothing=smoothing, reduction=reduction)
    x64 = x.detach().double().requires_grad_()
    per = _torch_loss(x64, kind, real, gen, smoothing)
    want = per if reduction == "none" else (per.sum() if reduction == "sum" else per.mean())
    xb = x.detach().clone().requires_grad_()
    perb = _torch_loss(xb.float(), kind, real, gen, smoothing)
    base = perb if reduction == "none" else (perb.sum() if reduction == "sum" else perb.mean())
    assert_close(out, want, dtype, f"{kind} loss", baseline=base.to(dtype), tensor_scale=True)
    up = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype) if reduction == "none" else None
    (out * up).sum().backward() if up is not None else out.backward()
    (want * up.double()).sum().backward() if up is not None else want.backward()
    assert_close(x.grad, x64.grad, dtype, f"{kind} d logits")


def test_gan_loss_second_derivative_is_the_formulas():
    x = torch.randn(9, 1, dtype=torch.float64, device=DEVICE).requires_grad_()
    for kind, real, gen, smoothing in SETTINGS:
        f = lambda t: ops.gan_loss(t, real, kind, for_generator=gen, label_smoothing=smoothing)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,)), kind


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind,reduction", list(itertools.product(("r1", "wgan_gp"), ("mean", "sum", "none"))))
def test_gradient_penalty_matches_formula(kind, reduction, dtype):
    g = torch.randn(5, 3, 7, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    g[4] = 0                                                          # a zero gradient: norm 0, no NaN
    g.requires_grad_()
    with expect_backend("gradient_penalty"):
        out = ops.gradient_penalty(g, kind, gamma=4.0, reduction=reduction)
    g64 = g.detach().double().requires_grad_()
    norm = g64.flatten(1).norm(dim=1)
    per = 2.0 * norm ** 2 if kind == "r1" else 4.0 * (norm - 1) ** 2
    want = per if reduction == "none" else (per.sum() if reduction == "sum" else per.mean())
    assert_close(out, want, torch.float32 if dtype != torch.float64 else dtype, "penalty", tensor_scale=True)
    out.sum().backward()
    want.sum().backward()
    assert_close(g.grad, g64.grad, dtype, "d input_grad", tensor_scale=True)
    assert torch.isfinite(g.grad).all()


def _discriminator():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                               torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 2 * 2, 1)).to(DEVICE).double()


def test_r1_regularised_discriminator_step_matches_torch():
    """StyleGAN2's D step: non-saturating loss on real and fake logits + R1 on reals, with
    the fused loss and penalty, equals the same step in plain torch (value and every
    parameter gradient)."""
    D = _discriminator()
    real = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=DEVICE)
    fake = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=DEVICE)

    def step(fused):
        D.zero_grad()
        x = real.detach().requires_grad_()
        real_logits, fake_logits = D(x), D(fake)
        (grad,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
        if fused:
            loss = (ops.gan_loss(real_logits, True) + ops.gan_loss(fake_logits, False)
                    + ops.gradient_penalty(grad, "r1", gamma=10.0))
        else:
            loss = (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
                    + (10.0 / 2 * grad.square().sum([1, 2, 3])).mean())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in D.named_parameters()}
    got, got_grads = step(True)
    want, want_grads = step(False)
    assert_close(got, want, torch.float64, "D loss")
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], torch.float64, f"grad {n}")


def test_gan_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.gan_loss(x, True, "lsgan")
    with pytest.raises(ValueError, match="label_smoothing applies to kind='bce'"):
        ops.gan_loss(x, True, "hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.gan_loss(x, True, "bce", label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.gan_loss(x, True, reduction="avg")
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.gradient_penalty(torch.randn(2, 3), "r3")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        ops.gradient_penalty(torch.randn(2, 3), gamma=-1.0)


def test_reference_and_kernel_agree_elementwise():
    x = torch.linspace(-30, 30, 101, device=DEVICE)
    for kind, real, gen, smoothing in SETTINGS:
        target = (1.0 - smoothing if not gen else 1.0) if (real or gen) else 0.0
        got = ops.gan_loss(x, real, kind, for_generator=gen, label_smoothing=smoothing, reduction="none")
        want = reference.gan.gan_loss_elementwise(x.double(), kind, real or gen, gen, target)
        assert_close(got, want, torch.float32, kind)
