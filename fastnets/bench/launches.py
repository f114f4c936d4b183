"""Every Triton kernel specialization fastnets' launchers produce on a GPU, found without one.

The real launchers run on meta tensors (fastnets.kernels takes meta for a GPU launch: the
GPU tile heuristics, an H100's SM count, every tuner candidate). Each launch goes through
Triton's own JIT front end -- its binder specialises the arguments exactly as on a GPU:
integers equal to 1 become constants, integers divisible by 16 and 16-byte aligned pointers
(a meta tensor's data_ptr is its byte offset, so views keep their real alignment) get
divisibility hints -- and is stopped just before compilation and recorded. What was
recorded is then compiled by fastnets.bench.static.

This is the one driver of the launchers: the static report (`python -m fastnets kernels`)
and the test suite's compile check and gates all use it.

Must run with TRITON_INTERPRET unset when fastnets.kernels is first imported (the
interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch

ARCHS = {"sm_90a": 90, "sm_80": 80}
FLOAT_TYPES = ("fp16", "bf16", "fp32", "fp64")


@dataclasses.dataclass
class Launch:
    """One kernel specialization: what triton.compile needs, and where it came from."""

    fn: object                 # the JITFunction
    signature: dict            # {arg: "*bf16" | "i32" | "constexpr" ...}
    constexprs: dict           # {(index,): value}
    attrs: dict                # {(index,): [["tt.divisibility", 16]]}
    options: dict              # the backend options (num_warps, num_stages, ...)
    case: str                  # the first driver case that produced it
    key: str = ""              # identity of the specialization (kernel source hash included)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    @property
    def dtype(self) -> str:
        """Element type of the first floating-point pointer argument (the data the kernel reads)."""
        for ty in self.signature.values():
            if isinstance(ty, str) and ty.startswith("*") and ty[1:] in FLOAT_TYPES:
                return ty[1:]
        return "-"

    def constants(self) -> dict:
        """{name: value} of the constexprs, printable."""
        names = list(self.signature)
        out = {}
        for path, value in self.constexprs.items():
            name = names[path[0]] if len(path) == 1 else str(path)
            out[name] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
        return out


class _AOTDriver:
    """Stands in for Triton's CUDA driver while launches are recorded: it names a target and
    a device key (one per arch, so Triton's per-device binder caches never mix targets)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"aot-sm{arch}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")


def _options_identity(options: dict) -> str:
    """The compile options as part of a specialization's identity, without the machine's
    paths (extern_libs names libdevice by its absolute path in this environment): the same
    kernel has the same identity in any checkout or virtualenv."""
    import os
    clean = dict(options)
    if clean.get("extern_libs"):
        clean["extern_libs"] = tuple((name, os.path.basename(path)) for name, path in clean["extern_libs"])
    return repr(sorted(clean.items()))


@contextlib.contextmanager
def _recording(arch: int, sink: dict, case_ref: list):
    """Route JIT launches into `sink` instead of compiling and running them."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        ident = (self.__name__, self.cache_key, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                 repr(sorted(attrs.items())), _options_identity(options.__dict__))
        if ident not in sink:
            sink[ident] = Launch(self, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                                 case_ref[0])
        return None   # no kernel: JITFunction.run returns before launching anything

    previous = driver._active   # None until first used; reading .active would look for a GPU
    saved = JITFunction._do_compile
    driver.set_active(_AOTDriver(arch))
    JITFunction._do_compile = record
    try:
        yield
    finally:
        JITFunction._do_compile = saved
        driver._active = previous


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# --- the cases: every launcher, over the dtypes, layouts and options users reach ----------------------

def _norm_cases(case):
    from fastnets.kernels import norm
    # 1000 and 20000: rows whose width is no power of two; 20000 takes the chunked kernels.
    for dtype, n, is_rms, affine in itertools.product(DTYPES, (64, 1000, 1024, 8192, 20000), (False, True),
                                                      (True, False)):
        case(f"row_norm N={n}")
        x = meta(4096, n, dtype=dtype)
        w = meta(n, dtype=dtype) if affine else None
        b = meta(n, dtype=dtype) if affine and not is_rms else None
        _, mean, rstd = norm.row_norm_fwd(x, w, b, 1e-5, is_rms, 0.0)
        norm.row_norm_bwd(meta(4096, n, dtype=dtype), x, w, b is not None, mean, rstd, is_rms, 0.0)
    for dtype in (torch.bfloat16, torch.float16):  # float32 weights with 16-bit activations
        case("row_norm mixed precision")
        x, w = meta(8, 1024, dtype=dtype), meta(1024)
        _, mean, rstd = norm.row_norm_fwd(x, w, w, 1e-5, False)
        norm.row_norm_bwd(meta(8, 1024, dtype=dtype), x, w, True, mean, rstd, False)
    for dtype, shape, silu, affine in itertools.product(DTYPES, ((2, 320, 4096), (64, 16, 1), (3, 96, 49)),
                                                        (False, True), (True, False)):
        case(f"group_norm {shape}")
        x = meta(*shape, dtype=dtype)
        w = meta(shape[1], dtype=dtype) if affine else None
        _, mean, rstd = norm.group_norm_fwd(x, 8, w, w, 1e-5, silu)
        norm.group_norm_bwd(meta(*shape, dtype=dtype), x, 8, w, w, mean, rstd, silu)


def _activation_cases(case):
    from fastnets.kernels import activation
    names = list(activation.ACTIVATIONS) + list(activation.GATED)
    for name, dtype, has_bias, cols in itertools.product(names, DTYPES, (True, False), (4096, 1000)):
        case(f"bias_act {name} C={cols}")
        x = meta(8192, cols, dtype=dtype)
        b = meta(cols, dtype=dtype) if has_bias else None
        y = activation.bias_act_fwd(x, b, name, 0.01)
        activation.bias_act_bwd(meta(*y.shape, dtype=dtype), x, b, name, 0.01)


# (label, x shape, weight shape, stride, padding, groups): the convolutions of ResNets, VGG,
# DCGAN and 1-D models. 14x14 and 7x7 maps give NCHW strides that are not multiples of 16.
CONV_SHAPES = (
    ("3x3 s1", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    ("3x3 s2", (32, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1),
    ("3x3 7x7map", (32, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
    ("1x1", (32, 256, 14, 14), (1024, 256, 1, 1), 1, 0, 1),
    ("7x7 stem", (32, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
    ("depthwise 3x3", (32, 96, 28, 28), (96, 1, 3, 3), 1, 1, 96),
    ("conv1d k5", (16, 128, 1, 1000), (256, 128, 1, 5), 1, 2, 1),
)
LAYOUTS = (("nchw", lambda t: t), ("channels_last", cl))


def _conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


@contextlib.contextmanager
def _tf32(flag: str, enabled: bool):
    """torch.backends.cudnn.allow_tf32 (convolutions) or .cuda.matmul.allow_tf32 (attention)."""
    owner = torch.backends.cudnn if flag == "cudnn" else torch.backends.cuda.matmul
    before = owner.allow_tf32
    owner.allow_tf32 = enabled
    try:
        yield
    finally:
        owner.allow_tf32 = before


def _precisions(dtype):
    """float32 runs with TF32 tensor cores or in IEEE float32, as torch's flags say: both."""
    return (True, False) if dtype == torch.float32 else (False,)


def _conv_cases(case):
    for dtype in DTYPES:
        for tf32 in _precisions(dtype):
            with _tf32("cudnn", tf32):
                _conv_dtype_cases(case, dtype, " tf32" if tf32 else "")


def _conv_dtype_cases(case, dtype, precision):
    from fastnets.kernels import conv
    for (layout, f), (label, xs, ws, s, p, g) in itertools.product(LAYOUTS, CONV_SHAPES):
        if xs[2] == 1 and layout == "channels_last":
            continue   # conv1d runs on a (N, C, 1, L) view of a contiguous tensor
        stride = (1, s) if xs[2] == 1 else (s, s)
        pad = (0, p) if xs[2] == 1 else (p, p)
        out = (_conv_out(xs[2], ws[2], stride[0], pad[0]), _conv_out(xs[3], ws[3], stride[1], pad[1]))
        x, w = f(meta(*xs, dtype=dtype)), meta(*ws, dtype=dtype)
        K = ws[0]
        b = meta(K, dtype=dtype)
        res = f(meta(xs[0], K, *out, dtype=dtype))
        tag = f"conv {label} {layout}{precision}"
        # Epilogues: a ResNet block (bias + residual + ReLU), conv + bias + ReLU (VGG), a bare
        # conv, and a training-time conv + bias + SiLU that also stores the pre-activation.
        for act, residual, bias, store_z in (("relu", res, b, False), ("relu", None, b, False),
                                             ("identity", None, None, False), ("silu", None, b, True)):
            case(f"{tag} fwd {act}{' + residual' if residual is not None else ''}")
            y, _ = conv.conv2d_fwd(x, w, bias, residual, stride, pad, (1, 1), g, out, act, 0.0, store_z)
        case(f"{tag} dgrad")
        conv.conv2d_dgrad(y, w, tuple(x.shape), stride, pad, (1, 1), g, like=x)
        case(f"{tag} conv_transpose2d fwd (dgrad + bias + relu)")
        conv.conv2d_dgrad(y, w, tuple(x.shape), stride, pad, (1, 1), g, bias=meta(xs[1], dtype=dtype),
                          activation="relu", like=x)
        case(f"{tag} wgrad")
        conv.conv2d_wgrad(y, x, ws, stride, pad, (1, 1), g, True, dtype)
        conv.conv2d_wgrad(y, x, ws, stride, pad, (1, 1), g, False, dtype)


def _bn_pool_cases(case):
    from fastnets.kernels import batchnorm, pool
    for dtype, (layout, f), act in itertools.product(DTYPES, LAYOUTS, ("identity", "relu")):
        case(f"batch_norm {layout} {act}")
        x = f(meta(32, 64, 28, 28, dtype=dtype))
        mean, var = batchnorm.batch_stats(x)
        scale = meta(64, dtype=mean.dtype)
        y = batchnorm.bn_apply(x, scale, scale, act, 0.0)
        for training in (True, False):   # eval: frozen-BN fine-tuning, saliency maps
            batchnorm.bn_bwd(y, x, scale, scale, mean, var, training, act, 0.0)
    for dtype, (layout, f) in itertools.product(DTYPES, LAYOUTS):
        x = f(meta(32, 64, 56, 56, dtype=dtype))
        for kwargs, out in ((dict(is_max=True, adaptive=False, store_idx=True), (28, 28)),
                            (dict(is_max=False, adaptive=False), (28, 28)),
                            (dict(is_max=False, adaptive=False, count_include_pad=False, divisor_override=3), (28, 28)),
                            (dict(is_max=False, adaptive=True), (1, 1)),
                            (dict(is_max=True, adaptive=True, store_idx=True), (7, 7))):
            case(f"pool {layout} {'max' if kwargs['is_max'] else 'avg'}{' adaptive' if kwargs['adaptive'] else ''}")
            y, idx = pool.pool2d_fwd(x, out, (3, 3), (2, 2), (1, 1), (1, 1), **kwargs)
            kwargs.pop("store_idx", None)
            pool.pool2d_bwd(y, idx, tuple(x.shape), layout == "channels_last", (3, 3), (2, 2), (1, 1), (1, 1),
                            **kwargs)


def _attention_cases(case):
    from fastnets.kernels import attention
    from fastnets.ops.attention import UNBOUNDED as U

    def run(q, k, v, mask=None, slopes=None, cu=None, max_s=1024, right=U, left=U, dropout=0.0, backward=True):
        seed = meta(1, dtype=torch.int64) if dropout else None
        max_k = max_s if cu is not None else k.shape[-2]
        o, lse = attention.flash_attn_fwd(q, k, v, mask, slopes, cu, cu, max_s, max_k, 0.1, left, right, True,
                                          dropout, seed)
        if backward:
            attention.flash_attn_bwd(o, q, k, v, o, lse, mask, slopes, cu, cu, max_s, max_k, 0.1, left, right, True,
                                     dropout, seed, mask is not None and mask.dtype != torch.bool)

    for dtype in DTYPES:
        for tf32 in _precisions(dtype):
            with _tf32("matmul", tf32):
                _attention_dtype_cases(case, run, U, dtype, " tf32" if tf32 else "")
    case("attention dropout mask")
    attention.dropout_keep_mask(meta(1, dtype=torch.int64), 8, 128, 128, 0.1, torch.device("meta"))


def _attention_dtype_cases(case, run, U, dtype, precision):
    # Every head dim the op accepts a model to use, causal or not; S = 1000 gives sequence
    # lengths that are not multiples of 16.
    for D, causal, S in itertools.product((16, 32, 64, 80, 96, 128, 256), (False, True), (1024, 1000)):
        if S == 1000 and D not in (64, 128):
            continue
        case(f"attention d={D} {'causal' if causal else 'full'} S={S}{precision}")
        q = meta(4, 16, S, D, dtype=dtype)
        run(q, q, q, max_s=S, right=0 if causal else U)
    # Options, at one head dim of each tile class (<= 64, <= 128, 256).
    for D in (64, 128, 256):
        _attention_option_cases(case, run, U, dtype, D, f" d={D}{precision}")


def _attention_option_cases(case, run, U, dtype, D, tag):
    q, kv = meta(4, 16, 1024, D, dtype=dtype), meta(4, 4, 1024, D, dtype=dtype)
    case(f"attention GQA 4:1 causal{tag}")
    run(q, kv, kv, right=0)
    case(f"attention bool mask{tag}")
    run(q, q, q, mask=meta(4, 1, 1024, 1024, dtype=torch.bool).expand(4, 16, 1024, 1024))
    case(f"attention additive mask with grad{tag}")
    run(q, q, q, mask=meta(1, 16, 1024, 1024, dtype=dtype).expand(4, 16, 1024, 1024))
    case(f"attention ALiBi + sliding window{tag}")
    run(q, q, q, slopes=meta(16), right=0, left=256)
    case(f"attention dropout{tag}")
    run(q, q, q, dropout=0.1, right=0)
    case(f"attention bshd layout{tag}")
    t = meta(4, 1024, 16, D, dtype=dtype).transpose(1, 2)
    run(t, t, t, right=0)
    case(f"attention varlen (thd){tag}")
    packed = meta(8192, 16, D, dtype=dtype)
    run(packed, packed, packed, cu=meta(9, dtype=torch.int32), max_s=2048, right=0)
    if D == 64:
        case(f"attention Dv != D{tag}")
        run(meta(4, 16, 1024, 64, dtype=dtype), meta(4, 16, 1024, 64, dtype=dtype), meta(4, 16, 1024, 128, dtype=dtype))
    if D == 128 and dtype != torch.float64:   # decode: the split-key path (float64 takes the flash path)
        case(f"attention decode GQA 8:1{tag}")
        run(meta(8, 32, 1, 128, dtype=dtype), meta(8, 4, 8192, 128, dtype=dtype),
            meta(8, 4, 8192, 128, dtype=dtype), backward=False)
        case(f"attention decode 4 queries, mask + ALiBi{tag}")
        run(meta(1, 32, 4, 128, dtype=dtype), meta(1, 8, 8190, 128, dtype=dtype), meta(1, 8, 8190, 128, dtype=dtype),
            mask=meta(1, 1, 1, 8190, dtype=torch.bool).expand(1, 32, 4, 8190), slopes=meta(32), right=0,
            backward=False)


def _transformer_cases(case):
    from fastnets.kernels import loss, rope
    for dtype in DTYPES:
        case("rope")
        cos = meta(4096, 64)
        x = meta(4, 32, 2048, 128, dtype=dtype)
        for interleaved, conj in ((False, False), (True, True)):
            rope.rope(x, cos, cos, None, 0, interleaved, conj)
        case("rope partial, position_ids, bshd")
        rope.rope(meta(4, 2048, 32, 80, dtype=dtype).transpose(1, 2), meta(4096, 20), meta(4096, 20),
                  meta(4, 2048, dtype=torch.int64), 0, False, False)
        case("rope full per-token tables (Hugging Face's)")
        hf_cos = meta(4, 2048, 128, dtype=dtype)
        for conj in (False, True):
            rope.rope(x, hf_cos, hf_cos, None, 0, False, conj, True)
        for vocab in (50257, 32000):
            case(f"cross_entropy V={vocab}")
            logits, t = meta(4096, vocab, dtype=dtype), meta(4096, dtype=torch.int64)
            for weight in (None, meta(vocab)):
                wsum = meta(1) if weight is not None else None
                _, lse = loss.cross_entropy_fwd(logits, t, weight, wsum, -100, 0.1, 1e-4)
                loss.cross_entropy_bwd(meta(4096), logits, t, weight, wsum, lse, -100, 0.1, 1e-4)
                loss.cross_entropy_fwd_grad_(logits, t, weight, wsum, meta(1), -100, 0.0, 0.0)


def _rnn_cases(case):
    from fastnets.kernels import rnn
    # Hidden 256 / 1024 (the benchmark's), 130 (no multiple of 16), batch 8 (one 16-row
    # tile) and 64; bidirectional (both directions per launch) or not; with lengths (packed
    # sequences) and LSTM's projection.
    for dtype in DTYPES:
        for tf32 in _precisions(dtype):
            with _tf32("cudnn", tf32):
                tag = " tf32" if tf32 else ""
                for mode, H, B, lengths, proj in itertools.product(
                        ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"), (256, 1024, 130), (8, 64), (False, True), (0, 128)):
                    if proj and (mode != "LSTM" or H == 130):
                        continue
                    D = 2 if lengths else 1
                    case(f"rnn {mode} H={H} B={B} D={D}{' lengths' if lengths else ''}{f' proj={proj}' if proj else ''}"
                         f"{tag}")
                    G = rnn.GATES[mode]
                    K = proj or H
                    xg = meta(D, 2, B, G * H, dtype=dtype)
                    h0 = meta(D, B, K, dtype=dtype)
                    c0 = meta(D, B, H) if mode == "LSTM" else None
                    w_hh = meta(D, G * H, K, dtype=dtype)
                    b_hn = meta(D, H, dtype=dtype) if mode == "GRU" else None
                    w_hr = meta(D, proj, H, dtype=dtype) if proj else None
                    lens = meta(B, dtype=torch.int64) if lengths else None
                    hbuf, cbuf, save, hraw = rnn.recurrence_fwd(mode, xg, h0, c0, w_hh, b_hn, w_hr, lens)
                    rnn.recurrence_bwd(mode, meta(D, 3, B, K, dtype=dtype),
                                       meta(D, B, H) if c0 is not None else None, w_hh, w_hr, hbuf, cbuf, save, hraw,
                                       lens)


def _diffusion_cases(case):
    from fastnets.kernels import diffusion
    # The sampler step's flag sets the schedulers and fastnets.diffusion.sample launch: DDIM /
    # Euler / DPM++ (no noise), DDPM / DDIM eta / Euler a / SDE (noise), DPM++ 2M (history,
    # with and without noise), guidance (and rescale), clipping, thresholding, learned variance;
    # at the benchmark's 64x4x128x128 latents (8 warps x 2048) and a batch-1 64x64 latent.
    # (flags, write x0): the schedulers' step() returns x0 (DPM-Solver does not); sample() does not.
    combos = ((dict(), (False, True)), (dict(clip=True), (True,)), (dict(clip=True, noise=True), (True,)),
              (dict(noise=True), (False, True)), (dict(hist=True), (False,)), (dict(noise=True, hist=True), (False,)),
              (dict(cfg=True), (False, True)), (dict(cfg=True, hist=True), (False,)),
              (dict(cfg=True, noise=True), (False,)), (dict(cfg=True, rescale=True), (True,)),
              (dict(thresh=True, noise=True), (True,)), (dict(var="learned", noise=True, clip=True), (True,)),
              (dict(var="learned_range", noise=True, clip=True), (True,)))
    flat = [(combo, x0) for combo, x0s in combos for x0 in x0s]
    for dtype, shape, (combo, x0) in itertools.product(DTYPES, ((64, 4, 128, 128), (1, 4, 64, 64)), flat):
        case(f"sampler_step {shape} {sorted(combo.items())} x0={x0}")
        B, C = shape[0], shape[1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = meta(*shape, dtype=dtype)
        var = combo.get("var", "none")
        m = meta(2 * B if combo.get("cfg") else B, 2 * C if var != "none" else C, *shape[2:], dtype=dtype)
        diffusion.sampler_step(x, m, meta(50, diffusion.N_COEFS, dtype=acc), meta(1, dtype=torch.int32),
                               meta(*shape, dtype=dtype) if combo.get("noise") else None,
                               meta(*shape, dtype=acc) if combo.get("hist") else None,
                               meta(B) if combo.get("thresh") else None, meta(B) if combo.get("rescale") else None,
                               7.5 if combo.get("cfg") else None, 1.0 if combo.get("clip") else None, var, x0, dtype)
    for dtype, target in itertools.product(DTYPES, ("none", "v_prediction")):
        case(f"q_sample {target}")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x0 = meta(64, 4, 64, 64, dtype=dtype)
        t, table = meta(64, dtype=torch.int64), meta(1000, 2, dtype=acc)
        diffusion.q_sample_fwd(x0, meta(64, 4, 64, 64, dtype=dtype), t, table, target)
        diffusion.q_sample_bwd(meta(64, 4, 64, 64, dtype=dtype),
                               meta(64, 4, 64, 64, dtype=dtype) if target != "none" else None, t, table)
    for dtype, dim, flip, tdtype in itertools.product(DTYPES, (320, 128, 33), (False, True),
                                                      (torch.int64, torch.float32)):
        case(f"timestep_embedding dim={dim}")
        diffusion.timestep_embedding(meta(64, dtype=tdtype), meta(dim // 2), dim, 1.0, flip, dtype)


def _vae_cases(case):
    from fastnets.kernels import vae
    # An SD-VAE latent (8 moments channels, 64x64) and an odd one; eps given or drawn in the
    # kernel; sample, KL or both; every backward input combination.
    for dtype, shape, has_eps, (ws, wk) in itertools.product(DTYPES, ((16, 8, 64, 64), (3, 10, 7, 9)), (True, False),
                                                             ((True, True), (True, False), (False, True))):
        if not ws and has_eps:
            continue
        case(f"gaussian {shape} eps={has_eps} sample={ws} kl={wk}")
        m = meta(*shape, dtype=dtype)
        half = (shape[0], shape[1] // 2) + shape[2:]
        eps = meta(*half, dtype=dtype) if has_eps else None
        seed = None if has_eps else meta(1, dtype=torch.int64)
        vae.gaussian_fwd(m, eps, seed, -30.0, 20.0, ws, wk)
        vae.gaussian_bwd(m, eps if ws else None, seed if ws else None, meta(*half, dtype=dtype) if ws else None,
                         meta(shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                         if wk else None, -30.0, 20.0)


def _gan_cases(case):
    from fastnets.kernels import gan
    # Logits of a batch (64) and of a PatchGAN map (16x1x30x30); every kind and target, the
    # per-element form and the reduced one; the penalty's squared norm on images.
    for dtype, n, kind, (real, generator), elementwise in itertools.product(
            DTYPES, (64, 16 * 900), tuple(gan.KINDS), ((True, False), (False, False), (True, True)), (False, True)):
        case(f"gan_loss {kind} n={n}")
        gan.gan_loss(meta(n, dtype=dtype), kind, real, generator, 0.9, elementwise, 1.0 / n)
    for dtype, shape in itertools.product(DTYPES, ((64, 3, 256, 256), (5, 3, 7, 9))):
        case(f"sq_norm {shape}")
        g = meta(*shape, dtype=dtype)
        gan.sq_norm(g)
        gan.sq_norm_bwd(g, meta(shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32))


def _upfirdn_cases(case):
    from fastnets.kernels import upfirdn
    # StyleGAN2 256x256 resampling (4-tap filter: up 2 / down 2 / filter only; each one's
    # backward is another of them) and StyleGAN3's filtered_lrelu (12-tap up 2 with bias and
    # the lrelu epilogue, 12-tap down 2; backward: up 2 with the lrelu' epilogue, down 2).
    for dtype in DTYPES:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for label, hw, up, down, k, pad0, out in (("up2", 64, 2, 1, 4, 2, 128), ("down2", 128, 1, 2, 4, 1, 64),
                                                  ("fir", 64, 1, 1, 4, 2, 64)):
            case(f"upfirdn2d {label} 16x256x{hw}x{hw}")
            upfirdn.upfirdn2d(meta(16, 256, hw, hw, dtype=dtype), meta(k, k, dtype=acc), (up, up), (down, down),
                              (pad0, pad0), (out, out))
        case("filtered_lrelu 16x256x64x64 up2 down2 12-tap")
        x, mid, y = meta(16, 256, 64, 64, dtype=dtype), meta(16, 256, 138, 138, dtype=dtype), meta(16, 256, 64, 64,
                                                                                                  dtype=dtype)
        g = meta(12, 12, dtype=acc)
        upfirdn.upfirdn2d(x, g, (2, 2), (1, 1), (10, 10), (138, 138), bias=meta(256, dtype=dtype), epilogue="lrelu",
                          clamp=256.0)
        upfirdn.upfirdn2d(mid, g, (1, 1), (2, 2), (0, 0), (64, 64))
        upfirdn.upfirdn2d(y, g, (2, 2), (1, 1), (11, 11), (138, 138), epilogue="lrelu_bwd", saved=mid, clamp=256.0)
        upfirdn.upfirdn2d(mid, g, (1, 1), (2, 2), (1, 1), (64, 64))


def _contrastive_cases(case):
    from fastnets.kernels import contrastive
    # CLIP at batch 32k x 512 (the benchmark), a distributed rank (4k local rows against
    # 32k gathered columns, positives offset), a ragged small one; both kinds, with and without
    # SigLIP's bias; float32 with and without TF32.
    for dtype, (m, n, d, off), kind, tf32 in itertools.product(
            DTYPES, ((32768, 32768, 512, 0), (4096, 32768, 768, 8192), (333, 333, 40, 0)), (0, 1), (False, True)):
        if tf32 and dtype != torch.float32:
            continue
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for bias in ((None,) if kind == 0 else (None, meta(1, dtype=torch.float32))):
            case(f"clip_loss kind={kind} {m}x{n}x{d} tf32={tf32}")
            with _tf32("matmul", tf32):
                a, b, s = meta(m, d, dtype=dtype), meta(n, d, dtype=dtype), meta(1, dtype=torch.float32)
                contrastive.clip_loss_stats(a, b, s, bias, kind, off)
                contrastive.clip_loss_bwd(meta(1, dtype=acc), a, b, s, bias, meta(m, dtype=acc), meta(n, dtype=acc),
                                          kind, off)
    # The zero-shot head: ImageNet's 1000 classes at CLIP's 512 dims and a ragged one; the
    # classifier as zero_shot_classifier stacks it (D, C) and as its transpose's view.
    for dtype, (b, d, c), normalize, transposed, tf32 in itertools.product(
            DTYPES, ((1024, 512, 1000), (37, 40, 70)), (True, False), (False, True), (False, True)):
        if tf32 and dtype != torch.float32:
            continue
        case(f"zero_shot_logits {b}x{d}x{c} normalize={normalize} transposed={transposed} tf32={tf32}")
        with _tf32("matmul", tf32):
            w = meta(c, d, dtype=dtype).t() if transposed else meta(d, c, dtype=dtype)
            contrastive.zero_shot_logits(meta(b, d, dtype=dtype), w, meta(1, dtype=torch.float32), normalize)


FAMILIES = {
    "norm": _norm_cases,
    "activation": _activation_cases,
    "conv": _conv_cases,
    "bn_pool": _bn_pool_cases,
    "attention": _attention_cases,
    "transformer": _transformer_cases,
    "rnn": _rnn_cases,
    "diffusion": _diffusion_cases,
    "vae": _vae_cases,
    "gan": _gan_cases,
    "upfirdn": _upfirdn_cases,
    "contrastive": _contrastive_cases,
}


def record(arch: str = "sm_90a", families=None) -> list[Launch]:
    """Drive the launchers and return every distinct kernel specialization, in driver order."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    from fastnets import _config
    if _config.interpret_requested():
        raise RuntimeError("recording launches needs the compiled kernels: unset TRITON_INTERPRET before "
                           "fastnets.kernels is imported (python -m fastnets kernels does this)")
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    sink: dict = {}
    case_ref = [""]

    def case(label):
        case_ref[0] = label

    with _recording(ARCHS[arch], sink, case_ref):
        for name, drive in FAMILIES.items():
            if families and name not in families:
                continue
            drive(lambda label, name=name: case(f"{name}: {label}"))
    launches = list(sink.values())
    import hashlib
    for launch, ident in zip(launches, sink):
        launch.key = hashlib.sha256(("\0".join(ident) + "\0" + arch).encode()).hexdigest()[:24]
    return launches
