"""upfirdn2d and filtered_lrelu: against a direct float64 implementation written from the
definition (every output a sum over the filter taps of the zero-inserted, padded input),
against the StyleGAN-style reference pipeline (fastnets.reference.upfirdn: torch's pad,
conv2d and slicing) in float64 and as the same-dtype baseline, gradients, second
derivatives, bad input."""
import pytest
import torch

from fastnets import ops, reference
from helpers import DEVICE, check_op, expect_backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def direct_upfirdn2d(x, f, up, down, padding, flip_filter=False, gain=1.0):
    """y[o] = sum_k f_c[k] u[o * down + k - p0], u the zero-inserted input (u[j] = x[j / up]
    where up divides j), f_c the filter as a correlation (flipped unless flip_filter), in
    float64, one tap at a time: no pad, conv or slicing of torch's involved."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, padding
    x = x.double()
    N, C, H, W = x.shape
    f = f.double() if f is not None else torch.ones(1, 1, dtype=torch.float64, device=x.device)
    f2 = torch.outer(f, f) * gain if f.dim() == 1 else f * gain
    fc = f2 if flip_filter else f2.flip(0, 1)
    KH, KW = fc.shape
    OH, OW = (H * uy + py0 + py1 - KH) // dy + 1, (W * ux + px0 + px1 - KW) // dx + 1
    oy, ox = torch.arange(OH, device=x.device), torch.arange(OW, device=x.device)
    y = torch.zeros(N, C, OH, OW, dtype=torch.float64, device=x.device)
    for ky in range(KH):
        jy = oy * dy + ky - py0                     # row of the upsampled, padded-away frame
        vy = (jy >= 0) & (jy < H * uy) & (jy % uy == 0)
        iy = torch.where(vy, jy // uy, 0)
        for kx in range(KW):
            jx = ox * dx + kx - px0
            vx = (jx >= 0) & (jx < W * ux) & (jx % ux == 0)
            ix = torch.where(vx, jx // ux, 0)
            taps = x[:, :, iy][:, :, :, ix] * (vy[:, None] & vx[None, :])
            y += fc[ky, kx] * taps
    return y


def _p4(padding):
    if isinstance(padding, int):
        return (padding,) * 4
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else tuple(padding)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (up, down, padding, filter shape, flip_filter, gain): every factor in 1 / 2 / 4, odd and
# even, separable and 2-D filters, padding that crops, StyleGAN2's up / down layers.
CASES = {
    "filter_only": (1, 1, 1, (3,), False, 1.0),
    "stylegan2_up": (2, 1, (2, 1, 2, 1), (4,), False, 4.0),
    "stylegan2_down": (1, 2, (1, 1, 1, 1), (4,), False, 1.0),
    "up4_odd_2d": (4, 1, (3, 2, 1, 4), (5, 3), True, 1.0),
    "down4_odd": (1, 4, (3, 2), (7,), False, 0.5),
    "crop": (2, 1, (-1, 3, 2, -2), (5,), False, 1.0),
    "up2_down2": (2, 2, 1, (3, 5), False, 2.0),
    "anisotropic": ((2, 1), (1, 2), (1, 2, 0, 1), (4,), False, 1.0),
    "no_filter_up": (2, 1, 0, None, False, 1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upfirdn2d_matches_direct_float64(name):
    up, down, padding, fshape, flip, gain = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64).to(DEVICE)
    f = torch.randn(*fshape, generator=g, dtype=torch.float64).to(DEVICE) if fshape else None
    with expect_backend("upfirdn2d"):
        y = ops.upfirdn2d(x, f, up, down, padding, flip, gain)
    want = direct_upfirdn2d(x, f, _pair(up), _pair(down), _p4(padding), flip, gain)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    ref = reference.upfirdn.upfirdn2d(x, f, _pair(up), _pair(down), _p4(padding), flip, gain)
    torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)    # the reference pipeline agrees


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["stylegan2_up", "stylegan2_down", "up4_odd_2d", "crop", "anisotropic"])
def test_upfirdn2d_fwd_bwd_against_float64_and_torch(name, dtype):
    up, down, padding, fshape, flip, gain = CASES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 8, generator=g).to(DEVICE, dtype)
    f = torch.randn(*fshape, generator=g, dtype=torch.float64).to(DEVICE)

    def ours(xx):
        return ops.upfirdn2d(xx, f, up, down, padding, flip, gain)

    def torch_pipeline(xx):
        return reference.upfirdn.upfirdn2d(xx, f, _pair(up), _pair(down), _p4(padding), flip, gain)

    def direct(xx):
        return direct_upfirdn2d(xx, f, _pair(up), _pair(down), _p4(padding), flip, gain)
    check_op("upfirdn2d", ours, direct, [x], dtype, peer=torch_pipeline)


def test_upfirdn2d_double_backward():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    f = torch.randn(4, dtype=torch.float64, device=DEVICE)
    with expect_backend("upfirdn2d"):
        assert torch.autograd.gradgradcheck(lambda xx: ops.upfirdn2d(xx, f, 2, 1, (2, 1, 2, 1)).square(), (x,),
                                            fast_mode=True)


def test_upfirdn2d_channels_last_and_noncontiguous_input():
    x = torch.randn(2, 4, 6, 5, device=DEVICE)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=DEVICE)
    want = direct_upfirdn2d(x, f / 8, (2, 2), (1, 1), (2, 1, 2, 1), gain=4.0)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = ops.upfirdn2d(view, f / 8, 2, 1, (2, 1, 2, 1), gain=4.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


FLRELU = {
    "stylegan3_up2_down2": dict(up=2, down=2, padding=(5, 4, 5, 4), fu=(6,), fd=(6,), clamp=None),
    "up2_clamp": dict(up=2, down=1, padding=(3, 2, 3, 2), fu=(6,), fd=(3,), clamp=0.7),
    "down2_2d": dict(up=1, down=2, padding=(1, 1, 1, 1), fu=(3, 3), fd=(4, 4), clamp=2.0),
    "plain": dict(up=1, down=1, padding=0, fu=None, fd=None, clamp=None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(FLRELU))
def test_filtered_lrelu_fwd_bwd_against_float64_and_torch(name, dtype):
    c = FLRELU[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 7, generator=g).to(DEVICE, dtype)
    b = torch.randn(3, generator=g).to(DEVICE, dtype)
    fu = torch.randn(*c["fu"], generator=g, dtype=torch.float64).to(DEVICE) / 2 if c["fu"] else None
    fd = torch.randn(*c["fd"], generator=g, dtype=torch.float64).to(DEVICE) / 2 if c["fd"] else None
    kw = dict(up=c["up"], down=c["down"], padding=c["padding"], clamp=c["clamp"], gain=1.3, slope=0.25)

    def ours(xx, bb):
        return ops.filtered_lrelu(xx, fu, fd, bb, **kw)

    def composed(xx, bb):
        """The definition, each stage through the direct implementation in float64."""
        z = xx.double() + bb.double().view(1, -1, 1, 1)
        z = direct_upfirdn2d(z, fu, (c["up"],) * 2, (1, 1), _p4(c["padding"]), gain=c["up"] ** 2)
        z = torch.nn.functional.leaky_relu(z, 0.25) * 1.3
        z = z.clamp(-c["clamp"], c["clamp"]) if c["clamp"] is not None else z
        return direct_upfirdn2d(z, fd, (1, 1), (c["down"],) * 2, (0, 0, 0, 0))

    def torch_pipeline(xx, bb):
        return reference.upfirdn.filtered_lrelu(xx, fu, fd, bb, c["up"], c["down"], _p4(c["padding"]), 1.3, 0.25,
                                                c["clamp"])
    check_op("filtered_lrelu", ours, composed, [x, b], dtype, peer=torch_pipeline)


def test_filtered_lrelu_double_backward():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fu = torch.randn(4, dtype=torch.float64, device=DEVICE)
    with expect_backend("filtered_lrelu"):
        assert torch.autograd.gradgradcheck(
            lambda xx, bb: ops.filtered_lrelu(xx, fu, fu, bb, up=2, down=2, padding=(2, 1, 2, 1), clamp=5.0),
            (x, b), fast_mode=True)


@pytest.mark.parametrize("kw", [dict(up=2, down=2, padding=2), dict(up=1, down=2, padding=2),
                                dict(up=2, down=1, padding=1, clamp=0.5)], ids=["up2down2", "down2", "up2-clamp"])
def test_filtered_lrelu_first_derivative_under_create_graph(kw):
    """Issue 24: with create_graph=True (R1 penalties through StyleGAN3 layers) the first
    derivative came from a graph that downsampled with the up and down factors swapped, off
    by about 4 from the plain backward; gradgradcheck cannot see that (it differentiates
    whatever first derivative the graph gives). Both must equal the plain one."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    fu, fd = (torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    with expect_backend("filtered_lrelu"):
        y = ops.filtered_lrelu(x, fu, fd, b, **kw)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)
    plain = torch.autograd.grad(y, (x, b), dy, retain_graph=True)
    graph = torch.autograd.grad(y, (x, b), dy, create_graph=True)
    for p_, q_ in zip(plain, graph):
        torch.testing.assert_close(q_, p_)
    assert torch.autograd.gradcheck(lambda xx, bb: ops.filtered_lrelu(xx, fu, fd, bb, **kw), (x, b))


