"""Compile every Triton kernel specialization fastnets' launchers produce, for Hopper
(sm_90), ahead of time on a machine without a GPU.

The interpreter runs kernels as numpy and accepts code the real compiler rejects (type
mismatches across branches or loop iterations, bad constexpr use, register blow-ups that
fail ptxas). This drives the real launchers with the GPU launch heuristics on meta tensors,
intercepts each launch, and runs triton.compile -> PTX -> cubin (Triton's bundled ptxas).

    python tests/aot_compile.py            # exit 0 when every specialization compiles
"""
import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastnets.kernels import _common, activation, attention, batchnorm, conv, loss, norm, pool, rope  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}

_common.gpu_launch = lambda device: True   # the GPU launch shapes, on meta tensors
_common.sm_count = lambda index: 132       # an H100's SM count
launches = {}


def _record(self, *args, grid, warmup, **kwargs):
    values = dict(zip(self.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in self.params:
        v = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[param.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[param.name] = "i1"
        elif isinstance(v, int):
            signature[param.name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: cannot type argument {param.name}={v!r}")
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    key = (self.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
           tuple(options.items()))
    launches.setdefault(key, (self, signature, constexprs, options))


JITFunction.run = _record


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def drive_launchers():
    """Every launcher, over the dtypes and options users reach."""
    for dtype, n, is_rms, affine in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16, torch.float64), (64, 1024, 8192, 20000),
            (False, True), (True, False)):
        x = meta(4096, n, dtype=dtype)
        w = meta(n, dtype=dtype) if affine else None
        b = meta(n, dtype=dtype) if affine and not is_rms else None
        y, mean, rstd = norm.row_norm_fwd(x, w, b, 1e-5, is_rms, 0.0)
        norm.row_norm_bwd(meta(4096, n, dtype=dtype), x, w, b is not None, mean, rstd, is_rms, 0.0)
    x, w = meta(8, 1024, dtype=torch.bfloat16), meta(1024)  # mixed precision weights
    _, mean, rstd = norm.row_norm_fwd(x, w, w, 1e-5, False)
    norm.row_norm_bwd(meta(8, 1024, dtype=torch.bfloat16), x, w, True, mean, rstd, False)
    for dtype, shape, silu, affine in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16, torch.float64), ((2, 320, 4096), (64, 16, 1)),
            (False, True), (True, False)):
        x = meta(*shape, dtype=dtype)
        w = meta(shape[1], dtype=dtype) if affine else None
        y, mean, rstd = norm.group_norm_fwd(x, 8, w, w, 1e-5, silu)
        norm.group_norm_bwd(meta(*shape, dtype=dtype), x, 8, w, w, mean, rstd, silu)
    names = list(activation.ACTIVATIONS) + list(activation.GATED)
    for name, dtype, has_bias in itertools.product(names, (torch.bfloat16, torch.float32), (True, False)):
        x = meta(8192, 4096, dtype=dtype)
        b = meta(4096, dtype=dtype) if has_bias else None
        y = activation.bias_act_fwd(x, b, name, 0.01)
        activation.bias_act_bwd(meta(*y.shape, dtype=dtype), x, b, name, 0.01)
    for dtype in (torch.float16, torch.float64):
        x, b = meta(64, 256, dtype=dtype), meta(256, dtype=dtype)
        for name in ("gelu", "swiglu"):
            y = activation.bias_act_fwd(x, b, name, 0.01)
            activation.bias_act_bwd(meta(*y.shape, dtype=dtype), x, b, name, 0.01)


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


_all_configs = conv.gemm_configs


def _configs_for_aot(device, rows, cols, red, dtype):
    # Every candidate tile for bf16 (the dtype the benchmarks tune); the first for the other
    # dtypes, which differ only in element type -- this keeps the check inside CI's budget.
    configs = _all_configs(device, rows, cols, red, dtype)
    return configs if dtype == torch.bfloat16 else configs[:1]


