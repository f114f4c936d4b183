"""The persistent recurrent kernel (csrc/rnn_persistent.cuh): when it runs, and how it is built.

One launch runs a whole layer-direction: each CTA keeps its G*BJ rows of W_hh in shared
memory across all steps and the CTAs meet at a grid barrier between steps. It wins where the
per-step path is bound by launches and weight rereads: small batches. It writes exactly the
buffers the per-step Triton path writes (hseq, cseq, saved activations), so the backward
(fastnets/kernels/rnn.py) is shared.

One device source, three ways to run it, tried in this order:
1. fastnets._C, prebuilt by setup.py or JIT-built with ninja on first use where nvcc exists
   (fastnets/_ext.py), launched cooperatively (a grid that cannot be resident at once fails
   to launch instead of deadlocking);
2. CuPy's RawModule (NVRTC) where no toolkit exists: the same .cuh text compiled at run time
   for the GPU in use, launched (cooperatively) on torch's current stream with the tensors'
   pointers. CuPy is optional (`pip install fastnets[cupy]`);
3. neither: the per-step Triton path.

Dispatch (`plan`) takes it for: no proj_size, fp16 / bf16 / fp32, batch <= MAX_BATCH, and
W_hh slices that fit in shared memory with at most one CTA per SM. Until its numerics and
speed are measured on a GPU (none was available when it was written) it is opt-in: the
default backend runs the per-step Triton path, and the persistent kernel runs where the
shape fits when asked for: `FASTNETS_RNN_PERSISTENT=1`, `with use_persistent():`, or the
backend forced to "cuda". `FASTNETS_RNN_PERSISTENT=0` or `use_persistent(False)` always
refuses it; the backend forced to "triton" never takes it. The benchmark times it as
"fastnets-persistent" beside the per-step path, which is how the default will be chosen.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .. import _config, _dispatch

CELLS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
SAVED = {"LSTM": 4, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}
CTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
# The batch up to which one launch per sequence beats one per step: each CTA's per-step
# work grows with the batch on CUDA cores, while the per-step path's tensor-core tiles fill.
MAX_BATCH = 16

runs: dict = {"cuda_ext": 0, "nvrtc": 0}   # tests on a GPU assert which runner ran


def header_path() -> Path:
    here = Path(__file__).resolve().parent.parent
    for root in (here / "csrc", here.parent / "csrc"):
        if (root / "rnn_persistent.cuh").exists():
            return root / "rnn_persistent.cuh"
    raise FileNotFoundError("csrc/rnn_persistent.cuh is missing from this installation")


@functools.lru_cache(maxsize=None)
def _constants() -> dict:
    """kThreads and kBB as the device source defines them (one definition, read from it)."""
    text = header_path().read_text()
    return {name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1)) for name in ("kThreads", "kBB")}


def smem_bytes(mode: str, H: int, block_j: int, elem: int) -> int:
    """rnn::smem_bytes of the .cuh: W_hh rows + one staged state chunk (16-aligned) + gate sums."""
    bb = _constants()["kBB"]
    offset = (GATES[mode] * block_j + bb) * H * elem
    offset = (offset + 15) // 16 * 16
    return offset + GATES[mode] * block_j * bb * 4


def plan(mode: str, B: int, H: int, dtype: torch.dtype, proj: bool, sm_count: int,
         smem_limit: int) -> tuple[Optional[dict], str]:
    """(launch plan, why): the plan is None when the persistent kernel does not take this shape."""
    if proj:
        return None, "proj_size (the projection is a GEMM per step)"
    if dtype not in CTYPES:
        return None, f"{dtype} (float64 takes the per-step path)"
    if B > MAX_BATCH:
        return None, f"batch {B} > {MAX_BATCH}: the per-step tensor-core path is faster"
    block_j = max(1, math.ceil(H / sm_count))
    grid = math.ceil(H / block_j)
    smem = smem_bytes(mode, H, block_j, torch.empty((), dtype=dtype).element_size())
    if smem > smem_limit:
        return None, f"W_hh slice needs {smem} B of shared memory per CTA > {smem_limit}"
    return {"block_j": block_j, "grid": grid, "smem": smem}, "fits"


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, int(optin)


_override: list = []   # use_persistent() blocks, innermost last (a module global, like _dispatch's stack)


@contextlib.contextmanager
def use_persistent(enabled: bool = True):
    """Ask for the persistent kernel where the shape fits (True), or refuse it (False), inside
    a ``with`` block; overrides FASTNETS_RNN_PERSISTENT."""
    _override.append(bool(enabled))
    try:
        yield
    finally:
        _override.pop()


def wanted(forced_backend: Optional[str]) -> bool:
    """Whether this call asks for the persistent kernel (see the module docstring)."""
    if _override:
        return _override[-1]
    env = os.environ.get("FASTNETS_RNN_PERSISTENT", "")
    if env in ("0", "1"):
        return env == "1"
    return forced_backend == "cuda"


# --- runners -------------------------------------------------------------------------------------------

def nvrtc_source() -> str:
    """The program NVRTC compiles: the .cuh as is (no includes beyond CUDA's fp16 / bf16
    headers, which NVRTC ships), without the include guard."""
    text = header_path().read_text()
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", text)
    unexpected = set(includes) - {"cuda_fp16.h", "cuda_bf16.h"}
    if unexpected:
        raise RuntimeError(f"rnn_persistent.cuh includes {sorted(unexpected)}, which NVRTC cannot resolve")
    return text.replace("#pragma once\n", "")


def name_expression(dtype: torch.dtype, mode: str) -> str:
    return f"fastnets::rnn::rnn_persistent_fwd_kernel<{CTYPES[dtype]}, {CELLS[mode]}>"


def name_expressions() -> list[str]:
    return [name_expression(d, m) for d in CTYPES for m in CELLS]


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options; CuPy adds the architecture of the device it compiles for."""
    return ("-std=c++17", "--use_fast_math")


