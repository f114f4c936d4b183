"""conv2d / conv1d / conv_transpose2d: every option against the float64 reference and torch
eager, forward and every gradient, NCHW and channels_last, the fused epilogue, gradcheck,
bad input. bfloat16 included: the
interpreter's bf16 dot is fixed in kernels._common."""
import pytest
import torch
import torch.nn.functional as F

from fastnets import ops, reference
from fastnets.ops.conv import ACTIVATIONS
import tolerances
from helpers import DEVICE, assert_close, check_op, expect_backend

DTYPES = list(tolerances.DTYPES)

# (input shape, weight shape, stride, padding, dilation, groups)
CONV2D_CASES = [
    ((1, 3, 17, 23), (6, 1, 5, 5), 1, 2, 1, 3),             # odd sizes, 5x5, groups=3
    ((2, 4, 9, 10), (8, 4, 3, 3), 2, 1, 1, 1),              # strided 3x3
    ((2, 6, 11, 7), (4, 3, 3, 1), (1, 2), (1, 0), (2, 1), 2),
    ((2, 8, 9, 9), (8, 1, 3, 3), 1, 1, 1, 8),               # depthwise
    ((2, 16, 5, 5), (32, 16, 1, 1), 2, 0, 1, 1),            # 1x1 downsample
    ((1, 3, 20, 20), (8, 3, 7, 7), 2, 3, 1, 1),             # ResNet stem
    ((1, 4, 8, 9), (5, 4, 4, 2), 1, "same", (1, 2), 1),     # even kernel, asymmetric "same"
    ((2, 5, 6, 6), (3, 5, 2, 3), 1, "valid", 1, 1),
    ((1, 2, 4, 5), (3, 2, 5, 6), 3, 1, 1, 1),               # kernel == padded input
]


def _conv_args(x_shape, w_shape, dtype, channels_last, bias=True):
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(w_shape, device=DEVICE) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5).to(dtype)
    b = torch.randn(w_shape[0], device=DEVICE).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV2D_CASES, ids=[f"case{i}" for i in range(len(CONV2D_CASES))])
def test_conv2d(case, dtype, channels_last):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x, w, b = _conv_args(x_shape, w_shape, dtype, channels_last)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_op("conv2d", lambda x, w, b: ops.conv2d(x, w, b, **kw), lambda x, w, b: reference.conv2d(x, w, b, **kw),
             [x, w, b], dtype, peer=lambda x, w, b: F.conv2d(x, w, b, **kw))


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_gradients_keep_the_layouts(channels_last):
    """The kernels run on NHWC / (K, R, S, C) copies; what comes back has the caller's layout
    (as the custom ops' fake implementations promise torch.compile): dx like x, dw like w."""
    x, w, b = _conv_args((2, 4, 6, 7), (8, 4, 3, 3), torch.float32, channels_last)
    if channels_last:   # as model.to(memory_format=torch.channels_last) leaves a conv weight
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(), w.requires_grad_()
    with expect_backend("conv2d"):
        y = ops.conv2d(x, w, b, padding=1)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    assert gw.is_contiguous(memory_format=fmt) and gw.stride() == w.stride()


