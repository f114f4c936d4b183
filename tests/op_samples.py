"""The one sample-input registry: per public op (and module), its torch counterpart and
generators of sample and error inputs, after PyTorch's OpInfo. tests/test_op_samples.py runs
every op over its samples against torch; a new op joins by adding an OpInfo here, not a test
file.

A Sample is a call: positional tensors and plain values, keyword arguments, and which tensor
arguments get gradients. The kinds every op that takes them gets (`_layouts`): plain, a
batch of 1, each dim 0 in turn where torch allows it, transposed / step-sliced / stride-0
expanded views, channels_last, and NaN / +-inf planted in the input. Error samples are calls
torch rejects too, with the exception type and the argument the message must name.

torch_fn takes the same arguments as the fastnets op (in float64 for the truth, in the
sample's dtype as the yardstick); `dispatch` is the name the op counts its calls under, so
the test can assert that the kernel ran (or, for an empty input, that nothing launched).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastnets import ops


@dataclasses.dataclass
class Sample:
    name: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    grad: tuple = ()          # indices of args that get gradients
    # Bitwise NaN / inf positions compared in the gradients too (False where torch's own
    # backward is not the bar: see the OpInfo's note)
    grad_nonfinite: bool = True
    empty: Optional[bool] = None   # nothing to launch (default: some tensor argument is empty)


@dataclasses.dataclass
class ErrorSample:
    name: str
    args: tuple
    kwargs: dict
    error: type
    match: str                # a regex the message must contain (it names the argument)
    # torch rejects it too; False for a documented gap (fastnets says it does not support what
    # torch takes) or where torch's own kernel reads out of bounds instead of raising
    torch_rejects: bool = True


@dataclasses.dataclass
class OpInfo:
    name: str
    torch_fn: Callable
    dispatch: str
    samples: Callable         # (device) -> [Sample]
    errors: Callable = lambda device: []
    fn: Optional[Callable] = None

    def __post_init__(self):
        if self.fn is None:
            self.fn = getattr(ops, self.name)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, device, seed=0, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(device)


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    """t with a NaN, a +inf and a -inf planted in its first entries (a copy)."""
    t = t.clone()
    flat = t.view(-1)
    for i, v in enumerate((float("nan"), float("inf"), float("-inf"))):
        if i < flat.numel():
            flat[i * max(1, flat.numel() // 3)] = v
    return t


def _layouts(shape, device, *, empty_dims=(), channels_last=False, nonfinite=True, seed=0):
    """(name, tensor) variants of a float32 input of `shape`: the kinds every op gets."""
    x = _randn(shape, device, seed)
    out = [("plain", x), ("batch1", x[:1].clone()), ("odd", _randn((3,) + tuple(s + 1 for s in shape[1:]), device,
                                                                    seed + 1))]
    for d in empty_dims:
        out.append((f"empty_dim{d}", x.narrow(d, 0, 0).clone()))
    if x.dim() >= 2:
        out.append(("transposed", x.transpose(0, 1).contiguous().transpose(0, 1)))
        out.append(("step_sliced", torch.cat([x, x], -1)[..., ::2]))
        out.append(("expanded", x[:1].expand(*x.shape)))
    if channels_last and x.dim() == 4:
        out.append(("channels_last", x.contiguous(memory_format=torch.channels_last)))
    if nonfinite:
        out.append(("nan_inf", _nonfinite(x)))
    return out


# --- norms --------------------------------------------------------------------------------------------

def _layer_norm_samples(device):
    w, b = _randn((8,), device, 5), _randn((8,), device, 6)
    out = []
    for name, x in _layouts((3, 4, 8), device, empty_dims=(0, 1)):
        if x.shape[-1] != 8:
            continue
        out.append(Sample(name, (x, (8,), w, b), grad=(0, 2, 3)))
    out.append(Sample("no_affine", (_randn((5, 8), device), (8,)), grad=(0,)))
    return out


def _norm_errors(device):
    x = _randn((2, 8), device)
    return [ErrorSample("shape", (x, (7,)), {}, ValueError, "normalized_shape"),
            ErrorSample("weight_shape", (x, (8,), _randn((7,), device)), {}, ValueError, "weight"),
            ErrorSample("float64_weight", (x, (8,), _randn((8,), device).double()), {}, TypeError,
                        "weight is torch.float64 but input is torch.float32")]


def _rms_norm_samples(device):
    w = _randn((8,), device, 5)
    return [Sample(name, (x, (8,), w, 1e-6), grad=(0, 2)) for name, x in _layouts((3, 4, 8), device,
                                                                                empty_dims=(0, 1))
            if x.shape[-1] == 8]


def _group_norm_samples(device):
    w, b = _randn((6,), device, 5), _randn((6,), device, 6)
    out = []
    for name, x in _layouts((2, 6, 5, 3), device, empty_dims=(0,), channels_last=True):
        if x.shape[1] != 6:
            continue
        out.append(Sample(name, (x, 3, w, b), grad=(0, 2, 3)))
    return out


def _batch_norm_samples(device):
    w, b = _randn((4,), device, 5), _randn((4,), device, 6)
    out = []
    for name, x in _layouts((3, 4, 5, 5), device, empty_dims=(0,), channels_last=True):
        if x.shape[1] != 4:
            continue
        for training in (True, False):
            rm, rv = _randn((4,), device, 7) * 0.1, torch.rand(4, generator=_gen(8)).to(device) + 0.5
            out.append(Sample(f"{name}-{'train' if training else 'eval'}", (x, rm, rv, w, b, training),
                              grad=(0, 3, 4)))
    return out


def _batch_norm_errors(device):
    x = _randn((1, 4, 1, 1), device)
    return [ErrorSample("one_value_per_channel", (x, None, None, None, None, True), {}, ValueError,
                        "more than 1 value per channel"),
            ErrorSample("eval_without_stats", (_randn((2, 4), device), None, None, None, None, False), {}, ValueError,
                        "running_mean"),
            ErrorSample("float64_running_mean", (_randn((2, 4), device), torch.zeros(4, dtype=torch.float64,
                                                                                     device=device),
                                                 torch.ones(4, device=device), None, None, False), {}, TypeError,
                        "running_mean is torch.float64")]


# --- pointwise ------------------------------------------------------------------------------------------

_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "leaky_relu": F.leaky_relu}


def _bias_act_torch(x, bias, activation):
    return _ACTS[activation](x + bias if bias is not None else x)


def _bias_act_samples(device):
    b = _randn((6,), device, 5)
    out = []
    for act in ("relu", "gelu", "silu"):
        for name, x in _layouts((3, 4, 6), device, empty_dims=(0, 1)):
            if x.shape[-1] != 6:
                continue
            out.append(Sample(f"{act}-{name}", (x, b, act), grad=(0, 1)))
    return out


# --- convolution and pooling ----------------------------------------------------------------------------

def _conv2d_samples(device):
    w, b = _randn((5, 3, 3, 3), device, 5), _randn((5,), device, 6)
    out = []
    for name, x in _layouts((2, 3, 6, 6), device, empty_dims=(0,), channels_last=True):
        if x.shape[1] != 3:
            continue
        out.append(Sample(name, (x, w, b, 1, 1), grad=(0, 1, 2)))
    # A NaN / inf weight tap with only the weight differentiated. (The input gradient through
    # such a tap is still NaN at more border positions than torch's, 0 * NaN from the implicit
    # GEMM's zero-padded taps: issue 24, open.)
    out.append(Sample("nan_inf_weight", (_randn((2, 3, 6, 6), device), _nonfinite(w), b, 1, 1), grad=(1, 2)))
    return out


def _conv2d_errors(device):
    x, w = _randn((2, 3, 6, 6), device), _randn((5, 4, 3, 3), device)
    return [ErrorSample("channels", (x, w), {}, ValueError, "weight"),
            ErrorSample("rank", (x[0, 0], _randn((5, 3, 3, 3), device)), {}, ValueError, "input")]


def _pool_samples(extra, *, empty_channels=False, output_zero=False):
    def samples(device):
        out = []
        for name, x in _layouts((2, 3, 7, 6), device, empty_dims=(0, 1) if empty_channels else (0,),
                                channels_last=True):
            # torch's adaptive_avg_pool2d takes 0 channels forward, but its backward raises
            out.append(Sample(name, (x,) + extra, grad=() if name == "empty_dim1" else (0,)))
        if output_zero:
            # (torch's backward raises for an empty output: the forward is compared)
            out.append(Sample("output_size_0", (_randn((2, 3, 5, 5), device), (0, 2)), empty=True))
        return out
    return samples


def _pool_errors(device):
    return [ErrorSample("rank", (_randn((5, 5), device), 2), {}, ValueError, "input must be 4-D")]


# --- attention and losses -------------------------------------------------------------------------------

def _sdpa_samples(device):
    q, k, v = _randn((2, 3, 4, 8), device, 1), _randn((2, 3, 5, 8), device, 2), _randn((2, 3, 5, 8), device, 3)
    out = [Sample("plain", (q, k, v), grad=(0, 1, 2)),
           Sample("causal", (q, k[..., :4, :], v[..., :4, :]), {"is_causal": True}, grad=(0, 1, 2)),
           Sample("empty_batch", (q[:0], k[:0], v[:0]), grad=(0, 1, 2)),
           Sample("empty_queries", (q[..., :0, :], k, v), grad=(0, 1, 2)),
           Sample("empty_keys", (q, k[..., :0, :], v[..., :0, :]), grad=(0, 1, 2)),
           Sample("kv_batch_broadcast", (q, k[:1], v[:1]), grad=(0, 1, 2)),
           Sample("kv_rank_broadcast", (q, k[0], v[0]), grad=(0, 1, 2)),
           Sample("3d", (q[:, 0], k[:, 0], v[:, 0]), grad=(0, 1, 2)),
           Sample("2d", (q[0, 0], k[0, 0], v[0, 0]), grad=(0, 1, 2)),
           Sample("transposed", (q.transpose(1, 2).contiguous().transpose(1, 2), k, v), grad=(0, 1, 2)),
           Sample("bool_mask", (q, k, v, torch.rand(4, 5, generator=_gen(9)).to(device) > 0.3), grad=(0, 1, 2)),
           Sample("float_mask", (q, k, v, _randn((4, 5), device, 10)), grad=(0, 1, 2))]
    return out


def _sdpa_errors(device):
    q = _randn((2, 3, 4, 8), device)
    return [ErrorSample("rank", (q[0, 0, 0], q, q), {}, ValueError, "at least 2 dims"),
            ErrorSample("batch", (q, q.repeat(3, 1, 1, 1), q.repeat(3, 1, 1, 1)), {}, ValueError, "do not broadcast"),
            # torch's CPU kernel returns a result here (reading past value's end)
            ErrorSample("kv_lengths", (q, q, q[..., :3, :]), {}, ValueError, "same sequence length",
                        torch_rejects=False)]


def _cross_entropy_samples(device):
    x = _randn((5, 7), device)
    t = torch.tensor([1, 0, 6, 3, 2], device=device)
    masked = x.clone()
    masked[0, 2] = float("-inf")
    masked[3, :5] = float("-inf")
    return [Sample("plain", (x, t), grad=(0,)),
            Sample("empty", (x[:0], t[:0]), grad=(0,)),
            Sample("sum", (x, t), {"reduction": "sum"}, grad=(0,)),
            Sample("none", (x, t), {"reduction": "none"}, grad=(0,)),
            Sample("ignore_index", (x, torch.tensor([1, -100, 6, -100, 2], device=device)), grad=(0,)),
            Sample("label_smoothing", (x, t), {"label_smoothing": 0.1}, grad=(0,)),
            Sample("minus_inf_logits", (masked, t), grad=(0,)),
            Sample("step_sliced", (torch.cat([x, x], -1)[:, ::2], t), grad=(0,)),
            Sample("int32_target", (x, t.int()), grad=(0,))]


def _cross_entropy_errors(device):
    x = _randn((5, 7), device)
    return [ErrorSample("target_class", (x, torch.tensor([1, 0, 7, 3, 2], device=device)), {}, ValueError,
                        "target holds class 7"),
            # torch reads bool targets as classes 0 / 1; fastnets asks for integer indices
            ErrorSample("bool_target", (x, torch.ones(5, dtype=torch.bool, device=device)), {}, TypeError,
                        "target must hold integer class indices", torch_rejects=False),
            ErrorSample("rows", (x, torch.zeros(4, dtype=torch.long, device=device)), {}, ValueError, "target")]


def _conv_transpose2d_samples(device):
    w, b = _randn((3, 4, 3, 3), device, 5), _randn((4,), device, 6)
    out = []
    for name, x in _layouts((2, 3, 5, 5), device, empty_dims=(0,), channels_last=True):
        if x.shape[1] == 3:
            out.append(Sample(name, (x, w, b, 2, 1, 1), grad=(0, 1, 2)))
    return out


def _linear_cross_entropy_torch(x, w, t, bias=None, **kw):
    """torch's unfused LM head: the logits, then cross-entropy."""
    return F.cross_entropy(F.linear(x, w, bias), t, **kw)


