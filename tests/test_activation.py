"""bias_act: every activation, gated variants, with and without bias, against the float64
reference and torch eager; gradcheck; bad input; NaN/inf; the CUDA extension on GPUs."""
import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import ops, reference
from fastnets.ops.activation import ACTIVATIONS, GATED
from helpers import DEVICE, assert_close, check_op, expect_backend, noncontiguous
from tolerances import POINTWISE_DTYPES

TORCH_ACT = {
    "identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "swiglu": lambda z: F.silu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1],
    "geglu": lambda z: F.gelu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1],
    "geglu_tanh": lambda z: F.gelu(z.chunk(2, -1)[0], approximate="tanh") * z.chunk(2, -1)[1],
}


def _peer(activation):
    def peer(x, b=None):
        return TORCH_ACT[activation](x + b if b is not None else x)
    return peer


@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS + GATED)
@pytest.mark.parametrize("shape", [(7, 34), (3, 5, 66)])
def test_bias_act(activation, dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    b = torch.randn(shape[-1], device=DEVICE).to(dtype)
    check_op("bias_act", lambda x, b: ops.bias_act(x, b, activation, negative_slope=0.2),
             lambda x, b: reference.bias_act(x, b, activation, negative_slope=0.2), [x, b], dtype, peer=_peer(activation))


@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
@pytest.mark.parametrize("activation,gain,clamp", [("leaky_relu", 2 ** 0.5, 1.5), ("relu", 2 ** 0.5, None),
                                                    ("identity", 1.0, 0.8), ("silu", 1.7, 2.0), ("swiglu", 0.5, 0.3)])
def test_bias_act_gain_clamp_stylegan2(activation, gain, clamp, dtype):
    """StyleGAN2's bias_act: act(x + b) * gain, clamped to +-clamp; the gradient is zero where
    the clamp bit (torch.clamp's)."""
    x = (torch.randn(7, 34, device=DEVICE) * 3).to(dtype)
    b = torch.randn(34, device=DEVICE).to(dtype)

    def peer(x, b):
        y = TORCH_ACT[activation](x + b) * gain
        return y.clamp(-clamp, clamp) if clamp is not None else y
    check_op("bias_act", lambda x, b: ops.bias_act(x, b, activation, negative_slope=0.2, gain=gain, clamp=clamp),
             lambda x, b: reference.bias_act(x, b, activation, negative_slope=0.2, gain=gain, clamp=clamp), [x, b],
             dtype, peer=peer)


def test_bias_act_clamp_gradient_is_zero_where_clamped():
    x = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 3.0]], device=DEVICE, requires_grad=True)
    with expect_backend("bias_act"):
        y = ops.bias_act(x, None, "identity", gain=2.0, clamp=1.0)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0]], device=DEVICE))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 2.0, 2.0, 2.0, 0.0]], device=DEVICE))


def test_bias_act_bad_clamp_raises():
    with pytest.raises(ValueError, match="clamp"):
        ops.bias_act(torch.randn(2, 3, device=DEVICE), None, "relu", clamp=-1.0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bias_act_no_bias_noncontiguous(activation):
    x = noncontiguous(torch.randn(9, 20, device=DEVICE))
    check_op("bias_act", lambda x: ops.bias_act(x, None, activation), lambda x: reference.bias_act(x, None, activation),
             [x], torch.float32, peer=_peer(activation))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_act_mixed_precision_bias(dtype):
    x = torch.randn(6, 40, device=DEVICE).to(dtype)
    b = torch.randn(40, device=DEVICE)  # float32 bias, as an autocast Linear's would be
    check_op("bias_act", lambda x, b: ops.bias_act(x, b, "silu"), lambda x, b: reference.bias_act(x, b, "silu"),
             [x, b], dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS + GATED)
def test_bias_act_gradcheck_float64(activation):
    """Input and bias gradients (the bias one from the kernel's fused reduction). |x| >= 0.3
    and |bias| <= 0.1 keep x + bias off relu's kink at 0, where the derivative jumps."""
    r = torch.randn(3, 6, device=DEVICE, dtype=torch.float64)
    x = (torch.sign(r) * (0.3 + r.abs())).requires_grad_()
    b = (0.05 * torch.randn(6, device=DEVICE, dtype=torch.float64).clamp(-2, 2)).requires_grad_()
    with expect_backend("bias_act"):
        assert torch.autograd.gradcheck(lambda x, b: ops.bias_act(x, b, activation), (x, b))


def test_bias_act_nan_inf_like_torch():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 2.0, -2.0]], device=DEVICE)
    # torch in float64: its float32 SIMD gelu gives NaN for +inf, where the answer is inf.
    for activation in ACTIVATIONS:
        ours, theirs = ops.bias_act(x, None, activation, negative_slope=0.2), TORCH_ACT[activation](x.double())
        assert_close(ours, theirs.double(), torch.float32, f"bias_act {activation} on nan/inf")


def test_bias_act_empty():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    y = ops.bias_act(x, torch.zeros(8, device=DEVICE), "swiglu")
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 8)