def test_conv2d_keeps_channels_last():
    x, w, b = _conv_args((2, 4, 6, 7), (8, 4, 3, 3), torch.float32, True)
    y = ops.conv2d(x, w, b, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ops.conv2d(x.contiguous(), w, b, padding=1).is_contiguous()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv2d_fused_epilogue(activation):
    """act(conv(x) + bias + residual) with gradients through every input, residual included."""
    x, w, b = _conv_args((2, 6, 7, 9), (6, 3, 3, 3), torch.float32, False)
    res = torch.randn(2, 6, 7, 9, device=DEVICE)
    kw = dict(padding=1, groups=2, activation=activation, negative_slope=0.2)

    def peer(x, w, b, r):
        z = F.conv2d(x, w, b, padding=1, groups=2) + r
        return reference.bias_act(z.transpose(1, -1), None, activation, negative_slope=0.2).transpose(1, -1)

    check_op("conv2d", lambda x, w, b, r: ops.conv2d(x, w, b, residual=r, **kw),
             lambda x, w, b, r: reference.conv2d(x, w, b, residual=r, **kw), [x, w, b, res], torch.float32, peer=peer)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_resnet_block_epilogue_channels_last(dtype):
    """The basic-block tail: relu(conv(x) + bias + identity), channels_last, low precision."""
    x, w, b = _conv_args((2, 16, 6, 6), (16, 16, 3, 3), dtype, True)
    res = torch.randn(2, 16, 6, 6, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    check_op("conv2d", lambda x, w, b, r: ops.conv2d(x, w, b, padding=1, activation="relu", residual=r),
             lambda x, w, b, r: reference.conv2d(x, w, b, padding=1, activation="relu", residual=r),
             [x, w, b, res], dtype, peer=lambda x, w, b, r: F.relu(F.conv2d(x, w, b, padding=1) + r))


def test_conv2d_no_bias_unbatched():
    x, w, _ = _conv_args((1, 3, 8, 8), (4, 3, 3, 3), torch.float32, False, bias=False)
    x = x[0]
    check_op("conv2d", lambda x, w: ops.conv2d(x, w, None, 1, 1), lambda x, w: reference.conv2d(x, w, None, 1, 1),
             [x, w], torch.float32, peer=lambda x, w: F.conv2d(x, w, None, 1, 1))


def test_conv2d_gradcheck_float64():
    """Through the kernels (fwd, dgrad, wgrad + fused dbias, activation backward); fast_mode
    checks random projections of the Jacobian, which keeps the interpreter run short."""
    x = torch.randn(1, 4, 5, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    r = torch.randn(1, 4, 3, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    with expect_backend("conv2d"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r: ops.conv2d(x, w, b, stride=2, padding=1, groups=2, activation="silu", residual=r),
            (x, w, b, r), fast_mode=True)


def test_conv2d_only_weight_requires_grad():
    x, w, b = _conv_args((1, 3, 6, 6), (4, 3, 3, 3), torch.float32, False)
    w.requires_grad_()
    y = ops.conv2d(x, w, b, padding=1)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    wr = w.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(reference.conv2d(x.double(), wr, b.double(), padding=1).sum(), [wr])
    # torch's own float32 gradient, under the same TF32 setting (cuDNN uses TF32 by default).
    wt = w.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.conv2d(x, wt, b, padding=1).sum(), [wt])
    assert_close(gw, gr, torch.float32, "conv2d weight gradient", baseline=gt)


# --- conv1d -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((2, 4, 19), (6, 2, 5), 2, 2, 1, 2), ((1, 3, 16), (3, 1, 3), 1, "same", 3, 3),
                                  ((3, 8, 7), (4, 8, 1), 1, 0, 1, 1)])
def test_conv1d(case, dtype):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    w = (torch.randn(w_shape, device=DEVICE) / (w_shape[1] * w_shape[2]) ** 0.5).to(dtype)
    b = torch.randn(w_shape[0], device=DEVICE).to(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_op("conv2d", lambda x, w, b: ops.conv1d(x, w, b, **kw), lambda x, w, b: reference.conv1d(x, w, b, **kw),
             [x, w, b], dtype, peer=lambda x, w, b: F.conv1d(x, w, b, **kw))


# --- conv_transpose2d -------------------------------------------------------------------------

# (input shape, weight shape, stride, padding, output_padding, groups, dilation)
CONVT_CASES = [
    ((2, 8, 4, 4), (8, 4, 4, 4), 2, 1, 0, 1, 1),            # DCGAN generator block
    ((1, 4, 5, 7), (4, 3, 3, 3), 2, 1, 1, 2, 1),            # output_padding, groups
    ((2, 3, 3, 4), (3, 2, 3, 2), (2, 3), (0, 1), (1, 2), 1, (1, 2)),
    ((1, 6, 6, 5), (6, 1, 3, 3), 1, 1, 0, 6, 2),            # depthwise, dilated
    ((2, 4, 1, 1), (4, 5, 4, 4), 1, 0, 0, 1, 1),            # latent 1x1 -> 4x4
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVT_CASES, ids=[f"case{i}" for i in range(len(CONVT_CASES))])
def test_conv_transpose2d(case, dtype, channels_last):
    x_shape, w_shape, stride, padding, output_padding, groups, dilation = case
    x, w, b = _conv_args(x_shape, w_shape, dtype, channels_last)
    b = torch.randn(w_shape[1] * groups, device=DEVICE).to(dtype)
    args = (stride, padding, output_padding, groups, dilation)
    check_op("conv_transpose2d", lambda x, w, b: ops.conv_transpose2d(x, w, b, *args),
             lambda x, w, b: reference.conv_transpose2d(x, w, b, *args), [x, w, b], dtype,
             peer=lambda x, w, b: F.conv_transpose2d(x, w, b, *args))


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
def test_conv_transpose2d_fused_activation(activation):
    x, w, _ = _conv_args((2, 4, 3, 3), (4, 3, 4, 4), torch.float32, False)
    b = torch.randn(3, device=DEVICE)
    kw = dict(activation=activation, negative_slope=0.2)
    act = {"relu": F.relu, "tanh": torch.tanh, "leaky_relu": lambda z: F.leaky_relu(z, 0.2)}[activation]
    check_op("conv_transpose2d", lambda x, w, b: ops.conv_transpose2d(x, w, b, 2, 1, **kw),
             lambda x, w, b: reference.conv_transpose2d(x, w, b, 2, 1, **kw), [x, w, b], torch.float32,
             peer=lambda x, w, b: act(F.conv_transpose2d(x, w, b, 2, 1)))


def test_conv_transpose2d_gradcheck_float64():
    x = torch.randn(1, 4, 2, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    with expect_backend("conv_transpose2d"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: ops.conv_transpose2d(x, w, b, 2, 1, 1, 2, activation="gelu"), (x, w, b), fast_mode=True)


# --- edge cases and bad input --------------------------------------------------------------------

def test_conv2d_empty_batch():
    x, w, b = _conv_args((0, 3, 5, 5), (4, 3, 3, 3), torch.float32, False)
    assert ops.conv2d(x, w, b).shape == (0, 4, 3, 3)


def test_conv2d_autocast_runs_in_low_precision():
    x, w, b = _conv_args((1, 4, 6, 6), (4, 4, 3, 3), torch.float32, False)
    with torch.autocast(DEVICE.type, dtype=torch.float16), expect_backend("conv2d"):
        y = ops.conv2d(x, w, b, padding=1)
    assert y.dtype == torch.float16


@pytest.mark.parametrize("call, match", [
    (lambda x, w: ops.conv2d(x, w[:, :2], groups=3), "channels"),
    (lambda x, w: ops.conv2d(torch.randn(2, 4, 6, 6, device=DEVICE), torch.randn(5, 2, 3, 3, device=DEVICE),
                             groups=2), "divisible by groups"),
    (lambda x, w: ops.conv2d(x[..., :2, :2], w), "larger than the padded input"),
    (lambda x, w: ops.conv2d(x[0, 0], w), "4-D"),
    (lambda x, w: ops.conv2d(x, w[0]), "weight must be 4-D"),
    (lambda x, w: ops.conv2d(x, w.double()), "dtype"),
    (lambda x, w: ops.conv2d(x, w, padding="same", stride=2), "strided"),
    (lambda x, w: ops.conv2d(x, w, padding="full"), "padding"),
    (lambda x, w: ops.conv2d(x, w, stride=0), "stride"),
    (lambda x, w: ops.conv2d(x, w, activation="swish"), "activation"),
    (lambda x, w: ops.conv2d(x, w, residual=torch.zeros(2, 4, 5, 5)), "residual"),
    (lambda x, w: ops.conv2d(x, w, torch.zeros(3)), "bias"),
    (lambda x, w: ops.conv_transpose2d(x, w.transpose(0, 1), output_padding=1), "output_padding"),
    (lambda x, w: ops.conv_transpose2d(x[:, :2], w.transpose(0, 1)), "channels"),
    (lambda x, w: ops.conv2d(x, w, groups=0), "groups"),
])
def test_conv_bad_input(call, match):
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


def test_conv2d_frozen_weight_no_bias():
    """Transfer learning freezes weights: only dx is needed (and no bias)."""
    x, w, _ = _conv_args((1, 3, 6, 6), (4, 3, 3, 3), torch.float32, False, bias=False)
    x.requires_grad_()
    with expect_backend("conv2d"):
        (gx,) = torch.autograd.grad(ops.conv2d(x, w, None, padding=1).sum(), [x])
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(reference.conv2d(xr, w.double(), None, padding=1).sum(), [xr])
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.conv2d(xt, w, None, padding=1).sum(), [xt])
    assert_close(gx, gr, torch.float32, "conv2d input gradient", baseline=gt)


# --- property test: random legal geometry, groups, layouts, epilogues ----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=st.sampled_from(DTYPES), channels_last=st.booleans(),
       activation=st.sampled_from(["identity", "relu", "gelu", "silu"]))
def test_conv2d_property(data, dtype, channels_last, activation):
    groups = data.draw(st.integers(1, 3))
    c_in, c_out = groups * data.draw(st.integers(1, 3)), groups * data.draw(st.integers(1, 3))
    k = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dil = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    pad = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    h = data.draw(st.integers(max(1, dil[0] * (k[0] - 1) + 1 - 2 * pad[0]), 11))
    w = data.draw(st.integers(max(1, dil[1] * (k[1] - 1) + 1 - 2 * pad[1]), 11))
    x = torch.randn(data.draw(st.integers(1, 2)), c_in, h, w, device=DEVICE).to(dtype)
    wt = (torch.randn(c_out, c_in // groups, *k, device=DEVICE) / (c_in * k[0] * k[1] / groups) ** 0.5).to(dtype)
    b = torch.randn(c_out, device=DEVICE).to(dtype) if data.draw(st.booleans()) else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)

    def torch_conv(x, w, b=None):
        return _torch_act(activation, F.conv2d(x, w, b, **kw))

    args = [x, wt] + ([b] if b is not None else [])
    check_op("conv2d", lambda *a: ops.conv2d(*a, **kw, activation=activation),
             lambda *a: reference.conv2d(*a, **kw, activation=activation), args, dtype, peer=torch_conv)


def _torch_act(name, z):
    return {"identity": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name](z)