def _cupy():
    try:
        import cupy
        return cupy
    except Exception:   # noqa: BLE001  (not installed, or installed for another CUDA)
        return None


@functools.lru_cache(maxsize=None)
def _nvrtc_module(index: int):
    cupy = _cupy()
    with cupy.cuda.Device(index):
        return cupy.RawModule(code=nvrtc_source(), options=nvrtc_options(), name_expressions=name_expressions(),
                              enable_cooperative_groups=True)


def runner(device: torch.device) -> Optional[str]:
    """"cuda_ext", "nvrtc" or None: which build of the kernel can run here."""
    from .. import _ext
    ok, _ = _ext.status()
    if ok:
        return "cuda_ext"
    if _cupy() is not None:
        return "nvrtc"
    return None


def _launch_nvrtc(mode, xg, h0, c0, w_hh, b_hn, lengths, hseq, cseq, save, barrier, block_j, grid, smem, reverse):
    import numpy as np
    cupy = _cupy()
    index = xg.device.index if xg.device.index is not None else torch.cuda.current_device()
    kernel = _nvrtc_module(index).get_function(name_expression(xg.dtype, mode))
    kernel.max_dynamic_shared_size_bytes = smem

    def ptr(t):
        return np.uint64(t.data_ptr() if t is not None else 0)

    T, B, _ = xg.shape
    H = w_hh.shape[1]
    barrier.zero_()
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(xg.device).cuda_stream)
    with cupy.cuda.Device(index), stream:
        kernel((grid,), (_constants()["kThreads"],),
               (ptr(xg), ptr(h0), ptr(c0), ptr(w_hh), ptr(b_hn), ptr(lengths), ptr(hseq), ptr(cseq), ptr(save),
                ptr(barrier), np.int32(T), np.int32(B), np.int32(H), np.int32(block_j), np.int32(int(reverse))),
               shared_mem=smem)


def maybe_run(mode: str, xg: torch.Tensor, h0: torch.Tensor, c0, w_hh: torch.Tensor, b_hn, w_hr, lengths):
    """The forward recurrence of one layer on the persistent kernel (one launch per direction),
    or None where it does not apply (then the caller runs the per-step path). Takes and
    returns the per-step path's stacked tensors (a leading direction dim; direction 1 runs
    backwards in time) and buffers."""
    if xg.device.type != "cuda" or _config.interpret_requested():
        return None
    forced = _dispatch.forced_backend()
    if forced == "triton" or not wanted(forced):
        return None
    index = xg.device.index if xg.device.index is not None else torch.cuda.current_device()
    sm_count, smem_limit = _device_limits(index)
    D, T, B, GH = xg.shape
    H = GH // GATES[mode]
    chosen, _ = plan(mode, B, H, xg.dtype, w_hr is not None, sm_count, smem_limit)
    how = runner(xg.device) if chosen is not None else None
    if how is None:
        return None
    from ..kernels._common import empty
    # The per-step path's buffers: (T+1) state slots with h0 / c0 in slot 0 (slot T in reverse).
    hbuf = empty((D, T + 1, B, H), dtype=xg.dtype, device=xg.device)
    cbuf = empty((D, T + 1, B, H), dtype=torch.float32, device=xg.device) if mode == "LSTM" else None
    save = empty((D, T, B, SAVED[mode] * H), dtype=xg.dtype, device=xg.device)
    stream = torch.cuda.current_stream(xg.device).cuda_stream
    for d in range(D):
        first = T if d else 0
        hbuf[d, first] = h0[d]
        hseq = hbuf[d, :T] if d else hbuf[d, 1:]
        cseq = c_init = None
        if cbuf is not None:
            cbuf[d, first] = c0[d]
            cseq = cbuf[d, :T] if d else cbuf[d, 1:]
            c_init = cbuf[d, first]
        barrier = torch.zeros(2, dtype=torch.int32, device=xg.device)
        args = (xg[d], hbuf[d, first], c_init, w_hh[d].contiguous(), b_hn[d] if b_hn is not None else None, lengths,
                hseq, cseq, save[d], barrier)
        if how == "cuda_ext":
            from .. import _ext
            _ext.load().rnn_persistent_fwd(*args, CELLS[mode], chosen["block_j"], d == 1, stream)
        else:
            _launch_nvrtc(mode, *args, chosen["block_j"], chosen["grid"], chosen["smem"], d == 1)
    runs[how] += 1
    if not torch.compiler.is_compiling():
        _dispatch.calls[("rnn", "cuda")] += 1
    return hbuf, cbuf, save, None