def _linear_cross_entropy_samples(device):
    x, w, b = _randn((6, 8), device, 1), _randn((11, 8), device, 2), _randn((11,), device, 3)
    t = torch.tensor([0, 3, 10, 5, -100, 7], device=device)
    return [Sample("plain", (x, w, t), grad=(0, 1)),
            Sample("bias", (x, w, t, b), grad=(0, 1, 3)),
            Sample("sum", (x, w, t), {"reduction": "sum"}, grad=(0, 1)),
            Sample("label_smoothing", (x, w, t), {"label_smoothing": 0.1}, grad=(0, 1)),
            Sample("step_sliced", (torch.cat([x, x], -1)[:, ::2], w, t), grad=(0, 1))]


def _zero_shot_torch(x, c, scale):
    """The zero-shot head in torch: scale * normalize(x) @ c, and its top-1."""
    logits = scale * F.normalize(x, dim=-1) @ c
    top = logits.topk(1, dim=-1)
    return logits, top.values, top.indices


def _zero_shot_samples(device):
    x, c = _randn((4, 8), device, 1), _randn((8, 5), device, 2)
    return [Sample("plain", (x, c, 10.0), grad=(0, 1)),
            Sample("transposed_classifier", (x, c.t().contiguous().t(), 10.0), grad=(0, 1)),
            Sample("step_sliced", (torch.cat([x, x], -1)[:, ::2], c, 10.0), grad=(0, 1)),
            Sample("batch1", (x[:1].clone(), c, 10.0), grad=(0, 1))]


