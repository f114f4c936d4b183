"""cross_entropy and linear_cross_entropy against the float64 reference and F.cross_entropy:
ignore_index, label_smoothing, class weights, z-loss, every reduction, (N, C, d...) inputs,
chunking, float32 accumulation, errors."""
import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import ops, reference
from helpers import DEVICE, assert_close, check_op, expect_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPTIONS = [dict(), dict(ignore_index=3), dict(label_smoothing=0.1), dict(weighted=True, label_smoothing=0.2),
           dict(z_loss=1e-3, ignore_index=-100)]


def _target(n, V, ignore=None, ignored_rows=3):
    t = torch.randint(0, V, (n,), device=DEVICE)
    if ignore is not None:
        t[:ignored_rows] = ignore
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_cross_entropy(opts, dtype, reduction):
    N, V = 37, 1000
    opts = dict(opts)
    weight = torch.rand(V, device=DEVICE) + 0.5 if opts.pop("weighted", False) else None
    x = (torch.randn(N, V, device=DEVICE) * 3).to(dtype)
    t = _target(N, V, opts.get("ignore_index"))
    kw = dict(opts, reduction=reduction)
    z = kw.get("z_loss", 0.0)
    peer = None if z else (lambda x: F.cross_entropy(x, t, weight=None if weight is None else weight.to(x.dtype), **kw))
    check_op("cross_entropy", lambda x: ops.cross_entropy(x, t, weight, **kw),
             lambda x: reference.cross_entropy(x, t, weight, **kw), [x], dtype, peer=peer)


def test_cross_entropy_shapes_and_vocab_chunks():
    """(N, C, d) input, (C,) input, and a vocabulary wider than one kernel chunk."""
    x = torch.randn(3, 7, 5, device=DEVICE)
    t = torch.randint(0, 7, (3, 5), device=DEVICE)
    check_op("cross_entropy", lambda x: ops.cross_entropy(x, t, reduction="none"),
             lambda x: reference.cross_entropy(x, t, reduction="none"), [x], torch.float32,
             peer=lambda x: F.cross_entropy(x, t, reduction="none"))
    x1 = torch.randn(11, device=DEVICE)
    t1 = torch.tensor(4, device=DEVICE)
    assert_close(ops.cross_entropy(x1, t1), F.cross_entropy(x1.double(), t1), torch.float32, "(C,) input")
    big = torch.randn(4, 70000, device=DEVICE)
    tb = torch.randint(0, 70000, (4,), device=DEVICE)
    check_op("cross_entropy", lambda x: ops.cross_entropy(x, tb, label_smoothing=0.1),
             lambda x: reference.cross_entropy(x, tb, label_smoothing=0.1), [big], torch.float32)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    x = torch.randn(4, 9, device=DEVICE)
    t = torch.full((4,), -100, device=DEVICE)
    assert torch.isnan(ops.cross_entropy(x, t)) and torch.isnan(F.cross_entropy(x, t))
    assert ops.cross_entropy(x, t, reduction="sum") == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_soft_targets_fall_back_with_every_option(reduction):
    """Probability targets run the torch reference: warned, counted as a fallback, and
    z_loss, label_smoothing, class weights and out_dtype still apply."""
    from fastnets import _dispatch
    x = torch.randn(4, 9, device=DEVICE, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 9, device=DEVICE, dtype=torch.float64), -1)
    w = torch.rand(9, device=DEVICE, dtype=torch.float64) + 0.5
    before = _dispatch.calls[("cross_entropy", "torch")]
    with pytest.warns(UserWarning, match="probability"):
        out = ops.cross_entropy(x, p, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                                out_dtype=torch.float32)
    assert _dispatch.calls[("cross_entropy", "torch")] == before + 1
    assert out.dtype == torch.float32
    z = 1e-2 * torch.logsumexp(x, -1) ** 2
    rows = F.cross_entropy(x, p, w, reduction="none", label_smoothing=0.1) + z
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 4}[reduction]
    torch.testing.assert_close(out, want.float())
    # and without the extras, exactly torch's
    torch.testing.assert_close(ops.cross_entropy(x, p, w, reduction=reduction), F.cross_entropy(x, p, w, reduction=reduction))
    with pytest.raises(ValueError, match="probability targets must have input's shape"):
        ops.cross_entropy(x, p[:, :5])


