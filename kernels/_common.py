"""Pieces every launcher uses: output allocation, accumulator dtype, program counts."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastnets import _config


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output. With FASTNETS_POISON=1 it starts NaN-filled, so an element
    the kernel forgot to write fails the comparison instead of passing on leftover memory."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _config.poison_outputs() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def acc_dtype(dtype: torch.dtype):
    """Kernels accumulate in float32 (float64 for float64 inputs, so gradcheck is exact)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gpu_launch(device: torch.device) -> bool:
    """True when a launch is compiled for a GPU (every launch heuristic asks this one
    question; the interpreter prefers other shapes). tests/aot_compile.py overrides it to
    compile the GPU launch shapes ahead of time on a machine without one."""
    return device.type == "cuda"


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """Program count for a persistent kernel: enough to fill the GPU, never more than the
    work. The interpreter runs programs one after another, so on CPU fewer is faster."""
    if gpu_launch(device):
        index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
        cap = sm_count(index) * per_sm
    else:
        cap = 4
    return max(1, min(cap, work_items))


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