# --- rotary and diffusion: no torch function of their own; the counterpart is the formula in torch ops ---

def _rotate_half_torch(x, cos, sin, interleaved=False, position_ids=None, seqlen_offset=0, layout="bhsd",
                       tables="half"):
    """transformers' q * cos + rotate_half(q) * sin, for full per-dim tables (B, S, D)."""
    xb = x.transpose(1, 2) if layout == "bshd" else x
    c, s_ = cos.to(xb.dtype)[:, None], sin.to(xb.dtype)[:, None]
    x1, x2 = xb.chunk(2, -1)
    y = xb * c + torch.cat((-x2, x1), -1) * s_
    return y.transpose(1, 2) if layout == "bshd" else y


def _rope_samples(device):
    angles = torch.rand(2, 5, 4, generator=_gen(3), dtype=torch.float64).to(device) * 6
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    out = []
    for name, x in _layouts((2, 3, 5, 8), device, empty_dims=(1,)):
        if x.shape[0] == 2 and x.shape[2:] == (5, 8):
            out.append(Sample(name, (x, cos, sin), {"tables": "full"}, grad=(0,)))
    x = _randn((2, 5, 3, 8), device, 4)
    out.append(Sample("bshd", (x, cos, sin), {"tables": "full", "layout": "bshd"}, grad=(0,)))
    return out