# --- fused linear + cross-entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy(dtype, reduction):
    N, H, V = 45, 32, 300
    x = torch.randn(N, H, device=DEVICE).to(dtype)
    w = (torch.randn(V, H, device=DEVICE) / H ** 0.5).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype)
    t = _target(N, V, -100)
    kw = dict(reduction=reduction, label_smoothing=0.05)
    check_op("linear_cross_entropy", lambda x, w, b: ops.linear_cross_entropy(x, w, t, b, chunk_size=16, **kw),
             lambda x, w, b: reference.linear_cross_entropy(x, w, t, b, **kw), [x, w, b], dtype,
             peer=lambda x, w, b: F.cross_entropy(F.linear(x, w, b).float(), t, **kw).to(dtype))


def test_linear_cross_entropy_options_and_shapes():
    """3-D hidden states, no bias, class weights, z-loss, the default chunking, no grad for w."""
    B, S, H, V = 2, 9, 16, 77
    x = torch.randn(B, S, H, device=DEVICE, requires_grad=True)
    w = torch.randn(V, H, device=DEVICE)
    cw = torch.rand(V, device=DEVICE) + 0.5
    t = torch.randint(0, V, (B, S), device=DEVICE)
    with expect_backend("linear_cross_entropy"):
        out = ops.linear_cross_entropy(x, w, t, class_weight=cw, z_loss=1e-2, label_smoothing=0.1)
    xr = x.detach().double().requires_grad_(True)
    want = reference.linear_cross_entropy(xr, w.double(), t, class_weight=cw, z_loss=1e-2, label_smoothing=0.1)
    assert_close(out, want, torch.float32, "forward")
    (gx,) = torch.autograd.grad(out, x)
    (gr,) = torch.autograd.grad(want, xr)
    assert_close(gx, gr, torch.float32, "dx")


def test_linear_cross_entropy_accumulates_dw_in_float32():
    """Many chunks of bf16: dW is summed across chunks in float32, so its error stays at one
    bf16 rounding of the result, not one per chunk."""
    N, H, V = 512, 16, 64
    x = torch.randn(N, H, device=DEVICE).bfloat16()
    w = (torch.randn(V, H, device=DEVICE) / 4).bfloat16().requires_grad_(True)
    t = torch.randint(0, V, (N,), device=DEVICE)
    out = ops.linear_cross_entropy(x, w, t, reduction="sum", chunk_size=16)
    (dw,) = torch.autograd.grad(out, w)
    wr = w.detach().double().requires_grad_(True)
    (dw_ref,) = torch.autograd.grad(reference.linear_cross_entropy(x.double(), wr, t, reduction="sum"), wr)
    rel = ((dw.double() - dw_ref).norm() / dw_ref.norm()).item()
    assert rel < 1e-2, rel


def test_out_of_range_target_gives_nan_in_the_kernel():
    """What a GPU caller gets without the host check: NaN for that row, never an
    out-of-bounds read; ignored rows stay 0."""
    x = torch.randn(3, 6, device=DEVICE, requires_grad=True)
    t = torch.tensor([1, 9, -100], device=DEVICE)
    rows, _ = torch.ops.fastnets.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and rows[2] == 0
    (g,) = torch.autograd.grad(rows.sum(), x)
    assert torch.isfinite(g[0]).all() and torch.isnan(g[1]).all() and (g[2] == 0).all()


