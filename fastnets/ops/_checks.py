"""Input validation shared by every op: errors name the argument and say what was expected."""
from __future__ import annotations

import numbers

import torch

from .. import _config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, t, *, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    return t


def optional_param(op: str, name: str, t, *, like: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """weight / bias: None, or a float tensor of `shape` on `like`'s device."""
    if t is None:
        return None
    tensor(op, name, t)
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {like.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def norm_param(op: str, name: str, t, *, like: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """optional_param for a norm's weight / bias / running statistics, with torch's dtype rule:
    the input's dtype, or float32 beside a float16 / bfloat16 input (mixed precision). Any
    other mix (a float64 weight on a float32 input) torch rejects, and so does fastnets rather
    than casting it silently."""
    t = optional_param(op, name, t, like=like, shape=shape)
    if t is not None and t.dtype != like.dtype and not (
            t.dtype == torch.float32 and like.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{op}: {name} is {t.dtype} but input is {like.dtype}: it must be the input's dtype (or "
                        f"float32 beside float16 / bfloat16 input), as torch requires")
    return t


def number(op: str, name: str, v, *, min_value: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{op}: {name} must be >= {min_value}, got {v}")
    return float(v)


def normalized_shape(op: str, shape, input: torch.Tensor) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    elif isinstance(shape, torch.Size) or isinstance(shape, (list, tuple)):
        shape = tuple(shape)
    else:
        raise TypeError(f"{op}: normalized_shape must be an int or a sequence of ints, got {type(shape).__name__}")
    if not shape or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{op}: normalized_shape must be a non-empty sequence of non-negative ints, got {shape}")
    if input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        raise ValueError(f"{op}: normalized_shape {shape} does not match the trailing dims of input "
                         f"(shape {tuple(input.shape)})")
    return shape


def rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """View as (rows, cols) with unit column stride, copying only when the layout needs it."""
    t = t.reshape(-1, cols)
    return t if t.stride(-1) == 1 or cols <= 1 else t.contiguous()


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in NHWC order (and not also plain contiguous),
    else contiguous_format: the layout an op's output keeps."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def ints(op: str, name: str, v, n: int, min_value: int) -> tuple[int, ...]:
    """An int or a sequence of n ints (a 1-sequence broadcasts, as torch's _pair) as an n-tuple."""
    if isinstance(v, (tuple, list, torch.Size)) and len(v) == 1 and n > 1:
        v = v[0]
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (int(v),) * n
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) == n and all(
            isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v):
        v = tuple(int(e) for e in v)
    else:
        raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints, got {v!r}")
    if any(e < min_value for e in v):
        raise ValueError(f"{op}: {name} must be >= {min_value}, got {v}")
    return v


def autocast(*tensors, only_from_float32: bool = False):
    """The tensors cast to the autocast dtype when autocast is on for the first one's device
    (the op is on torch's lower-precision list: convolutions, matmuls, SDPA). float64 and
    None pass through; only_from_float32 casts only when the first tensor is float32 (SDPA)."""
    x = tensors[0]
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    if x.dtype not in ((torch.float32,) if only_from_float32 else (torch.float32, torch.float16, torch.bfloat16)):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.dtype != torch.float64 else t for t in tensors)


class IndexOutOfRangeError(IndexError, ValueError):
    """A user index outside its table: an IndexError, as torch raises for a table index (also a
    ValueError, the class fastnets raised before, so existing handlers keep working)."""


def host_checks(index: torch.Tensor) -> bool:
    """Whether a user index is validated on the host: CPU tensors (free), any tensor with
    FASTNETS_CHECK_INDICES=1 (one sync); never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return index.device.type == "cpu" or _config.check_indices()


def table_index(op: str, name: str, index: torch.Tensor, size: int, *, negative: bool = True,
                ignore: int | None = None) -> None:
    """Check that every entry of `index` picks a row of a `size`-row table, as torch indexing
    does (negative entries count from the end when `negative`; `ignore` is exempt), and raise
    IndexOutOfRangeError naming the argument otherwise.

    Checked on the host only where that is free: CPU tensors (a CUDA check would cost a
    device-to-host sync per call), or any tensor with FASTNETS_CHECK_INDICES=1. On CUDA the
    kernels never read outside the table: an out-of-range index loads row 0 and makes the
    outputs it feeds NaN (no host sync)."""
    if index.numel() == 0 or not host_checks(index):
        return
    idx = index.reshape(-1)
    if ignore is not None:
        idx = idx[idx != ignore]
        if idx.numel() == 0:
            return
    lo, hi = int(idx.min()), int(idx.max())
    low = -size if negative else 0
    if lo < low or hi >= size:
        bad = lo if lo < low else hi
        raise IndexOutOfRangeError(f"{op}: {name} holds {bad}, outside the table's {size} rows "
                                   f"([{low}, {size}){'' if ignore is None else f', or ignore_index={ignore}'})")