def _q_sample_torch(x0, noise, t, acp, target=None):
    """diffusers' add_noise: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, abar indexed as torch indexes."""
    a = acp.to(x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _q_sample_samples(device):
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50), 0).to(device)
    out = []
    for name, x in _layouts((3, 2, 4), device, empty_dims=(0,), nonfinite=True):
        n = _randn(x.shape, device, 11)
        t = torch.tensor([0, 49, -1, 7, 20][:x.shape[0]] + [5] * max(0, x.shape[0] - 5), dtype=torch.long,
                         device=device)
        out.append(Sample(name, (x, n, t, acp), grad=(0, 1)))
    return out


def _q_sample_errors(device):
    x = _randn((3, 4), device)
    acp = torch.linspace(0.99, 0.01, 10, device=device)
    return [ErrorSample("timestep_past_the_table", (x, x, torch.tensor([0, 10, 2], device=device), acp), {},
                        IndexError, "timesteps holds 10"),
            ErrorSample("float_timesteps", (x, x, torch.tensor([0.5, 1.0, 2.0], device=device), acp), {},
                        TypeError, "timesteps must be an integer tensor", torch_rejects=False)]


# --- recurrent: the op through its module, torch's module with the same weights ---------------------------

def _recurrent(kind: str, **kw):
    """(fn, torch_fn): fastnets' and torch's module of one kind with the same weights; torch_fn
    takes float64 input through a float64 copy. Output: the sequence output and the states."""
    import copy
    from torch import nn as tnn
    from fastnets import nn as fnn
    torch.manual_seed(0)
    ours = getattr(fnn, kind)(3, 4, batch_first=True, **kw)
    theirs = getattr(tnn, kind)(3, 4, batch_first=True, **kw)
    ours.load_state_dict(theirs.state_dict())
    theirs64 = copy.deepcopy(theirs).double()

    def flat(out):
        seq, state = out
        return (seq,) + (tuple(state) if isinstance(state, tuple) else (state,))

    def fn(x):
        return flat(ours.to(x.device)(x))

    def torch_fn(x):
        return flat((theirs64 if x.dtype == torch.float64 else theirs).to(x.device)(x))
    return fn, torch_fn