BAD = [
    (lambda: ops.bias_act(torch.ones(2, 3), None, "softplus"), ValueError, "activation must be one of"),
    (lambda: ops.bias_act(torch.ones(2, 3), None, "swiglu"), ValueError, "even last dim"),
    (lambda: ops.bias_act(torch.ones(2, 3), torch.ones(4)), ValueError, "bias must have shape"),
    (lambda: ops.bias_act(torch.ones(2, 3, dtype=torch.int32)), TypeError, "input must be float16"),
    (lambda: ops.bias_act(torch.ones(2, 3), torch.ones(3, device="meta")), ValueError, "bias is on meta"),
    (lambda: ops.bias_act(torch.tensor(1.0)), ValueError, "at least 1 dims"),
    (lambda: ops.bias_act(torch.ones(2, 3), None, "leaky_relu", negative_slope=None), TypeError, "negative_slope"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bias_act_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_bias_act_cuda_extension(activation, dtype):
    """fastnets._C's kernels (JIT-built on first use) against the reference."""
    from fastnets import _ext
    ok, why = _ext.status()
    if not ok:
        pytest.skip(f"fastnets._C unavailable here: {why}")
    x = (torch.randn(33, 258, device="cuda") * 2).to(dtype)
    b = torch.randn(258, device="cuda").to(dtype)
    with fastnets.backend("cuda"):
        check_op("bias_act", lambda x, b: ops.bias_act(x, b, activation),
                 lambda x, b: reference.bias_act(x, b, activation), [x, b], dtype, peer=_peer(activation),
                 backend="cuda")


_MODULES = [("ReLU", (), "relu"), ("LeakyReLU", (0.2,), "leaky_relu"), ("GELU", (), "gelu"),
            ("GELU", ("tanh",), "gelu_tanh"), ("SiLU", (), "silu"), ("Tanh", (), "tanh"), ("Sigmoid", (), "sigmoid")]


@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
@pytest.mark.parametrize("cls, ctor, activation", _MODULES)
def test_activation_modules(cls, ctor, activation, dtype):
    """fastnets.nn's activation modules (what swap() puts in for torch's): bias_act with no bias,
    against the float64 reference and torch's own module, on an odd non-contiguous input."""
    fast, torch_module = getattr(fastnets.nn, cls)(*ctor), getattr(torch.nn, cls)(*ctor)
    assert isinstance(fast, getattr(torch.nn, cls)) and fast.extra_repr() == torch_module.extra_repr()
    x = noncontiguous(torch.randn(3, 5, 7, device=DEVICE, dtype=dtype))
    check_op("bias_act", lambda t: fast(t), lambda t: reference.activation.bias_act(t, None, activation,
                                                                                     negative_slope=0.2),
             [x], dtype, peer=lambda t: torch_module(t))


def test_activation_modules_keep_torch_semantics_for_integers_and_inplace():
    x = torch.tensor([-2, 0, 3], device=DEVICE)
    assert torch.equal(fastnets.nn.ReLU()(x), x.relu())   # integer tensors: torch's module
    y = torch.randn(4, 6, device=DEVICE)
    before = y.clone()
    with expect_backend("bias_act"):
        out = fastnets.nn.ReLU(inplace=True)(y)
    assert torch.equal(out, before.relu()) and torch.equal(y, before)   # out of place (documented)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_bias_act_keeps_a_dense_layout(activation):
    """No bias: a channels_last (or any dense permuted) input is run in its storage order, so
    the output keeps its layout and nothing is copied; values and gradients as torch."""
    x = torch.randn(2, 5, 3, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = ops.bias_act(x, None, activation)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()
    check_op("bias_act", lambda t: ops.bias_act(t, None, activation),
             lambda t: reference.activation.bias_act(t, None, activation), [x], torch.float32,
             peer=TORCH_ACT[activation])
    z = torch.randn(4, 6, 5, device=DEVICE).transpose(0, 2)   # dense, permuted
    assert ops.bias_act(z, None, activation).stride() == z.stride()


@pytest.mark.parametrize("bias", [False, True])
def test_relu_saves_its_output_not_its_input(bias):
    """relu (as torch's) keeps its output for the backward, so the input it was given can be
    freed: an out-of-place fastnets ReLU after a BN holds no more than ReLU(inplace=True)."""
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True) if bias else None
    z = x * 2   # the tensor relu gets: a BN output in a model
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with expect_backend("bias_act"):
            y = ops.bias_act(z, b, "relu")
    ptrs = {t.data_ptr() for t in saved if t.numel() > 6}
    assert y.data_ptr() in ptrs and z.data_ptr() not in ptrs
    g = torch.randn_like(y)
    y.backward(g)
    zz = (x.detach() * 2).requires_grad_()
    bb = b.detach().clone().requires_grad_() if bias else None
    want = F.relu(zz + bb if bias else zz)
    want.backward(g)
    assert_close(x.grad / 2, zz.grad.double(), torch.float32, "relu dx")
    if bias:
        assert_close(b.grad, bb.grad.double(), torch.float32, "relu dbias")
