"""The one "compare with reference" helper, used by every op test."""
from __future__ import annotations

import contextlib

import torch

from fastnets import _dispatch
from tolerances import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKEND = "triton" if DEVICE.type == "cuda" else "interpret"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 baseline: torch.Tensor | None = None, tensor_scale: bool = False) -> None:
    """actual (any dtype) against a high-precision expected. NaN/inf must sit where the
    reference has them. Fails with max-abs / relative error and the first bad index.
    tensor_scale: rtol applies to the tensor's largest magnitude instead of each element's
    (sums with cancellation, e.g. gradients through training-mode BatchNorm, where an element
    near zero carries the rounding of its large terms)."""
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
    tol = TOLERANCES[dtype]
    err = (a - e).abs()
    bad = err > tol.atol + tol.rtol * (e.abs().max() if tensor_scale else e.abs())
    if not bad.any():
        return
    max_err = err.max().item()
    if baseline is not None:
        b = baseline.detach().double().cpu()[finite]
        torch_err = (b - e).abs().max().item()
        if max_err <= 2 * torch_err + tol.atol:
            return
        extra = f"; torch eager in {dtype} errs {torch_err:.3g} (allowed 2x + atol)"
    else:
        extra = ""
    i = int(torch.nonzero(bad)[0])
    rel = (err / e.abs().clamp_min(1e-12)).max().item()
    raise AssertionError(f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; max abs err {max_err:.3g}, "
                         f"max rel err {rel:.3g}, tol atol={tol.atol} rtol={tol.rtol}; first bad (flat, finite) "
                         f"index {i}: got {a[i].item():.6g}, expected {e[i].item():.6g}{extra}")


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
             grad_args: tuple | None = None, backend: str = KERNEL_BACKEND) -> None:
    """Run fn(*args) (our kernels), ref(*args in float64) and peer(*args) (torch eager in the
    same dtype, optional); compare the forward, then every floating input's gradient under
    one shared random upstream gradient.

    args: tensors at `dtype` (or mixed, e.g. float32 weights) and plain values.
    grad_args: indices of args to differentiate (default: every floating tensor).
    backend: the backend the op must dispatch to (the Triton kernels by default).
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
    assert ours.dtype == args[0].dtype, f"{op_name}: output dtype {ours.dtype}, input {args[0].dtype}"
    assert_close(ours, expected, dtype, f"{op_name} forward", baseline)
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
    for i, got, want, base in zip(grad_args, outs, refs, peers):
        assert got.dtype == args[i].dtype, f"{op_name}: grad of arg {i} has dtype {got.dtype}, arg has {args[i].dtype}"
        assert_close(got, want, dtype, f"{op_name} grad of arg {i}", base)