def _recurrent_samples(device):
    return [Sample(name, (x,), grad=(0,)) for name, x in _layouts((2, 5, 3), device, empty_dims=(0,))
            if x.shape[-1] == 3 and x.shape[1] > 0]


OPS = [
    OpInfo("layer_norm", F.layer_norm, "layer_norm", _layer_norm_samples, _norm_errors),
    OpInfo("rms_norm", F.rms_norm, "rms_norm", _rms_norm_samples),
    OpInfo("group_norm", F.group_norm, "group_norm", _group_norm_samples,
           lambda device: [ErrorSample("float64_bias", (_randn((2, 4, 3), device), 2, None,
                                                        _randn((4,), device).double()), {}, TypeError, "bias is")]),
    OpInfo("batch_norm", F.batch_norm, "batch_norm", _batch_norm_samples, _batch_norm_errors),
    OpInfo("bias_act", _bias_act_torch, "bias_act", _bias_act_samples),
    OpInfo("conv2d", F.conv2d, "conv2d", _conv2d_samples, _conv2d_errors),
    OpInfo("max_pool2d", F.max_pool2d, "max_pool2d", _pool_samples((3, 2, 1)), _pool_errors),
    OpInfo("avg_pool2d", F.avg_pool2d, "avg_pool2d", _pool_samples((3, 2, 1)), _pool_errors),
    OpInfo("adaptive_avg_pool2d", F.adaptive_avg_pool2d, "adaptive_avg_pool2d",
           _pool_samples((3,), empty_channels=True, output_zero=True), _pool_errors),
    OpInfo("adaptive_max_pool2d", F.adaptive_max_pool2d, "adaptive_max_pool2d",
           _pool_samples((3,), output_zero=True), _pool_errors),
    OpInfo("scaled_dot_product_attention", F.scaled_dot_product_attention, "scaled_dot_product_attention",
           _sdpa_samples, _sdpa_errors),
    OpInfo("cross_entropy", lambda x, t, **kw: F.cross_entropy(x, t.long(), **kw), "cross_entropy",
           _cross_entropy_samples, _cross_entropy_errors),
]
OPS += [OpInfo("conv_transpose2d", F.conv_transpose2d, "conv_transpose2d", _conv_transpose2d_samples),
        OpInfo("linear_cross_entropy", _linear_cross_entropy_torch, "linear_cross_entropy",
               _linear_cross_entropy_samples),
        OpInfo("zero_shot_logits", _zero_shot_torch, "zero_shot_logits", _zero_shot_samples),
        OpInfo("apply_rotary_emb", _rotate_half_torch, "apply_rotary_emb", _rope_samples),
        OpInfo("q_sample", _q_sample_torch, "q_sample", _q_sample_samples, _q_sample_errors)]
for _name, _kind, _kw in (("lstm", "LSTM", dict(num_layers=2)), ("gru", "GRU", dict(bidirectional=True)),
                          ("rnn_relu", "RNN", dict(nonlinearity="relu")), ("rnn_tanh", "RNN", {})):
    _fn, _torch_fn = _recurrent(_kind, **_kw)
    OPS.append(OpInfo(_name, _torch_fn, "rnn", _recurrent_samples, fn=_fn))