def test_loss_backends_and_errors():
    x = torch.randn(5, 6, device=DEVICE)
    t = torch.randint(0, 6, (5,), device=DEVICE)
    with fastnets.backend("torch"), expect_backend("cross_entropy", "torch"):
        torch.testing.assert_close(ops.cross_entropy(x, t), F.cross_entropy(x, t))
    bad = torch.tensor([0, 1, 2, 3, 6], device=DEVICE)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="outside"):
            ops.cross_entropy(x, bad)
    else:   # no host sync per step on CUDA: the kernel makes that row's loss NaN instead
        assert torch.isnan(ops.cross_entropy(x, bad))
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(x, t[:4])
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.cross_entropy(x, t, torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match="integer class indices"):
        ops.cross_entropy(x, t.to(torch.bool))
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(x, torch.randn(6, 4, device=DEVICE), t)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_cross_entropy(x, torch.randn(7, 6, device=DEVICE), t, chunk_size=0)


# --- full float64 gradcheck (not fast mode) -------------------------------------------------------------
# The kernels compute in float64 for float64 logits: gradcheck's default tolerances.
GRADCHECK_FULL = dict(fast_mode=False)

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_gradcheck_float64_full(reduction):
    x = torch.randn(5, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 3], device=DEVICE)
    w = torch.rand(7, device=DEVICE, dtype=torch.float64) + 0.5
    with expect_backend("cross_entropy"):
        assert torch.autograd.gradcheck(
            lambda x: ops.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2), (x,),
            **GRADCHECK_FULL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_gradcheck_float64_full(reduction):
    """input, weight and bias, over several token chunks (dW / dbias summed across them)."""
    x = torch.randn(6, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(11, 8, device=DEVICE, dtype=torch.float64) / 3).requires_grad_(True)
    b = torch.randn(11, device=DEVICE, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 10, -100, 0, 5, 5], device=DEVICE)
    with expect_backend("linear_cross_entropy"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: ops.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=0.05,
                                                     z_loss=1e-3, chunk_size=4), (x, w, b), **GRADCHECK_FULL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_minus_inf_logits_like_torch(smoothing):
    """Masked vocabulary entries (-inf logits, as in constrained decoding): a -inf non-target
    logit leaves the loss finite, a -inf target gives inf, an all -inf row NaN, exactly where
    torch has them; with the first vocabulary block all -inf and later ones finite too."""
    V = 65536 + 7 if DEVICE.type == "cpu" else 8192 + 7   # past the launcher's first block
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    t = torch.tensor([1, 1, 3, V - 2, 0], device=DEVICE)
    x[0, 2] = float("-inf")          # some -inf, target finite
    x[1, 1] = float("-inf")          # the target's logit is -inf
    x[2] = float("-inf")             # every logit -inf
    x[3, :V - 5] = float("-inf")     # a whole block -inf, then finite ones
    x[4, 5:] = float("-inf")
    for row in range(5):
        xr, xt = x[row:row + 1].clone().requires_grad_(), x[row:row + 1].double().requires_grad_()
        with expect_backend("cross_entropy"):
            got = ops.cross_entropy(xr, t[row:row + 1], label_smoothing=smoothing)
        want = F.cross_entropy(xt, t[row:row + 1], label_smoothing=smoothing)
        assert_close(got, want, torch.float32, f"row {row} loss")
        got.backward()
        want.backward()
        assert_close(xr.grad, xt.grad, torch.float32, f"row {row} grad")


def test_linear_cross_entropy_under_autocast_returns_float32_like_torch():
    """Issue 24: torch's unfused head under autocast runs the linear in bf16 and the loss
    (autocast's float32 list) in float32; the fused op returned bf16."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(11, 8, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 11, (6,), generator=g).to(DEVICE)
    for reduction in ("mean", "none"):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            with expect_backend("linear_cross_entropy"):
                got = ops.linear_cross_entropy(h, w, t, reduction=reduction)
            want = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
        assert got.dtype == want.dtype == torch.float32
        assert_close(got, want.double(), torch.bfloat16, f"autocast loss {reduction}")
    got.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
