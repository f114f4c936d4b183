"""Pieces every launcher uses: output allocation, accumulator dtype, program counts."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fastnets import _config


@triton.jit
def table_row(index, size):
    """A user-supplied index into a `size`-row table, read as torch indexes (negative from the
    end): (the row to load, whether the index was in range). An out-of-range index loads row
    0 (never memory outside the table); the caller makes what it feeds NaN. The host checks
    CPU tensors (ops._checks.table_index), where that costs no sync."""
    index = tl.where(index < 0, index + size, index)
    ok = (index >= 0) & (index < size)
    return tl.where(ok, index, 0), ok


def empty(shape, *, dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Allocate a kernel output. With FASTNETS_POISON=1 it starts NaN-filled, so an element
    the kernel forgot to write fails the comparison instead of passing on leftover memory."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if _config.poison_outputs() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like_layout(t: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output shaped like t with last dim `last`, whose leading dims are laid out in t's
    stride order: (B, S, H, D) storage in gives (B, S, H, D) storage out."""
    lead = t.dim() - 1
    order = sorted(range(lead), key=lambda d: (-t.stride(d), d))
    shape = [t.shape[d] for d in order] + [last]
    out = empty(shape, dtype=dtype or t.dtype, device=t.device)
    inverse = [order.index(d) for d in range(lead)] + [lead]
    return out.permute(inverse)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in NHWC order (and not also plain contiguous),
    else contiguous_format: the layout a kernel output keeps."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def acc_dtype(dtype: torch.dtype):
    """Kernels accumulate in float32 (float64 for float64 inputs, so gradcheck is exact)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bf16_as_float32(data):
    """The interpreter keeps bfloat16 as its raw uint16 bits: widen to the float32 with the
    same value (a bf16 is the top half of that float32)."""
    import numpy as np
    return (data.astype(np.uint32) << 16).view(np.float32)


def fix_interpreter_bf16_dot() -> None:
    """Make the interpreter's tl.dot right for bfloat16 operands.

    Triton's interpreter multiplies bfloat16 operands as their raw uint16 bits (garbage).
    A bf16 tensor-core dot is bf16 products accumulated in float32, and a bf16 x bf16 product
    is exact in float32 (8 + 8 significant bits), so upcasting the operands to float32 first
    computes exactly what the GPU computes. Only the interpreter's dot is changed: compiled
    kernels, their source and the static report are untouched (zero cost on a GPU), and
    every kernel's bf16 path, today's and later ones, is testable on a CPU."""
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "fastnets_bf16", False):
        return

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_as_float32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_as_float32(b.data), tl.float32)
        return original(self, a, b, d, *args, **kwargs)

    create_dot.fastnets_bf16 = True
    builder.create_dot = create_dot


if _config.interpret_requested():
    fix_interpreter_bf16_dot()


# Launches on meta tensors are recorded, never run: fastnets.bench.launches drives every
# launcher on meta tensors and compiles what they would launch, ahead of time, on a machine
# without a GPU (the static kernel report). They take the GPU launch shapes, for an H100.
META_SM_COUNT = 132


_FORCED_TF32: list = []   # force_tf32()'s stack


@contextlib.contextmanager
def force_tf32():
    """Tests of the TF32 path on the interpreter: float32 dots take TF32 inside this block
    whatever the device (fastnets.kernels._common.float32_precision)."""
    _FORCED_TF32.append(True)
    try:
        yield
    finally:
        _FORCED_TF32.pop()


def float32_precision(dtype: torch.dtype, device: torch.device, allowed: bool) -> str:
    """"tf32" when a float32 dot may run on TF32 tensor cores, else "ieee". As torch: its flag
    for the op family says so (`allowed`: cudnn.allow_tf32 for convolutions and recurrent
    cells, cuda.matmul.allow_tf32 for matmul-shaped kernels) and the launch is for a GPU.
    torch never uses TF32 on CPU tensors, so neither does a kernel run by the interpreter on
    them, whatever the flag (default True for cuDNN) says; force_tf32() overrides for tests."""
    if dtype != torch.float32:
        return "ieee"
    if _FORCED_TF32 or (allowed and gpu_launch(device)):
        return "tf32"
    return "ieee"


def gpu_launch(device: torch.device) -> bool:
    """True when a launch is compiled for a GPU (every launch heuristic asks this one
    question; the interpreter prefers other shapes). Meta tensors stand for a GPU launch."""
    return device.type in ("cuda", "meta")


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """Program count for a persistent kernel: enough to fill the GPU, never more than the
    work. The interpreter runs programs one after another, so on CPU fewer is faster."""
    if device.type == "meta":
        cap = META_SM_COUNT * per_sm
    elif gpu_launch(device):
        cap = sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        cap = 4
    return max(1, min(cap, work_items))


def pointwise_config(numel: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for the flat pointwise kernels (bias_act, the sampler steps): 16 B
    per thread per access at 4 warps x 1024 elements keeps enough bytes in flight; 8 warps x
    2048 past 4M elements; the interpreter prefers big blocks."""
    if not gpu_launch(device):
        return 4096, 4
    return (2048, 8) if numel >= (1 << 22) else (1024, 4)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


# --- autotuning ---------------------------------------------------------------------------
# triton.autotune would benchmark on every launch shape inside the interpreter and cannot
# run on meta tensors (fastnets/bench/launches.py); this small tuner times the candidate configs
# once per (device, kernel, shape class), keeps the winner in memory and in a JSON file
# under FASTNETS_CACHE_DIR, so later processes skip the search.
_tuned: dict[str, int] = {}
_tuned_loaded = False


def _tune_file() -> str:
    import os
    return os.path.join(_config.cache_dir(), f"autotune-triton{triton.__version__}.json")


def _load_tuned() -> None:
    global _tuned_loaded
    if _tuned_loaded:
        return
    _tuned_loaded = True
    import json
    try:
        with open(_tune_file()) as f:
            _tuned.update(json.load(f))
    except (OSError, ValueError):
        pass


def _save_tuned() -> None:
    import json
    import os
    try:
        os.makedirs(os.path.dirname(_tune_file()), exist_ok=True)
        tmp = _tune_file() + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_tuned, f, indent=0, sort_keys=True)
        os.replace(tmp, _tune_file())
    except OSError:
        pass  # a read-only home only costs a re-tune next process


def tuned_launch(kernel, grid, configs: list[dict], key: tuple, device: torch.device, *args, **kwargs) -> None:
    """Launch kernel[grid(config)](*args, **kwargs, **config) with the fastest of `configs`.

    configs: dicts of the kernel's tile constexprs plus num_warps / num_stages. key: the
    shape class the choice is valid for. The kernel must be idempotent (write, never
    accumulate into, its outputs), since each candidate runs during the search."""
    if len(configs) == 1 or device.type == "meta":
        # meta: fastnets.bench.launches records every candidate's specialization.
        for cfg in configs:
            kernel[grid(cfg)](*args, **kwargs, **cfg)
        return
    _load_tuned()
    name = f"{torch.cuda.get_device_name(device)}|{kernel.__name__}|{key}"
    best = _tuned.get(name)
    if best is None or best >= len(configs):
        from triton.testing import do_bench
        times = []
        for cfg in configs:
            try:
                times.append(do_bench(lambda: kernel[grid(cfg)](*args, **kwargs, **cfg), warmup=5, rep=20))
            except Exception:  # a config that runs out of shared memory / registers is just not a candidate
                times.append(float("inf"))
        best = min(range(len(configs)), key=times.__getitem__)
        _tuned[name] = best
        _save_tuned()
    kernel[grid(configs[best])](*args, **kwargs, **configs[best])