def drive_cnn_launchers():
    """conv (every bf16 tile candidate the tuner may pick), batch_norm and pooling."""
    conv.gemm_configs = _configs_for_aot
    for dtype, layout in itertools.product((torch.bfloat16, torch.float16, torch.float32, torch.float64),
                                           (False, True)):
        if dtype in (torch.float32, torch.float64) and layout:
            continue
        f = cl if layout else (lambda t: t)
        x, w = f(meta(32, 64, 28, 28, dtype=dtype)), meta(128, 64, 3, 3, dtype=dtype)
        b = meta(128, dtype=dtype)
        res = f(meta(32, 128, 14, 14, dtype=dtype))
        for act, residual, bias, store_z in (("relu", res, b, False), ("identity", None, None, False),
                                             ("silu", None, b, True)):
            y, _ = conv.conv2d_fwd(x, w, bias, residual, (2, 2), (1, 1), (1, 1), 1, (14, 14), act, 0.0, store_z)
        conv.conv2d_dgrad(y, w, tuple(x.shape), (2, 2), (1, 1), (1, 1), 1, like=x)
        conv.conv2d_dgrad(y, w, tuple(x.shape), (2, 2), (1, 1), (1, 1), 1, bias=meta(64, dtype=dtype),
                          activation="relu", like=x)
        conv.conv2d_wgrad(y, x, tuple(w.shape), (2, 2), (1, 1), (1, 1), 1, True, dtype)
        if dtype == torch.bfloat16:  # stem (3 channels, 7x7) and depthwise shapes
            xs = f(meta(32, 3, 224, 224, dtype=dtype))
            ys, _ = conv.conv2d_fwd(xs, meta(64, 3, 7, 7, dtype=dtype), None, None, (2, 2), (3, 3), (1, 1), 1,
                                    (112, 112), "relu", 0.0, False)
            conv.conv2d_wgrad(ys, xs, (64, 3, 7, 7), (2, 2), (3, 3), (1, 1), 1, False, dtype)
            wd = meta(64, 1, 3, 3, dtype=dtype)
            yd, _ = conv.conv2d_fwd(x, wd, None, None, (1, 1), (1, 1), (1, 1), 64, (28, 28), "identity", 0.0, False)
            conv.conv2d_dgrad(yd, wd, tuple(x.shape), (1, 1), (1, 1), (1, 1), 64, like=x)
            conv.conv2d_wgrad(yd, x, (64, 1, 3, 3), (1, 1), (1, 1), (1, 1), 64, False, dtype)
    for dtype, layout, act in itertools.product((torch.bfloat16, torch.float32, torch.float64),
                                                (False, True), ("identity", "relu")):
        x = meta(32, 64, 28, 28, dtype=dtype)
        x = cl(x) if layout else x
        mean, var = batchnorm.batch_stats(x)
        scale = meta(64, dtype=mean.dtype)
        y = batchnorm.bn_apply(x, scale, scale, act, 0.0)
        batchnorm.bn_bwd(y, x, scale, scale, mean, var, True, act, 0.0)
    for dtype, layout in itertools.product((torch.bfloat16, torch.float32, torch.float64), (False, True)):
        x = meta(32, 64, 56, 56, dtype=dtype)
        x = cl(x) if layout else x
        for kwargs, out in ((dict(is_max=True, adaptive=False, store_idx=True), (28, 28)),
                            (dict(is_max=False, adaptive=False), (28, 28)),
                            (dict(is_max=False, adaptive=False, count_include_pad=False, divisor_override=3), (28, 28)),
                            (dict(is_max=False, adaptive=True), (1, 1)), (dict(is_max=True, adaptive=True, store_idx=True),
                                                                          (7, 7))):
            y, idx = pool.pool2d_fwd(x, out, (3, 3), (2, 2), (1, 1), (1, 1), **kwargs)
            kwargs.pop("store_idx", None)
            pool.pool2d_bwd(y, idx, tuple(x.shape), layout, (3, 3), (2, 2), (1, 1), (1, 1), **kwargs)


_fwd_configs, _bwd_configs = attention.fwd_configs, attention.bwd_configs


