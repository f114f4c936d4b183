"""Second derivatives through fastnets ops (what R1 / WGAN-GP gradient penalties need):
float64 gradgradcheck through the kernels (fast mode: a random direction, so each check
stays a few interpreted launches), and create_graph results equal torch's."""
import pytest
import torch
import torch.nn.functional as F

from fastnets import ops
from fastnets.reference.activation import ACTIVATIONS, GATED
from helpers import DEVICE, assert_close, expect_backend


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).requires_grad_()


def _gradgradcheck(fn, inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


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
        _gradgradcheck(lambda xx, bb: ops.bias_act(xx, bb, activation, negative_slope=0.2), (x, b))


@pytest.mark.parametrize("activation", ["leaky_relu", "swiglu"])
def test_bias_act_gain_clamp_gradgradcheck(activation):
    """StyleGAN2's bias_act with gain and clamp: second derivatives (R1 through a StyleGAN2
    discriminator). Values sit away from the clamp's bounds and relu's kink."""
    x = _away_from_zero(3, 8)
    b = (0.05 * torch.randn(8, dtype=torch.float64, device=DEVICE)).requires_grad_()
    with expect_backend("bias_act"):
        _gradgradcheck(lambda xx, bb: ops.bias_act(xx, bb, activation, negative_slope=0.2, gain=2 ** 0.5,
                                                   clamp=0.9), (x, b))


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
        _gradgradcheck(fns[name], (x, w, b))


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


def _away_from_zero(*shape):
    """float64 values with |v| >= 0.2: a relu / leaky_relu kink never sits within the
    finite-difference step of a pre-activation built from them."""
    v = torch.rand(*shape, dtype=torch.float64, device=DEVICE) + 0.2
    return (v * torch.where(torch.rand(*shape, device=DEVICE) < 0.5, -1.0, 1.0).double()).requires_grad_()


# Each geometry with one activation (every interpreted gradgradcheck costs seconds): the
# three act' paths -- identity, a mask of the output's sign, a recomputed z -- all appear.
CONV_CASES = {
    "plain-silu": dict(stride=1, padding=1, activation="silu"),
    "strided-leaky_relu": dict(stride=2, padding=1, activation="leaky_relu"),
    "floor-tanh": dict(stride=2, padding=0, activation="tanh"),   # the last input row is never read
    "dilated_groups-identity": dict(stride=1, padding=2, dilation=2, groups=2, activation="identity"),
    "same_even-leaky_relu": dict(padding="same", kernel=2, activation="leaky_relu"),  # asymmetric padding
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_gradgradcheck(case):
    kw = dict(CONV_CASES[case])
    activation = kw.pop("activation")
    k = kw.pop("kernel", 3)
    groups = kw.get("groups", 1)
    x, w, b = _f64(1, 2, 5, 6), _f64(4, 2 // groups, k, k), _f64(4)
    with expect_backend("conv2d"):
        _gradgradcheck(lambda xx, ww, bb: ops.conv2d(xx, ww, bb, activation=activation, negative_slope=0.2, **kw),
                       (x, w, b))


@pytest.mark.parametrize("activation", ["gelu"])
def test_conv2d_gradgradcheck_with_residual(activation):
    x, w, r = _f64(1, 2, 4, 4), _f64(3, 2, 3, 3), _f64(1, 3, 4, 4)
    with expect_backend("conv2d"):
        _gradgradcheck(lambda xx, ww, rr: ops.conv2d(xx, ww, None, padding=1, activation=activation, residual=rr),
                       (x, w, r))


def test_conv2d_relu_double_backward_matches_torch():
    """relu's act' is read off the output's sign: the second derivative equals torch's."""
    x, w = _away_from_zero(1, 2, 5, 5), _f64(3, 2, 3, 3)

    def second(conv):
        (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))
    with expect_backend("conv2d"):
        got = second(lambda xx: ops.conv2d(xx, w, padding=1, activation="relu"))
    want = second(lambda xx: F.relu(F.conv2d(xx, w, padding=1)))
    for a, e, name in zip(got, want, ("x", "w")):
        assert_close(a, e, torch.float64, f"d/d{name} of |dx|^2")


@pytest.mark.parametrize("case,activation", [(dict(stride=2, padding=1, output_padding=1), "leaky_relu"),
                                             (dict(stride=1, padding=0), "sigmoid"),
                                             (dict(stride=2, padding=1, groups=2, dilation=2), "identity")],
                         ids=["s2-leaky_relu", "s1-sigmoid", "groups_dil-identity"])
def test_conv_transpose2d_gradgradcheck(case, activation):
    groups = case.get("groups", 1)
    x, w, b = _f64(1, 4, 3, 4), _f64(4, 4 // groups, 3, 3), _f64(4)
    with expect_backend("conv_transpose2d"):
        _gradgradcheck(lambda xx, ww, bb: ops.conv_transpose2d(xx, ww, bb, activation=activation, negative_slope=0.2,
                                                               **case), (x, w, b))


@pytest.mark.parametrize("training,activation", [(True, "silu"), (True, "identity"), (False, "leaky_relu")],
                         ids=["train-silu", "train-identity", "eval-leaky_relu"])
def test_batch_norm_gradgradcheck(training, activation):
    x, w, b = _away_from_zero(3, 4, 2, 3), _f64(4), _f64(4)
    rm, rv = torch.randn(4, dtype=torch.float64, device=DEVICE), torch.rand(4, dtype=torch.float64, device=DEVICE) + 0.5
    # The pre-activation must stay away from leaky_relu's kink under the finite differences:
    # shift by a bias far from the normalised values' range.
    with expect_backend("batch_norm"):
        _gradgradcheck(lambda xx, ww, bb: ops.batch_norm(xx, rm.clone(), rv.clone(), ww, bb + 0.05, training,
                                                         activation=activation, negative_slope=0.2), (x, w, b))


POOLS = {
    "max": lambda x: ops.max_pool2d(x, 3, 2, 1),
    "max_ceil_dilated": lambda x: ops.max_pool2d(x, 2, 2, 0, dilation=2, ceil_mode=True),
    "avg": lambda x: ops.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    "avg_ceil": lambda x: ops.avg_pool2d(x, 2, 2, 0, ceil_mode=True),
    "adaptive_avg": lambda x: ops.adaptive_avg_pool2d(x, (2, 3)),
    "adaptive_max": lambda x: ops.adaptive_max_pool2d(x, (3, 2)),
}


@pytest.mark.parametrize("name,channels_last", [(n, False) for n in POOLS] + [("max", True), ("avg", True)])
def test_pool_gradgradcheck(name, channels_last):
    # Distinct values far apart: a finite-difference step never changes a window's argmax.
    x = (torch.randperm(2 * 3 * 7 * 7, device=DEVICE).double() * 0.1).view(2, 3, 7, 7)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    op = name.replace("_ceil", "").replace("_dilated", "")
    op = op + "_pool2d" if not op.startswith("adaptive") else op + "_pool2d"
    with expect_backend(op):
        _gradgradcheck(lambda xx: POOLS[name](xx).square(), (x,))


def _dcgan_pair(sn):
    from test_gan_models import torch_discriminator
    from fastnets.models import DCGANDiscriminator
    torch.manual_seed(0)
    ours = DCGANDiscriminator(nc=3, ndf=4, image_size=16, spectral_norm=sn).to(DEVICE).double()
    theirs = torch_discriminator(3, 4, 2, sn=sn).to(DEVICE).double()
    theirs.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("sn", [False, True], ids=["batchnorm", "spectral_norm"])
def test_r1_penalty_through_fastnets_dcgan_discriminator_matches_torch(sn):
    """The issue's bar: R1 through a discriminator of fastnets convolutions (fused LeakyReLU),
    training-mode BatchNorm and all, equals the penalty through the torch discriminator with
    the same weights: the value and every parameter's gradient."""
    ours, theirs = _dcgan_pair(sn)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, device=DEVICE)

    def penalty(model):
        xr = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)
        loss = ops.gradient_penalty(grad, "r1", gamma=10.0)
        loss.backward()
        return loss.detach(), {n.removeprefix("main."): p.grad for n, p in model.named_parameters()}
    with expect_backend("conv2d"):
        got, got_g = penalty(ours)
    want, want_g = penalty(theirs)
    assert_close(got, want, torch.float64, "R1 penalty")
    assert got_g.keys() == want_g.keys()
    for name in got_g:
        assert_close(got_g[name], want_g[name], torch.float64, f"R1 gradient of {name}", tensor_scale=True)
