"""The one "compare with reference" helper, used by every op test."""
from __future__ import annotations

import contextlib

import torch

from fastnets import _dispatch
from tolerances import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKEND = "triton" if DEVICE.type == "cuda" else "interpret"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 baseline: torch.Tensor | None = None, tensor_scale: bool = False, min_scale: float = 1e-3,
                 tol=None) -> None:
    """actual (any dtype) against a high-precision expected. NaN/inf must sit where the
    reference has them. Fails with max-abs / relative error and the first bad index.

    Per element, the allowed error is the dtype's floor, rtol * |expected| + atol * scale,
    where scale is the tensor's largest magnitude: the absolute part follows the output's
    size, so small outputs and gradients are checked as strictly as large ones. With a
    baseline (torch eager in the tested dtype, same inputs), the Tol's baseline rule applies:
    for float16 and bfloat16 an element may also be off by up to 2x torch's own error on that
    element (the flash-attention rule: torch is the bar users hold us to); MODEL_TRAIN_FLOAT32
    allows 3x torch's largest error on the tensor. float32 and float64 ops use the table alone.
    Where torch itself gives NaN/inf against a finite reference, that element loosens nothing.
    tol: a Tol from the table other than the dtype's (MODEL_TRAIN_FLOAT32).
    min_scale: the smallest scale (an output that is zero in exact arithmetic, such as a
    gradient through a constant, carries rounding residue of its intermediate terms).
    tensor_scale: rtol too applies to the tensor's largest magnitude (sums with cancellation,
    e.g. gradients through training-mode BatchNorm, where an element near zero carries the
    rounding of its large terms)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if not torch.equal(a_nan, e_nan):
        idx = torch.nonzero(a_nan != e_nan)[0].tolist()
        raise AssertionError(f"{what}: NaN mismatch at {idx}: got {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}"
                             f" ({int(a_nan.sum())} NaN in result, {int(e_nan.sum())} in reference)")
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    if not torch.equal(a_inf, e_inf) or not torch.equal(a[a_inf], e[e_inf]):
        idx = torch.nonzero((a_inf != e_inf) | (a_inf & (a != e)))[0].tolist()
        raise AssertionError(f"{what}: inf mismatch at {idx}: got {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}")
    finite = ~(e_nan | e_inf)
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    tol = tol or TOLERANCES[dtype]
    err = (a - e).abs()
    scale = max(e.abs().max().item(), min_scale)
    allowed = tol.atol * scale + tol.rtol * (scale if tensor_scale else e.abs())
    extra = ""
    if baseline is not None and tol.baseline:
        assert baseline.shape == expected.shape, f"{what}: baseline shape {tuple(baseline.shape)} != {tuple(expected.shape)}"
        torch_err = (baseline.detach().double().cpu()[finite] - e).abs()
        torch_err = torch.nan_to_num(torch_err, nan=0.0, posinf=0.0)
        yardstick = torch_err.max() if tol.baseline_tensorwide else torch_err
        allowed = torch.maximum(torch.as_tensor(allowed, dtype=torch.float64), tol.baseline * yardstick)
        extra = (f"; torch eager in {baseline.dtype} errs {torch_err.max().item():.3g} at most (allowed "
                 f"{tol.baseline:g}x {'that' if tol.baseline_tensorwide else 'its error per element'})")
    allowed = torch.as_tensor(allowed, dtype=torch.float64).expand_as(err)
    bad = err > allowed
    if not bad.any():
        return
    i = int(torch.nonzero(bad)[0])
    rel = (err / e.abs().clamp_min(1e-12)).max().item()
    raise AssertionError(f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; max abs err "
                         f"{err.max().item():.3g}, max rel err {rel:.3g}, tol atol={tol.atol} (x scale {scale:.3g}) "
                         f"rtol={tol.rtol}; first bad (flat, finite) index {i}: got {a[i].item():.6g}, expected "
                         f"{e[i].item():.6g}, allowed {allowed[i].item():.3g}{extra}")


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view whose last dim has stride 2."""
    big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


@contextlib.contextmanager
def expect_backend(op: str, backend: str = KERNEL_BACKEND):
    """Fails unless `op` dispatched to `backend` inside the block: a test that silently ran
    only the torch reference is a defect."""
    before = _dispatch.calls[(op, backend)]
    yield
    assert _dispatch.calls[(op, backend)] > before, f"{op} did not run on the {backend} backend"


def check_op(op_name: str, fn, ref, args: list, dtype: torch.dtype, *, peer=None, grad: bool = True,
             grad_args: tuple | None = None, backend: str = KERNEL_BACKEND, min_scale: float = 1e-3) -> None:
    """Run fn(*args) (our kernels), ref(*args in float64) and peer (torch itself, optional:
    in float64 as a second truth, and in the same dtype as the 2x baseline for fp16/bf16);
    compare the forward, then every floating input's gradient under one shared random
    upstream gradient.

    args: tensors at `dtype` (or mixed, e.g. float32 weights) and plain values.
    grad_args: indices of args to differentiate (default: every floating tensor).
    backend: the backend the op must dispatch to (the Triton kernels by default).
    min_scale: passed to assert_close for the gradients (see there).
    """
    if grad_args is None:
        grad_args = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())

    def prepare(cast):
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                a = cast(a.detach()).requires_grad_(grad and i in grad_args)
            out.append(a)
        return out

    ours_in = prepare(lambda t: t.clone() if t.is_contiguous() else t)
    with expect_backend(op_name, backend):
        ours = fn(*ours_in)
    ref_in = prepare(lambda t: t.double())
    expected = ref(*ref_in)
    peer_in = prepare(lambda t: t.clone()) if peer is not None else None
    baseline = peer(*peer_in) if peer is not None else None
    # torch itself in float64: fastnets.reference is our own code, so ours is also held to torch.
    truth_in = prepare(lambda t: t.double()) if peer is not None else None
    truth = peer(*truth_in) if peer is not None else None
    assert ours.dtype == args[0].dtype, f"{op_name}: output dtype {ours.dtype}, input {args[0].dtype}"
    assert_close(ours, expected, dtype, f"{op_name} forward", baseline)
    if truth is not None:
        assert_close(ours, truth, dtype, f"{op_name} forward against torch (float64)", baseline)
    if not grad:
        return
    # One upstream gradient, rounded to the output dtype first, so ours, the reference and
    # torch all differentiate against exactly the same values.
    g = torch.randn_like(expected).to(ours.dtype).double()
    # The forward ran on the kernel backend, so these grads come from the custom op's
    # registered backward, i.e. the backward kernels, not from autograd through torch.
    outs = torch.autograd.grad(ours, [ours_in[i] for i in grad_args], g.to(ours.dtype))
    refs = torch.autograd.grad(expected, [ref_in[i] for i in grad_args], g)
    peers = (torch.autograd.grad(baseline, [peer_in[i] for i in grad_args], g.to(baseline.dtype))
             if peer is not None else [None] * len(grad_args))
    truths = (torch.autograd.grad(truth, [truth_in[i] for i in grad_args], g)
              if peer is not None else [None] * len(grad_args))
    for i, got, want, base, true in zip(grad_args, outs, refs, peers, truths):
        assert got.dtype == args[i].dtype, f"{op_name}: grad of arg {i} has dtype {got.dtype}, arg has {args[i].dtype}"
        assert_close(got, want, dtype, f"{op_name} grad of arg {i}", base, min_scale=min_scale)
        if true is not None:
            assert_close(got, true, dtype, f"{op_name} grad of arg {i} against torch (float64)", base,
                         min_scale=min_scale)
