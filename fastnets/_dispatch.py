"""Backend choice: one decision per op call, recorded so tests can prove which ran.

Order of precedence: `fastnets.backend(...)` context > FASTNETS_BACKEND > the default
(CUDA tensor -> triton, CPU tensor with TRITON_INTERPRET=1 -> interpret, else torch).

Every time torch runs where a fastnets kernel was asked for (a CUDA tensor without Triton,
an input a kernel does not take, a module option only torch implements) goes through
`choose(..., unsupported=)` or `fallback()`: it warns once per (op, reason), counts in
`calls` and `fallbacks`, and shows in backend_report(). Only a backend forced to torch
runs torch without a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
from collections import Counter

import torch

from . import _config

# Stack of backends forced by `backend(...)`. A plain module global rather than a
# ContextVar: torch.compile cannot trace ContextVar.get, but it reads module globals and
# guards on them, so entering a different `backend(...)` block recompiles correctly.
_forced_stack: list[str] = []

# (op, backend) -> number of calls; tests assert the kernel really ran.
calls: Counter = Counter()
# (op, reason) -> number of calls that ran torch in place of a kernel.
fallbacks: Counter = Counter()


@dataclasses.dataclass(frozen=True)
class OpInfo:
    name: str
    summary: str
    has_cuda: bool  # fastnets._C implements it


OPS: dict[str, OpInfo] = {}


def register_op(name: str, summary: str, has_cuda: bool = False) -> None:
    OPS[name] = OpInfo(name, summary, has_cuda)


@contextlib.contextmanager
def backend(name: str):
    """Force one backend inside a ``with`` block: ``with fastnets.backend("torch"): ...``."""
    if name not in _config.BACKENDS:
        raise ValueError(f"backend name must be one of {', '.join(_config.BACKENDS)}, got {name!r}")
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """True when fastnets' kernels are (or will be) Triton-interpreted on the CPU."""
    return triton_available() and _config.interpret_requested()


_warned: set = set()


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def fallback(op: str, reason: str) -> None:
    """Record (and warn once about) one call of `op` that runs torch's implementation in
    place of fastnets' kernel, for a reason found above the kernel layer (a module option)."""
    warn_once((op, reason), f"fastnets.{op}: running torch's implementation ({reason})")
    if not torch.compiler.is_compiling():
        calls[(op, "torch")] += 1
        fallbacks[(op, reason)] += 1


def _default(op: str, device: torch.device, unsupported: str | None) -> tuple[str, str]:
    if unsupported:
        return "torch", f"kernel does not support this input: {unsupported}"
    if device.type == "cuda":
        if triton_available() and not _config.interpret_requested():
            return "triton", "CUDA tensor"
        if not triton_available():
            return "torch", "triton is not installed"
        return "torch", "TRITON_INTERPRET=1 runs kernels on the CPU only; CUDA tensors use torch"
    if device.type == "cpu" and interpreter_active():
        return "interpret", "CPU tensor and TRITON_INTERPRET=1"
    return "torch", f"{device.type} tensor: fastnets' kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"


def forced_backend() -> str | None:
    """The backend forced by the innermost `backend(...)` block, else FASTNETS_BACKEND, else None."""
    return (_forced_stack[-1] if _forced_stack else None) or _config.forced_backend()


def explain(op: str, device: torch.device, unsupported: str | None = None) -> tuple[str, str]:
    """(backend, why) for one call of `op` on `device`; raises if a forced backend cannot run."""
    forced = forced_backend()
    if forced is None or forced == "torch":
        return _default(op, device, unsupported) if forced is None else ("torch", "forced")
    if unsupported:
        return "torch", f"forced {forced}, but the kernel does not support this input: {unsupported}"
    if forced == "interpret":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'interpret' needs CPU tensors, got a {device.type} tensor")
        if not interpreter_active():
            raise RuntimeError(f"{op}: backend 'interpret' needs TRITON_INTERPRET=1 (or FASTNETS_BACKEND="
                               "interpret) set before fastnets' kernels are first imported")
        return "interpret", "forced"
    if forced == "triton":
        if device.type == "cpu" and interpreter_active():
            return "interpret", "forced triton on a CPU tensor: Triton interpreter"
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
        return "triton", "forced"
    # forced == "cuda"
    if device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got a {device.type} tensor")
    info = OPS.get(op)
    if info is None or not info.has_cuda:
        return "triton", "forced cuda, but fastnets._C has no kernel for this op: Triton"
    from . import _ext
    ok, why = _ext.status()
    if not ok:
        raise RuntimeError(f"{op}: backend 'cuda' forced but the extension is unavailable: {why}")
    return "cuda", "forced"


def choose(op: str, device: torch.device, unsupported: str | None = None, *, empty: bool = False) -> str:
    """The backend for one call of `op` on `device`. unsupported: why the kernel cannot take
    this input (None when it can). A torch result that was not forced is a fallback.
    empty: the input has no elements, so no kernel launches and torch makes the (empty)
    result: counted as torch, which is what ran, without a warning."""
    name, why = explain(op, device, unsupported)
    if empty:
        if not torch.compiler.is_compiling():
            calls[(op, "torch")] += 1
        return "torch"
    forced = forced_backend()
    if name == "torch" and forced != "torch":
        warn_once((op, why), f"fastnets.{op}: running the torch reference ({why})")
        if not torch.compiler.is_compiling():
            fallbacks[(op, why)] += 1
    if not torch.compiler.is_compiling():
        calls[(op, name)] += 1
    return name


def backend_report(device: str | torch.device | None = None) -> list[dict]:
    """Which backend each op will use for tensors on `device` (default: cuda if present, else cpu), and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rows = []
    for name in sorted(OPS):
        try:
            chosen, why = explain(name, device)
        except (ValueError, RuntimeError) as err:
            chosen, why = "error", str(err)
        seen = sorted(f"{reason} ({n} calls)" for (op, reason), n in fallbacks.items() if op == name)
        rows.append({"op": name, "device": str(device), "backend": chosen, "why": why,
                     "cuda_kernel": OPS[name].has_cuda, "summary": OPS[name].summary,
                     "fallbacks_seen": seen})
    return rows
