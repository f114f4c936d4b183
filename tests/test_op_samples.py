"""Every op of the sample-input registry (tests/op_samples.py) over every sample: the result,
its dtype and shape, NaN / inf positions and every gradient equal torch's (float64 torch as
the truth, torch in float32 as the yardstick, the one tolerance table); the kernel ran, or
for an empty input nothing launched; every error sample raises torch's kind of error naming
the argument."""
from __future__ import annotations

import pytest
import torch

from fastnets import _dispatch
from helpers import DEVICE, KERNEL_BACKEND, assert_close
from op_samples import OPS

SAMPLES = [(info, s) for info in OPS for s in info.samples(DEVICE)]
ERRORS = [(info, e) for info in OPS for e in info.errors(DEVICE)]


def _prepare(sample, cast):
    out = []
    for i, a in enumerate(sample.args):
        if isinstance(a, torch.Tensor):
            a = cast(a)
            if i in sample.grad and a.is_floating_point():
                a = a.detach().requires_grad_()
        out.append(a)
    return out


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _is_empty(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args)


def _keep_layout(t: torch.Tensor, cast):
    """cast(t) with t's strides (a view with the same layout), so the yardstick sees the same
    non-contiguous / channels_last / expanded input."""
    if t.is_contiguous():
        return cast(t).clone()
    return torch.empty_strided(t.shape, t.stride(), dtype=cast(t[:0]).dtype, device=t.device).copy_(cast(t)) \
        if t.stride().count(0) == 0 else cast(t)


@pytest.mark.parametrize("info,sample", SAMPLES, ids=[f"{i.name}-{s.name}" for i, s in SAMPLES])
def test_sample_matches_torch(info, sample):
    ours = _prepare(sample, lambda t: _keep_layout(t, lambda u: u))
    truth = _prepare(sample, lambda t: t.double() if t.is_floating_point() else t)
    peer = _prepare(sample, lambda t: t.clone())
    empty = _is_empty(sample.args) if sample.empty is None else sample.empty
    backend = "torch" if empty else KERNEL_BACKEND
    before = _dispatch.calls[(info.dispatch, backend)]
    got = _as_tuple(info.fn(*ours, **sample.kwargs))
    assert _dispatch.calls[(info.dispatch, backend)] > before, f"{info.dispatch} did not run on {backend}"
    want = _as_tuple(info.torch_fn(*truth, **sample.kwargs))
    base = _as_tuple(info.torch_fn(*peer, **sample.kwargs))
    assert len(got) == len(want)
    tensors = [(g, w, b) for g, w, b in zip(got, want, base) if isinstance(g, torch.Tensor)]
    for k, (g, w, b) in enumerate(tensors):
        assert g.shape == b.shape, f"output {k}: shape {tuple(g.shape)}, torch {tuple(b.shape)}"
        assert g.dtype == b.dtype, f"output {k}: dtype {g.dtype}, torch {b.dtype}"
        if g.is_floating_point():
            assert_close(g, w, g.dtype, f"{info.name} {sample.name} output {k}", baseline=b)
        else:
            assert torch.equal(g, w), f"output {k}"
    diff = [(g, w, b) for g, w, b in tensors if g.is_floating_point() and g.requires_grad]
    if not diff:
        return
    upstream = [torch.randn(g.shape, generator=torch.Generator().manual_seed(1000 + k)).to(DEVICE)
                for k, (g, _, _) in enumerate(diff)]
    inputs = [a for a in ours if isinstance(a, torch.Tensor) and a.requires_grad]
    truth_in = [a for a in truth if isinstance(a, torch.Tensor) and a.requires_grad]
    peer_in = [a for a in peer if isinstance(a, torch.Tensor) and a.requires_grad]
    finite = lambda t: t.nan_to_num(0.0, 0.0, 0.0)  # noqa: E731  (upstream through non-finite outputs)
    grads = torch.autograd.grad([g for g, _, _ in diff], inputs, [u.to(g.dtype) for (g, _, _), u in zip(diff, upstream)],
                                allow_unused=True)
    want_g = torch.autograd.grad([w for _, w, _ in diff], truth_in, [u.double() for u in upstream], allow_unused=True)
    base_g = torch.autograd.grad([b for _, _, b in diff], peer_in, [u.to(b.dtype) for (_, _, b), u in
                                                                     zip(diff, upstream)], allow_unused=True)
    for k, (g, w, b) in enumerate(zip(grads, want_g, base_g)):
        if w is None:
            assert g is None or not g.any(), f"input {k}: a gradient where torch has none"
            continue
        assert g is not None, f"input {k}: no gradient where torch has one"
        if not sample.grad_nonfinite:
            g, w, b = finite(g), finite(w), finite(b)
            keep = torch.isfinite(want_g[k]) if want_g[k] is not None else None
            g, w, b = g * keep, w * keep, b * keep
        assert_close(g, w, g.dtype, f"{info.name} {sample.name} grad of input {k}", baseline=b)


@pytest.mark.parametrize("info,err", ERRORS, ids=[f"{i.name}-{e.name}" for i, e in ERRORS])
def test_error_sample_raises_naming_the_argument(info, err):
    with pytest.raises(err.error, match=err.match):
        info.fn(*err.args, **err.kwargs)
    if err.torch_rejects:   # torch rejects it too (any exception: its messages differ)
        with pytest.raises(Exception):
            info.torch_fn(*err.args, **err.kwargs)


def test_every_registered_op_is_public_and_counted():
    from fastnets import ops
    for info in OPS:
        assert info.name in ops.__all__, info.name
        assert info.dispatch in _dispatch.OPS, info.dispatch
