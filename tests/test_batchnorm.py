"""batch_norm: training and eval, NCHW and channels_last, running statistics exactly as
torch updates them, fused activation, mixed-precision parameters, gradcheck, bad input;
fold_conv_bn."""
import pytest
import torch
import torch.nn.functional as F

from fastnets import ops, reference
from helpers import DEVICE, assert_close, check_op, expect_backend
from tolerances import POINTWISE_DTYPES


def _args(shape, dtype, channels_last=False, affine=True, param_dtype=None):
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    pd = param_dtype or dtype
    w = (torch.rand(C, device=DEVICE) + 0.5).to(pd) if affine else None
    b = torch.randn(C, device=DEVICE).to(pd) if affine else None
    return x, w, b


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 33, 2, 3)])
def test_batch_norm_train(shape, dtype, channels_last, activation):
    x, w, b = _args(shape, dtype, channels_last)

    def peer(x, w, b):
        y = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        return F.relu(y) if activation == "relu" else y

    check_op("batch_norm", lambda x, w, b: ops.batch_norm(x, None, None, w, b, True, activation=activation),
             lambda x, w, b: reference.batch_norm(x, None, None, w, b, True, activation=activation),
             [x, w, b], dtype, peer=peer)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
def test_batch_norm_eval(dtype, channels_last):
    x, w, b = _args((3, 8, 4, 5), dtype, channels_last)
    rm, rv = torch.randn(8, device=DEVICE).to(dtype), (torch.rand(8, device=DEVICE) + 0.5).to(dtype)
    check_op("batch_norm", lambda x, w, b: ops.batch_norm(x, rm, rv, w, b, False),
             lambda x, w, b: reference.batch_norm(x, rm, rv, w, b, False), [x, w, b], dtype,
             peer=lambda x, w, b: F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False))


@pytest.mark.parametrize("shape", [(16, 7), (4, 5, 9)])
def test_batch_norm_1d_shapes_no_affine(shape):
    x, _, _ = _args(shape, torch.float32, affine=False)
    check_op("batch_norm", lambda x: ops.batch_norm(x, None, None, training=True),
             lambda x: reference.batch_norm(x, None, None, training=True), [x], torch.float32,
             peer=lambda x: F.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_norm_mixed_precision_params(dtype):
    """Autocast-style: low-precision activations, float32 weight/bias/running stats."""
    x, w, b = _args((4, 6, 3, 3), dtype, True, param_dtype=torch.float32)
    check_op("batch_norm", lambda x, w, b: ops.batch_norm(x, None, None, w, b, True),
             lambda x, w, b: reference.batch_norm(x, None, None, w, b, True), [x, w, b], dtype)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batch_norm_running_stats_match_torch(momentum):
    x, w, b = _args((5, 4, 3, 6), torch.float32)
    ours = (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE))
    theirs = (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE))
    for step in range(3):
        xs = x * (step + 1)
        with expect_backend("batch_norm"):
            ops.batch_norm(xs, *ours, w, b, True, momentum)
        F.batch_norm(xs, *theirs, w, b, True, momentum)
    assert_close(ours[0], theirs[0].double(), torch.float32, "running_mean")
    assert_close(ours[1], theirs[1].double(), torch.float32, "running_var (unbiased)")


def test_batch_norm_gradcheck_float64():
    x = torch.randn(3, 4, 2, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, device=DEVICE, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    with expect_backend("batch_norm"):
        assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm(x, None, None, w, b, True, activation="silu"),
                                        (x, w, b), fast_mode=True)
        rm = torch.randn(4, device=DEVICE, dtype=torch.float64)
        rv = torch.rand(4, device=DEVICE, dtype=torch.float64) + 0.5
        assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm(x, rm, rv, w, b, False), (x, w, b),
                                        fast_mode=True)


def test_fold_conv_bn_matches_conv_then_bn():
    x = torch.randn(2, 3, 7, 7, device=DEVICE, dtype=torch.float64)
    f64 = dict(device=DEVICE, dtype=torch.float64)
    cw, cb = torch.randn(5, 3, 3, 3, **f64), torch.randn(5, **f64)
    rm, rv = torch.randn(5, **f64), torch.rand(5, **f64) + 0.5
    g, beta = torch.randn(5, **f64), torch.randn(5, **f64)
    w2, b2 = ops.fold_conv_bn(cw, cb, rm, rv, g, beta, 1e-5)
    want = F.batch_norm(F.conv2d(x, cw, cb, padding=1), rm, rv, g, beta, False, 0.1, 1e-5)
    torch.testing.assert_close(F.conv2d(x, w2, b2, padding=1), want)


@pytest.mark.parametrize("call, match", [
    (lambda x: ops.batch_norm(x, None, None, training=False), "running_mean and running_var"),
    (lambda x: ops.batch_norm(x[:1, :, :1, :1], None, None, training=True), "more than 1 value"),
    (lambda x: ops.batch_norm(x, None, None, x.new_ones(3), training=True), "weight"),
    (lambda x: ops.batch_norm(x, x.new_zeros(5), x.new_ones(4), training=True), "running_mean"),
    (lambda x: ops.batch_norm(x[0, 0, 0], None, None, training=True), "at least 2 dims"),
    (lambda x: ops.batch_norm(x, None, None, training=True, activation="mish"), "activation"),
])
def test_batch_norm_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 4, 3, 3, device=DEVICE))
