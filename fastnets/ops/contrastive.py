"""clip_loss: CLIP's softmax and SigLIP's sigmoid contrastive losses, tiled (fastnets/kernels/contrastive.py):
the batch x batch logits are never stored, forward or backward, in one process or across a
torch.distributed group."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double

KINDS = {"softmax": 0, "sigmoid": 1}


def _contrastive_kernels():
    from ..kernels import contrastive
    return contrastive


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_dispatch.register_op("clip_loss", "CLIP (softmax, both directions) / SigLIP (sigmoid) contrastive loss over "
                                   "tiles, fwd + bwd, never storing the batch x batch logits; torch.distributed")


@torch.library.custom_op("fastnets::clip_loss_stats", mutates_args=())
def _clip_loss_stats(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: int, off: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    return _contrastive_kernels().clip_loss_stats(a, b, scale, bias, kind, off)


@_clip_loss_stats.register_fake
def _(a, b, scale, bias, kind, off):
    acc = _acc(a.dtype)
    if kind == KINDS["sigmoid"]:
        return a.new_empty((a.shape[0],), dtype=acc), a.new_empty((0,), dtype=acc), a.new_empty((0,), dtype=acc)
    return (a.new_empty((a.shape[0],), dtype=acc), a.new_empty((a.shape[0],), dtype=acc),
            a.new_empty((b.shape[0],), dtype=acc))


@torch.library.custom_op("fastnets::clip_loss_bwd", mutates_args=())
def _clip_loss_bwd(g: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], lse_row: Tensor,
                   lse_col: Tensor, kind: int, off: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _contrastive_kernels().clip_loss_bwd(g, a, b, scale, bias, lse_row, lse_col, kind, off)


@_clip_loss_bwd.register_fake
def _(g, a, b, scale, bias, lse_row, lse_col, kind, off):
    acc = _acc(a.dtype)
    return torch.empty_like(a), torch.empty_like(b), a.new_empty((1,), dtype=acc), a.new_empty((1,), dtype=acc)


_dispatch.register_op("zero_shot_logits", "zero-shot head: L2-normalise the image features, matmul with the class "
                                          "embeddings and scale in one kernel (the norm accumulated in the K loop)")


@torch.library.custom_op("fastnets::zero_shot_logits_fwd", mutates_args=())
def _zero_shot_logits_fwd(x: Tensor, w: Tensor, scale: Tensor, normalize: bool) -> Tensor:
    return _contrastive_kernels().zero_shot_logits(x, w, scale, normalize)


@_zero_shot_logits_fwd.register_fake
def _(x, w, scale, normalize):
    return x.new_empty((x.shape[0], w.shape[1]))


def _zero_shot_setup(ctx, inputs, output):
    x, w, scale, normalize = inputs
    ctx.save_for_backward(x, w, scale)
    ctx.normalize = normalize


def _zero_shot_backward(ctx, g):
    # The backward is three GEMM-shaped products: cuBLAS through the reference formula's autograd.
    x, w, scale = ctx.saved_tensors
    dx, dw, ds = _double.reference_grads(
        lambda x, w, s: reference.contrastive.zero_shot_logits(x, w, s, ctx.normalize), (x, w, scale), g)
    return dx, dw, ds, None


_zero_shot_logits_fwd.register_autograd(_zero_shot_backward, setup_context=_zero_shot_setup)


def zero_shot_logits(image_features: Tensor, classifier: Tensor, logit_scale=100.0, *, k: int = 1,
                     normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The zero-shot head: ``(logits (B, C), top-k scores (B, k), top-k class indices (B, k))``
    with ``logits = logit_scale * normalize(image_features) @ classifier``.

    image_features (B, D); classifier (D, C), e.g. CLIPModel.zero_shot_classifier's (open_clip's
    layout; any strides); logit_scale a number or 1-element tensor. normalize: L2-normalise the
    features first (F.normalize), fused into the matmul kernel: each row's norm is accumulated
    in the same K loop and scales the finished tile, so the features are read once. The top-k
    over the (B, C) logits is torch.topk. Differentiable (the backward's products run on torch's
    matmuls). fp16 / bf16 / fp32 / fp64. Backends: triton, interpret, torch."""
    op = "zero_shot_logits"
    _checks.tensor(op, "image_features", image_features)
    _checks.tensor(op, "classifier", classifier)
    if image_features.dim() != 2 or classifier.dim() != 2 or image_features.shape[1] != classifier.shape[0]:
        raise ValueError(f"{op}: image_features (B, D) and classifier (D, C) must agree on D, got "
                         f"{tuple(image_features.shape)} and {tuple(classifier.shape)}")
    if classifier.device != image_features.device:
        raise ValueError(f"{op}: classifier is on {classifier.device} but image_features is on "
                         f"{image_features.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classifier.shape[1]:
        raise ValueError(f"{op}: k must be an int in [1, {classifier.shape[1]}], got {k!r}")
    # Under autocast the matmul runs (and returns) in the autocast dtype, as torch's does.
    image_features, classifier = _checks.autocast(image_features, classifier)
    x = image_features if image_features.stride(-1) == 1 else image_features.contiguous()
    w = classifier.to(x.dtype)
    scale = _scalar(op, "logit_scale", logit_scale, x, positive=False)
    backend = _dispatch.choose(op, x.device, empty=x.numel() == 0 or w.numel() == 0)
    if backend == "torch":
        logits = reference.contrastive.zero_shot_logits(x, w, scale, normalize)
    else:
        logits = torch.ops.fastnets.zero_shot_logits_fwd(x, w, scale, normalize)
    top = logits.topk(k, dim=-1)
    return logits, top.values, top.indices


def _all_gather(t: Tensor, group) -> Tensor:
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums every rank's gradient for this rank's
    rows (reduce-scatter on NCCL; all-reduce + slice where reduce-scatter is missing, gloo)."""

    @staticmethod
    def forward(ctx, t: Tensor, group):
        import torch.distributed as dist
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), t.shape[0]
        return _all_gather(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone(), None


def _ring_exchange(t: Tensor, send_to: int, recv_from: int, group) -> Tensor:
    import torch.distributed as dist
    out = torch.empty_like(t)
    ops_ = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, send_to) if group else send_to, group),
            dist.P2POp(dist.irecv, out, dist.get_global_rank(group, recv_from) if group else recv_from, group)]
    for req in dist.batch_isend_irecv(ops_):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    """Send `t` to the next rank, receive the previous rank's; the gradient travels back the
    other way, to the rank the tensor came from."""

    @staticmethod
    def forward(ctx, t: Tensor, group):
        import torch.distributed as dist
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.prev, ctx.next = group, (rank - 1) % world, (rank + 1) % world
        return _ring_exchange(t, ctx.next, ctx.prev, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ring_exchange(grad, ctx.prev, ctx.next, ctx.group), None


def gather_with_grad(t: Tensor, group=None) -> Tensor:
    """torch.distributed all-gather of `t` along dim 0 that gradients flow back through."""
    return _GatherWithGrad.apply(t, group)


class _ClipLoss(torch.autograd.Function):
    """One rank's (or the only process's) share of the loss over rows a (M local) against
    columns b (N, all ranks'); row i's positive is column i + off.

    softmax: the column log-sum-exps need every rank's rows: each rank merges its rows'
    partial column lse in the kernel, and an all-gather of those (N floats a rank) completes
    them. The backward then gives, on each rank, that rank's block of the *global* loss's
    gradient: d a is complete, d b is the block's contribution, which the gather's backward
    sums over ranks. Averaged over ranks (DDP), the gradients equal the single-process
    loss's on the whole batch, as open_clip's local loss does."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: int, off: int,
                distributed: bool, group):
        row, diag, col = torch.ops.fastnets.clip_loss_stats(a, b, scale, bias, kind, off)
        M = a.shape[0]
        if kind == KINDS["softmax"]:
            if distributed:
                col = torch.logsumexp(_all_gather(col[None], group), dim=0)
            loss = ((row - diag).sum() + (col[off:off + M] - diag).sum()) / (2 * M)
        else:
            loss = row.sum() / M
        ctx.save_for_backward(a, b, scale, bias, row, col)
        ctx.kind, ctx.off = kind, off
        ctx.scale_dtype = scale.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b, scale, bias, row, col = ctx.saved_tensors
        M = a.shape[0]
        gs = (g.to(_acc(a.dtype)) / (2 * M if ctx.kind == KINDS["softmax"] else M)).reshape(1)
        da, db, dscale, dbias = torch.ops.fastnets.clip_loss_bwd(gs, a, b, scale, bias, row, col, ctx.kind, ctx.off)
        return (da, db, dscale.to(ctx.scale_dtype), dbias.to(ctx.bias_dtype) if bias is not None else None,
                None, None, None, None)


