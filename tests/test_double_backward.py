"""Second derivatives through fastnets ops (what R1 / WGAN-GP gradient penalties need):
float64 gradgradcheck through the kernels, and create_graph results equal torch's. The ops
whose backward has no formula of its own yet (convolutions, batch norm, pools) must raise,
never give a silent zero."""
import pytest
import torch
import torch.nn.functional as F

from fastnets import ops
from fastnets.reference.activation import ACTIVATIONS, GATED
from helpers import DEVICE, assert_close, expect_backend


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).requires_grad_()


@pytest.mark.parametrize("activation", list(ACTIVATIONS) + list(GATED))
def test_bias_act_gradgradcheck(activation):
    if activation in ("relu", "leaky_relu"):
        x = (torch.rand(3, 8, dtype=torch.float64, device=DEVICE) + 0.1) * torch.tensor([-1.0, 1.0] * 4, device=DEVICE,
                                                                                      dtype=torch.float64)
        x.requires_grad_()                                   # away from the kink
    else:
        x = _f64(3, 8)
    b = _f64(8)
    with expect_backend("bias_act"):
        assert torch.autograd.gradgradcheck(lambda xx, bb: ops.bias_act(xx, bb, activation, negative_slope=0.2),
                                            (x, b))


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "rms_norm_offset", "group_norm", "group_norm_silu"])
def test_norm_gradgradcheck(name):
    x, w, b = _f64(2, 6, 5), _f64(5), _f64(5)
    fns = {"layer_norm": lambda xx, ww, bb: ops.layer_norm(xx, (5,), ww, bb),
           "rms_norm": lambda xx, ww, bb: ops.rms_norm(xx, (5,), ww, 1e-6) + bb,
           "rms_norm_offset": lambda xx, ww, bb: ops.rms_norm(xx, (5,), ww, 1e-6, offset=1.0) + bb,
           "group_norm": lambda xx, ww, bb: ops.group_norm(xx.transpose(1, 2), 5, ww, bb),
           "group_norm_silu": lambda xx, ww, bb: ops.group_norm(xx.transpose(1, 2), 5, ww, bb, activation="silu")}
    op = name.replace("_offset", "").replace("_silu", "")
    with expect_backend(op):
        assert torch.autograd.gradgradcheck(fns[name], (x, w, b))


def test_gradient_penalty_through_fastnets_mlp_discriminator_matches_torch():
    """R1 through a discriminator of fastnets ops (LayerNorm, fused bias + LeakyReLU) equals
    the same penalty through the torch ops, value and every parameter gradient."""
    torch.manual_seed(0)
    w1, b1, g1, w2 = _f64(16, 12), _f64(16), _f64(16), _f64(1, 16)

    def D(x, fused):
        h = x @ w1.t()
        if fused:
            h = ops.bias_act(ops.layer_norm(h, (16,), g1, None), b1, "leaky_relu", negative_slope=0.2)
        else:
            h = F.leaky_relu(F.layer_norm(h, (16,), g1, None) + b1, 0.2)
        return h @ w2.t()

    def penalty(fused):
        torch.manual_seed(1)
        x = torch.randn(5, 12, dtype=torch.float64, device=DEVICE).requires_grad_()
        (grad,) = torch.autograd.grad(D(x, fused).sum(), x, create_graph=True)
        loss = ops.gradient_penalty(grad, "r1", gamma=10.0)
        params = (w1, b1, g1, w2)
        return loss.detach(), torch.autograd.grad(loss, params)
    got, got_g = penalty(True)
    want, want_g = penalty(False)
    assert_close(got, want, torch.float64, "R1 penalty")
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        assert_close(a, b, torch.float64, f"param {i} gradient")


def test_double_backward_through_conv_raises_clearly():
    x, w = _f64(1, 2, 5, 5), _f64(3, 2, 3, 3)
    (g,) = torch.autograd.grad(ops.conv2d(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()