def drive_attention_launchers():
    """Flash attention: every tile candidate for bf16 at head dim 128 (what the benchmarks
    tune), the first candidate for the other dtypes, head dims and options."""
    state = {"all": False}
    attention.fwd_configs = lambda *a: _fwd_configs(*a) if state["all"] else _fwd_configs(*a)[:1]
    attention.bwd_configs = lambda *a: _bwd_configs(*a) if state["all"] else _bwd_configs(*a)[:1]
    from fastnets.ops.attention import UNBOUNDED as U

    def run(q, k, v, mask=None, slopes=None, cu=None, max_s=1024, right=U, left=U, dropout=0.0, bottom_right=True):
        seed = meta(1, dtype=torch.int64) if dropout else None
        o, lse = attention.flash_attn_fwd(q, k, v, mask, slopes, cu, cu, max_s, max_s if cu is not None else k.shape[-2],
                                          0.1, left, right, bottom_right, dropout, seed)
        if q.shape[-2] > 16 or cu is not None:
            attention.flash_attn_bwd(o, q, k, v, o, lse, mask, slopes, cu, cu, max_s,
                                     max_s if cu is not None else k.shape[-2], 0.1, left, right, bottom_right, dropout,
                                     seed, mask is not None and mask.dtype != torch.bool)

    for dtype, D in itertools.product((torch.bfloat16, torch.float16, torch.float32, torch.float64), (64, 128, 256)):
        # fp32 (IEEE dots) and fp64 compile slowly: one head dim each keeps the check in CI's budget.
        if (dtype in (torch.float32, torch.float64) and D != 64) or (dtype == torch.float16 and D != 128):
            continue
        state["all"] = dtype == torch.bfloat16 and D == 128
        q = meta(4, 16, 1024, D, dtype=dtype)
        for causal in (False, True):
            run(q, q, q, right=0 if causal else U)
    state["all"] = False
    bf = torch.bfloat16
    q, kv = meta(4, 16, 1024, 128, dtype=bf), meta(4, 4, 1024, 128, dtype=bf)
    run(q, kv, kv, right=0)                                                          # GQA
    run(q, q, q, mask=meta(4, 1, 1024, 1024, dtype=torch.bool).expand(4, 16, 1024, 1024))
    run(q, q, q, mask=meta(1, 16, 1024, 1024, dtype=bf).expand(4, 16, 1024, 1024))    # additive, with its grad
    run(q, q, q, slopes=meta(16), right=0, left=256)                                 # ALiBi + sliding window
    run(q, q, q, dropout=0.1, right=0)
    run(meta(4, 16, 1024, 80, dtype=bf), meta(4, 16, 1024, 80, dtype=bf), meta(4, 16, 1024, 80, dtype=bf))
    packed = meta(8192, 16, 128, dtype=bf)
    run(packed, packed, packed, cu=meta(9, dtype=torch.int32), max_s=2048, right=0)  # varlen
    for dtype in (bf, torch.float16, torch.float32):                                 # decode, GQA 8:1
        run(meta(8, 32, 1, 128, dtype=dtype), meta(8, 4, 8192, 128, dtype=dtype), meta(8, 4, 8192, 128, dtype=dtype))
    run(meta(1, 32, 4, 128, dtype=bf), meta(1, 8, 8192, 128, dtype=bf), meta(1, 8, 8192, 128, dtype=bf),
        mask=meta(1, 1, 1, 8192, dtype=torch.bool).expand(1, 32, 4, 8192), slopes=meta(32), right=0)
    attention.dropout_keep_mask(meta(1, dtype=torch.int64), 8, 128, 128, 0.1, torch.device("meta"))


def drive_transformer_launchers():
    """Rotary embedding and the cross-entropy kernels."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        cos = meta(4096, 64)
        x = meta(4, 32, 2048, 128, dtype=dtype)
        for interleaved, conj in ((False, False), (True, True)):
            rope.rope(x, cos, cos, None, 0, interleaved, conj)
        rope.rope(meta(4, 2048, 32, 80, dtype=dtype).transpose(1, 2), meta(4096, 20), meta(4096, 20),
                  meta(4, 2048, dtype=torch.int64), 0, False, False)
        logits, t = meta(4096, 50257, dtype=dtype), meta(4096, dtype=torch.int64)
        for weight in (None, meta(50257)):
            wsum = meta(1) if weight is not None else None
            _, lse = loss.cross_entropy_fwd(logits, t, weight, wsum, -100, 0.1, 1e-4)
            loss.cross_entropy_bwd(meta(4096), logits, t, weight, wsum, lse, -100, 0.1, 1e-4)
            loss.cross_entropy_fwd_grad_(logits, t, weight, wsum, meta(1), -100, 0.0, 0.0)


def _compile(index: int):
    (name, *_), (fn, signature, constexprs, options) = _items[index]
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)
        assert compiled.asm.get("cubin"), "no cubin produced"
        return None
    except Exception as exc:  # report every failing specialization, not just the first
        consts = {k: str(v) for k, v in constexprs.items()}
        return f"{name} {consts} {options}: {type(exc).__name__}: {str(exc)[:600]}"


_items: list = []


def main() -> int:
    import multiprocessing
    drive_launchers()
    drive_cnn_launchers()
    drive_attention_launchers()
    drive_transformer_launchers()
    _items.extend(sorted(launches.items(), key=lambda kv: kv[0][0]))
    start = time.perf_counter()
    # Forked workers inherit the recorded launches; compiles are independent and CPU-bound.
    with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        failures = [f for f in pool.map(_compile, range(len(_items)), chunksize=1) if f]
    print(f"compiled {len(_items) - len(failures)}/{len(_items)} kernel specializations for sm_90 "
          f"in {time.perf_counter() - start:.0f} s")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
