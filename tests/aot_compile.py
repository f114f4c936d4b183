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

from fastnets.kernels import _common, activation, norm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32"}

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


def main() -> int:
    drive_launchers()
    start, failures = time.perf_counter(), []
    for (name, *_), (fn, signature, constexprs, options) in sorted(launches.items(), key=lambda kv: kv[0][0]):
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)
            assert compiled.asm.get("cubin"), "no cubin produced"
        except Exception as exc:  # report every failing specialization, not just the first
            consts = {k: str(v) for k, v in constexprs.items()}
            failures.append(f"{name} {consts} {options}: {type(exc).__name__}: {str(exc)[:600]}")
    print(f"compiled {len(launches) - len(failures)}/{len(launches)} kernel specializations for sm_90 "
          f"in {time.perf_counter() - start:.0f} s")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