@pytest.mark.parametrize("call,match", [
    (lambda x, f: ops.upfirdn2d(x, torch.ones(2, 2, 2)), "filter must be 1-D"),
    (lambda x, f: ops.upfirdn2d(x[0], f), "input must be 4-D"),
    (lambda x, f: ops.upfirdn2d(x, f, up=0), "up"),
    (lambda x, f: ops.upfirdn2d(x, f, padding=(-13, 0)), "padding"),
    (lambda x, f: ops.upfirdn2d(x, f, padding=(1, 2, 3)), "padding must be"),
    (lambda x, f: ops.upfirdn2d(x, f.requires_grad_()), "gradients with respect to filter"),
    (lambda x, f: ops.upfirdn2d(x, f[:0]), "must not be empty"),
    (lambda x, f: ops.filtered_lrelu(x, f, f, torch.ones(5)), "bias"),
    (lambda x, f: ops.filtered_lrelu(x, f, f, gain=-1.0), "gain must be positive"),
    (lambda x, f: ops.filtered_lrelu(x, f, f, up=(2, 2)), "up must be a positive int"),
    (lambda x, f: ops.filtered_lrelu(x, f, f, slope=-0.1), "slope"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    x = torch.randn(1, 3, 6, 6, device=DEVICE)
    f = torch.ones(4, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, f)
