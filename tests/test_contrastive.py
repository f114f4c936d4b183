"""fastnets.ops.clip_loss (CLIP softmax / SigLIP sigmoid, tiled): the loss and the gradients of
both feature sets, the scale and the bias against a float64 reference that materialises the
logits and against torch itself (the same formula in the dtype: the 2x rule for fp16 / bf16);
odd batch sizes and dims; the distributed scheme on 2 gloo processes equals the single-process
loss on the whole batch; bad input."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import ops, reference
from helpers import DEVICE, assert_close, check_op, expect_backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def torch_clip_loss(a, b, scale, bias, kind):
    """open_clip's ClipLoss / SigLipLoss formula, computed in the features' dtype."""
    logits = scale.to(a.dtype) * a @ b.T
    if bias is not None:
        logits = logits + bias.to(a.dtype)
    n = a.shape[0]
    if kind == "softmax":
        labels = torch.arange(n, device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    labels = 2 * torch.eye(n, device=a.device, dtype=a.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def _features(n, d, dtype, seed=0, normalized=True):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    b = 0.6 * a + 0.8 * b          # matched pairs correlate, as trained features do
    if normalized:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _check(kind, n, d, dtype, scale=14.3, bias=-4.0, normalized=True):
    a, b = _features(n, d, dtype, seed=n + d, normalized=normalized)
    s = torch.tensor([scale], device=DEVICE)                       # float32, as a learned logit scale is
    args = [a, b, s] + ([torch.tensor(bias, device=DEVICE)] if kind == "sigmoid" else [])

    def ours(a, b, s, bias=None):
        return ops.clip_loss(a, b, s, bias, kind=kind)

    def ref(a, b, s, bias=None):
        return reference.contrastive.clip_loss(a, b, s, bias, kind)

    def peer(a, b, s, bias=None):
        return torch_clip_loss(a, b, s, bias, kind)

    check_op("clip_loss", ours, ref, args, dtype, peer=peer)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 8), (7, 5), (45, 72)])
def test_clip_loss_matches_float64_and_torch(kind, dtype, n, d):
    _check(kind, n, d, dtype)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_clip_loss_batch_333(kind):
    """More row and column blocks than one tile, a ragged last tile both ways."""
    _check(kind, 333, 40, torch.float32)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_clip_loss_unnormalized_large_logits(kind):
    """Unnormalised features at CLIP's largest scale (100): logits in the hundreds, where a
    log-sum-exp without the running max overflows float32."""
    _check(kind, 19, 24, torch.float32, scale=100.0, bias=-10.0, normalized=False)


def test_clip_loss_normalize_and_float_scale():
    a, b = _features(9, 16, torch.float32, normalized=False)
    with expect_backend("clip_loss"):
        got = ops.clip_loss(a, b, 10.0, normalize=True)
    want = reference.contrastive.clip_loss(F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1), 10.0)
    assert_close(got, want, torch.float32, "clip_loss normalize=True")


def test_clip_loss_gradcheck_float64():
    a, b = _features(6, 5, torch.float64, normalized=False)
    a, b = a.requires_grad_(), b.requires_grad_()
    s = torch.tensor(1.7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: ops.clip_loss(a, b, s), (a, b, s))
    assert torch.autograd.gradcheck(lambda a, b, s, c: ops.clip_loss(a, b, s, c, kind="sigmoid"), (a, b, s, bias))


def test_clip_loss_backends_agree_and_autocast_gives_float32():
    a, b = _features(11, 12, torch.float32)
    with fastnets.backend("torch"):
        want = ops.clip_loss(a, b, 5.0)
    with expect_backend("clip_loss"):
        got = ops.clip_loss(a, b, 5.0)
    assert_close(got, want.double(), torch.float32, "kernel vs torch backend")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with expect_backend("clip_loss"):
            lo = ops.clip_loss(a, b, 5.0)
    assert lo.dtype == torch.float32
    assert abs(lo.item() - want.item()) < 0.05 * abs(want.item())


def test_clip_loss_bad_input():
    a, b = _features(4, 8, torch.float32)
    with pytest.raises(ValueError, match="same feature dim"):
        ops.clip_loss(a, b[:, :6], 1.0)
    with pytest.raises(ValueError, match="same number of pairs"):
        ops.clip_loss(a, b[:3], 1.0)
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        ops.clip_loss(a, b, 0.0)
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        ops.clip_loss(a, b, torch.tensor(-2.0))
    with pytest.raises(TypeError, match="same dtype"):
        ops.clip_loss(a, b.double(), 1.0)
    with pytest.raises(ValueError, match="kind must be"):
        ops.clip_loss(a, b, 1.0, kind="hinge")
    with pytest.raises(ValueError, match="logit_bias only applies"):
        ops.clip_loss(a, b, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        ops.clip_loss(a[None], b[None], 1.0)
    with pytest.raises(ValueError, match="1-element"):
        ops.clip_loss(a, b, torch.ones(2))
    with pytest.raises(TypeError, match="image_features must be float16"):
        ops.clip_loss(a.long(), b, 1.0)
    with pytest.raises(ValueError, match="empty"):
        ops.clip_loss(a[:0], b[:0], 1.0)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ops.clip_loss(a, b, 1.0, distributed=True)
    with pytest.raises(ValueError, match="needs kind='sigmoid'"):
        ops.clip_loss(a, b, 1.0, distributed=True, exchange="neighbour")
    with pytest.raises(ValueError, match="exchange must be"):
        ops.clip_loss(a, b, 1.0, exchange="ring")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="text_features is on"):
            ops.clip_loss(a.cuda(), b.cpu(), 1.0)


# --- torch.distributed: 2 gloo processes on CPU ------------------------------------------------

WORLD, LOCAL, DIM = 2, 9, 12


def _distributed_worker(rank, init_file, kind, exchange, backend, results):
    import torch.distributed as dist
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a_all, b_all = _features(WORLD * LOCAL, DIM, torch.float64, seed=3)
        a = a_all[rank * LOCAL:(rank + 1) * LOCAL].clone().cpu().requires_grad_()
        b = b_all[rank * LOCAL:(rank + 1) * LOCAL].clone().cpu().requires_grad_()
        s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True) if kind == "sigmoid" else None
        with fastnets.backend(backend):
            loss = ops.clip_loss(a, b, s, bias, kind=kind, distributed=True, exchange=exchange)
        loss.backward()
        grads = [s.grad] + ([bias.grad] if bias is not None else [])
        for t in [loss.detach()] + grads:        # what DDP does with parameter gradients: average
            dist.all_reduce(t)
            t /= WORLD
        # Plain lists: a tensor sent through the queue would be read from this process after it exits.
        results.put((rank, loss.item(), (a.grad / WORLD).tolist(), (b.grad / WORLD).tolist(), [t.item() for t in grads],
                     fastnets._dispatch.calls[("clip_loss", backend)]))
        # Both ranks leave together: a rank tearing its gloo connections down while the other
        # still uses them aborts that process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,exchange", [("softmax", "gather"), ("sigmoid", "gather"), ("sigmoid", "neighbour")])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_clip_loss_distributed_equals_single_process(kind, exchange, backend, tmp_path):
    if backend == "interpret" and DEVICE.type == "cuda":
        pytest.skip("the 2-process gloo check runs CPU tensors, whose kernels are the interpreter's: CPU CI runs "
                    "this variant; on a GPU machine the torch-backend variant still runs")
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, str(tmp_path / "init"), kind, exchange, backend,
                                                           results))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a, b = _features(WORLD * LOCAL, DIM, torch.float64, seed=3)
    a, b = a.cpu().requires_grad_(), b.cpu().requires_grad_()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True) if kind == "sigmoid" else None
    want = reference.contrastive.clip_loss(a, b, s, bias, kind)
    want.backward()
    for rank, loss, ga, gb, gscalars, calls in got:
        assert calls > 0, f"rank {rank}: clip_loss did not run on {backend}"
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert abs(loss - want.item()) < 1e-9 * max(1.0, abs(want.item())), (rank, loss, want.item())
        assert_close(torch.tensor(ga, dtype=torch.float64), a.grad[sl], torch.float64, f"rank {rank} d image")
        assert_close(torch.tensor(gb, dtype=torch.float64), b.grad[sl], torch.float64, f"rank {rank} d text")
        assert_close(torch.tensor(gscalars[0], dtype=torch.float64), s.grad, torch.float64, "d scale")
        if bias is not None:
            assert_close(torch.tensor(gscalars[1], dtype=torch.float64), bias.grad, torch.float64, "d bias")


def test_clip_loss_under_torch_compile_fullgraph():
    a, b = _features(9, 8, torch.float32, normalized=False)
    s = torch.tensor(3.0, device=DEVICE)
    args = [t.clone().requires_grad_() for t in (a, b, s)]
    compiled = torch.compile(lambda a, b, s: ops.clip_loss(a, b, s, normalize=True), fullgraph=True,
                             backend="aot_eager")
    got = compiled(*args)
    got.backward()
    want_args = [t.clone().requires_grad_() for t in (a, b, s)]
    want = ops.clip_loss(*want_args, normalize=True)
    want.backward()
    assert torch.equal(got, want)
    for x, y in zip(args, want_args):
        assert torch.equal(x.grad, y.grad)


# --- the zero-shot head ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("b,d,c", [(1, 8, 3), (37, 40, 70)])
def test_zero_shot_logits_matches_float64_and_torch(dtype, normalize, b, d, c):
    g = torch.Generator().manual_seed(b + c)
    x = (torch.randn(b, d, generator=g) * 3).to(DEVICE, dtype)
    # The classifier as zero_shot_classifier builds it: unit columns of a (C, D) stack, transposed.
    w = F.normalize(torch.randn(c, d, generator=g), dim=-1).to(DEVICE, dtype).t()
    s = torch.tensor([14.0], device=DEVICE)

    def peer(x, w, s):
        f = F.normalize(x, dim=-1) if normalize else x
        return s.to(x.dtype) * f @ w

    check_op("zero_shot_logits", lambda x, w, s: ops.zero_shot_logits(x, w, s, normalize=normalize)[0],
             lambda x, w, s: reference.contrastive.zero_shot_logits(x, w, s, normalize), [x, w, s], dtype, peer=peer)


def test_zero_shot_logits_top_k_and_bad_input():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 6, generator=g).to(DEVICE), F.normalize(torch.randn(6, 4, generator=g), dim=0).to(DEVICE)
    with expect_backend("zero_shot_logits"):
        logits, top, idx = ops.zero_shot_logits(x, w, 100.0, k=2)
    want = 100.0 * F.normalize(x, dim=-1) @ w
    assert_close(logits, want.double(), torch.float32, "zero-shot logits")
    assert torch.equal(idx, logits.topk(2, -1).indices) and torch.equal(top, logits.topk(2, -1).values)
    with pytest.raises(ValueError, match="agree on D"):
        ops.zero_shot_logits(x, w[:5])
    with pytest.raises(ValueError, match="k must be"):
        ops.zero_shot_logits(x, w, k=5)
    with pytest.raises(TypeError, match="classifier must be float16"):
        ops.zero_shot_logits(x, w.long())


def test_clip_loss_modules_take_open_clips_call_shape():
    from fastnets.nn import ClipLoss, SigLipLoss
    a, b = _features(7, 12, torch.float32)
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)
    with expect_backend("clip_loss"):
        got = ClipLoss()(a, b, s)
        got_sig = SigLipLoss()(a, b, s, bias)
    assert_close(got, reference.contrastive.clip_loss(a.double(), b.double(), 10.0), torch.float32, "ClipLoss")
    assert_close(got_sig, reference.contrastive.clip_loss(a.double(), b.double(), 10.0, -5.0, "sigmoid"),
                 torch.float32, "SigLipLoss")
