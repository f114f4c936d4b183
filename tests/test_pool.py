"""max_pool2d, avg_pool2d, adaptive_avg_pool2d, adaptive_max_pool2d: every option against
the float64 reference and torch eager, forward and backward, both layouts, indices equal
to torch's, NaN propagation, bad input."""
import pytest
import torch
import torch.nn.functional as F

from fastnets import ops, reference
from helpers import DEVICE, check_op, expect_backend
from tolerances import POINTWISE_DTYPES

# (op name, positional args after the input)
CASES = [
    ("max_pool2d", (3, 2, 1)),                       # ResNet stem pool
    ("max_pool2d", (2,)),
    ("max_pool2d", ((3, 2), (2, 1), (1, 0), (2, 1), True)),   # dilation + ceil_mode
    ("max_pool2d", (3, 3, 0, 1, True)),
    ("avg_pool2d", (3, 2, 1)),
    ("avg_pool2d", (3, 2, 1, True, False)),          # ceil_mode, count_include_pad=False
    ("avg_pool2d", ((2, 3), 1, (1, 1), False, True, 4)),       # divisor_override
    ("adaptive_avg_pool2d", (1,)),                   # global average pooling
    ("adaptive_avg_pool2d", ((3, 5),)),
    ("adaptive_avg_pool2d", ((4, None),)),
    ("adaptive_max_pool2d", (1,)),
    ("adaptive_max_pool2d", ((4, 13),)),             # output wider than input
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", POINTWISE_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_pool(case, dtype, channels_last):
    name, args = case
    x = torch.randn(2, 5, 9, 11, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_op(name, lambda x: getattr(ops, name)(x, *args), lambda x: getattr(reference, name)(x, *args), [x], dtype,
             peer=lambda x: getattr(F, name)(x, *args))
    y = getattr(ops, name)(x, *args)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("name, args", [("max_pool2d", (3, 2, 1, 1, True)), ("adaptive_max_pool2d", ((4, 3),))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_indices_match_torch(name, args, channels_last):
    x = torch.randn(2, 3, 10, 7, device=DEVICE)
    x[0, 0, :3, :3] = 1.0  # ties: the first maximum wins, as in torch
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with expect_backend(name):
        y, idx = getattr(ops, name)(x, *args, return_indices=True)
    y_ref, idx_ref = getattr(F, name)(x, *args, return_indices=True)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(idx, idx_ref) and idx.dtype == torch.int64


def test_max_pool_propagates_nan_and_handles_all_inf_windows():
    x = torch.randn(1, 2, 6, 6, device=DEVICE)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, :2, :2] = float("-inf")
    with expect_backend("max_pool2d"):
        y = ops.max_pool2d(x, 2)
    torch.testing.assert_close(y, F.max_pool2d(x, 2), equal_nan=True)


def test_pool_unbatched_and_overlapping_backward():
    """Overlapping windows (stride < kernel): several outputs route gradient to one input."""
    x = torch.randn(3, 8, 8, device=DEVICE)
    for name, args in (("max_pool2d", (3, 1, 1)), ("avg_pool2d", (3, 1, 1))):
        check_op(name, lambda x: getattr(ops, name)(x, *args), lambda x: getattr(reference, name)(x, *args), [x],
                 torch.float32, peer=lambda x: getattr(F, name)(x, *args))


def test_pool_gradcheck_float64():
    x = torch.randn(1, 2, 5, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    with expect_backend("avg_pool2d"):
        assert torch.autograd.gradcheck(lambda x: ops.avg_pool2d(x, 3, 2, 1, True, False), (x,), fast_mode=True)
    with expect_backend("adaptive_avg_pool2d"):
        assert torch.autograd.gradcheck(lambda x: ops.adaptive_avg_pool2d(x, (3, 4)), (x,), fast_mode=True)
    with expect_backend("max_pool2d"):
        assert torch.autograd.gradcheck(lambda x: ops.max_pool2d(x, 2, 1), (x,), fast_mode=True)


@pytest.mark.parametrize("call, match", [
    (lambda x: ops.max_pool2d(x, 3, padding=2), "at most half"),
    (lambda x: ops.avg_pool2d(x, 2, padding=2), "at most half"),
    (lambda x: ops.max_pool2d(x, 9), "output height"),
    (lambda x: ops.max_pool2d(x[0, 0], 2), "4-D"),
    (lambda x: ops.max_pool2d(x, 0), "kernel_size"),
    (lambda x: ops.max_pool2d(x, (2, 2, 2)), "kernel_size"),
    (lambda x: ops.avg_pool2d(x, 2, divisor_override=0), "divisor_override"),
    (lambda x: ops.adaptive_avg_pool2d(x, -1), "output_size"),   # (0 is an empty output, as torch)
    (lambda x: ops.adaptive_max_pool2d(x, "big"), "output_size"),
    (lambda x: ops.max_pool2d(x.long(), 2), "float"),
])
def test_pool_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 6, 6, device=DEVICE))


# --- property test: random legal geometry, layouts and options --------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), is_max=st.booleans(), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_pool_property(data, is_max, channels_last, dtype):
    k = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    s = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    p = (data.draw(st.integers(0, k[0] // 2)), data.draw(st.integers(0, k[1] // 2)))
    d = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))) if is_max else (1, 1)
    ceil = data.draw(st.booleans())
    h = data.draw(st.integers(d[0] * (k[0] - 1) + 1, 12))
    w = data.draw(st.integers(d[1] * (k[1] - 1) + 1, 12))
    x = torch.randn(data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), h, w, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if is_max:
        args = (k, s, p, d, ceil)
        name = "max_pool2d"
    else:
        args = (k, s, p, ceil, data.draw(st.booleans()))
        name = "avg_pool2d"
    check_op(name, lambda x: getattr(ops, name)(x, *args), lambda x: getattr(reference, name)(x, *args), [x], dtype,
             peer=lambda x: getattr(F, name)(x, *args))