def _scalar(op: str, name: str, v, like: Tensor, positive: bool) -> Tensor:
    """A python number or a 1-element float tensor on the features' device, as a (1,) view."""
    if isinstance(v, Tensor):
        _checks.tensor(op, name, v)
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a 1-element tensor, got shape {tuple(v.shape)}")
        if v.device != like.device:
            raise ValueError(f"{op}: {name} is on {v.device} but the features are on {like.device}")
        # Reading a CUDA scalar would stall the stream each step: its sign is checked where free.
        if positive and v.device.type != "cuda" and not torch.compiler.is_compiling() and not bool(v.detach() > 0):
            raise ValueError(f"{op}: {name} must be positive (the multiplier itself, exp of the learned log scale), "
                             f"got {float(v.detach())}")
        return v.reshape(1)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number or a tensor, got {type(v).__name__}")
    if positive and not v > 0:
        raise ValueError(f"{op}: {name} must be positive (the multiplier itself, exp of the learned log scale), got {v}")
    return torch.full((1,), float(v), dtype=_acc(like.dtype), device=like.device)


def _torch_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, off: int,
                distributed: bool, group, b_local: Tensor) -> Tensor:
    """The same loss on materialised logits (the torch backend), local-loss style under a group."""
    if not distributed:
        return reference.contrastive.clip_loss(a, b, scale, bias, kind)
    acc = _acc(a.dtype)
    M = a.shape[0]
    logits = scale.to(acc) * a.to(acc) @ b.to(acc).T + (bias.to(acc) if bias is not None else 0)
    if kind == "sigmoid":
        labels = -torch.ones_like(logits)
        labels[torch.arange(M), torch.arange(M) + off] = 1
        return (-F.logsigmoid(labels * logits).sum() / M).to(a.dtype)
    # The text -> image direction needs every rank's images: gather them too.
    a_all = gather_with_grad(a, group)
    logits_t = scale.to(acc) * b_local.to(acc) @ a_all.to(acc).T
    labels = torch.arange(M, device=a.device) + off
    return ((F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels)) / 2).to(a.dtype)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
              kind: str = "softmax", normalize: bool = False, distributed: bool = False, group=None,
              exchange: str = "gather") -> Tensor:
    """CLIP's or SigLIP's contrastive loss of matched (image, text) pairs, row i with row i.

    With L = logit_scale * I Tᵀ (+ logit_bias), N pairs:

    - ``kind="softmax"`` (CLIP, open_clip's ``ClipLoss``): the mean of the image->text and
      text->image cross-entropies against the diagonal, both directions from one pass over
      the tiles.
    - ``kind="sigmoid"`` (SigLIP, open_clip's ``SigLipLoss``): ``-sum(logsigmoid(y * L)) / N``,
      y = +1 on the diagonal and -1 elsewhere; ``logit_bias`` is added to every logit.

    image_features, text_features: (N, D), same dtype and device, used as given (models
    normalise them, as open_clip's do); ``normalize=True`` L2-normalises them first.
    logit_scale: the multiplier itself (already exponentiated, as ``ClipLoss`` takes it), a
    positive number or 1-element tensor (learnable: it gets a gradient); logit_bias likewise,
    sigmoid only. The logits are computed tile by tile and never stored; the backward
    recomputes them, so memory is O(N * D) plus O(N) per program, never O(N²).

    ``distributed=True`` (inside torch.distributed, e.g. torchrun): the features are this
    rank's local batch (the same size on every rank); every rank's text features are gathered
    with gradient and this rank's rows are scored against all of them, the softmax's column
    log-sum-exps completed by an all-gather of N floats a rank. The returned loss is this
    rank's share normalised by its local batch (open_clip's local loss), so the gradients
    averaged over ranks (DDP) equal the single-process loss's on the whole batch.
    ``exchange="neighbour"`` (sigmoid only; SigLIP's scheme): no gather; the text features
    travel round the ranks in a ring, one neighbour exchange a step, each step scoring this
    rank's images against one rank's texts, so only two local batches of text features are
    ever held (the softmax loss needs every column's log-sum-exp, so it always gathers).

    Returns a 0-d tensor in the features' dtype (float32 under autocast, as torch's
    cross-entropy). fp16 / bf16 (tensor cores, float32 accumulation) / fp32 / fp64.
    Backends: triton, interpret, torch (materialises the logits).
    """
    op = "clip_loss"
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be 'softmax' (CLIP) or 'sigmoid' (SigLIP), got {kind!r}")
    _checks.tensor(op, "image_features", image_features)
    _checks.tensor(op, "text_features", text_features)
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be (batch, dim), got shape {tuple(t.shape)}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"{op}: image_features and text_features must have the same feature dim, got "
                         f"{image_features.shape[1]} and {text_features.shape[1]}")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"{op}: image_features and text_features must hold the same number of pairs, got "
                         f"{image_features.shape[0]} images and {text_features.shape[0]} texts")
    if image_features.device != text_features.device:
        raise ValueError(f"{op}: image_features is on {image_features.device} but text_features is on "
                         f"{text_features.device}")
    if image_features.shape[0] == 0:
        raise ValueError(f"{op}: the batch is empty (0 pairs)")
    a, b = _checks.autocast(image_features, text_features)
    dev = a.device.type
    # Under autocast the loss comes back in float32, as torch's cross-entropy does there.
    out_dtype = (torch.float32 if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
                 and a.dtype in (torch.float16, torch.bfloat16) else None)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: image_features and text_features must have the same dtype, got {a.dtype} and "
                        f"{b.dtype}")
    if logit_bias is not None and kind == "softmax":
        raise ValueError(f"{op}: logit_bias only applies to kind='sigmoid' (a constant shift leaves the softmax "
                         "loss unchanged)")
    scale = _scalar(op, "logit_scale", logit_scale, a, positive=True)
    bias = _scalar(op, "logit_bias", logit_bias, a, positive=False) if logit_bias is not None else None
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a, b = a.contiguous() if a.stride(-1) != 1 else a, b.contiguous() if b.stride(-1) != 1 else b
    if exchange not in ("gather", "neighbour"):
        raise ValueError(f"{op}: exchange must be 'gather' or 'neighbour', got {exchange!r}")
    if exchange == "neighbour" and kind != "sigmoid":
        raise ValueError(f"{op}: exchange='neighbour' needs kind='sigmoid' (the softmax loss needs every column's "
                         "log-sum-exp: use the gather)")
    off, b_local = 0, b
    if distributed:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{op}: distributed=True needs an initialised torch.distributed process group "
                               "(torchrun / init_process_group)")
        if exchange == "neighbour":
            return _neighbour_loss(a, b, scale, bias, group, out_dtype)
        off = dist.get_rank(group) * a.shape[0]
        b = gather_with_grad(b, group)
    backend = _dispatch.choose(op, a.device)
    if backend == "torch":
        loss = _torch_loss(a, b, scale, bias, kind, off, distributed, group, b_local)
    else:
        loss = _ClipLoss.apply(a, b, scale, bias, KINDS[kind], off, distributed, group).to(a.dtype)
    return loss.to(out_dtype) if out_dtype is not None else loss


def _neighbour_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], group, out_dtype) -> Tensor:
    """SigLIP's ring: this rank's images against its own texts (the positives), then against
    each other rank's texts as they arrive from the previous rank (all negatives)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    backend = _dispatch.choose("clip_loss", a.device)
    M = a.shape[0]

    def block(texts: Tensor, positives: bool) -> Tensor:
        if backend == "torch":
            logits = scale.to(_acc(a.dtype)) * a.to(_acc(a.dtype)) @ texts.to(_acc(a.dtype)).T + bias.to(_acc(a.dtype))
            labels = (2 * torch.eye(M, device=a.device, dtype=logits.dtype) - 1 if positives
                      else -torch.ones_like(logits))
            return -F.logsigmoid(labels * logits).sum() / M
        # off = the column count: no column i + off exists, so every pair is a negative.
        return _ClipLoss.apply(a, texts, scale, bias, KINDS["sigmoid"], 0 if positives else texts.shape[0], False,
                               None)

    loss = block(b, True)
    texts = b
    for _ in range(world - 1):
        texts = _NeighbourExchange.apply(texts, group)
        loss = loss + block(texts, False)
    loss = loss.to(a.dtype)
    return loss.to(out_dtype) if out_dtype is not None else loss
