"""Every FASTNETS_* environment variable is read here and nowhere else.

FASTNETS_BACKEND    force one backend for every op: torch | triton | cuda | interpret
FASTNETS_POISON     1: fill every output buffer a launcher allocates with NaN before the
                    kernel runs (the test-suite sets this; an unwritten element then shows)
FASTNETS_BUILD_EXT  0: never build/JIT-build the CUDA extension (read by setup.py too)
FASTNETS_CHECK_INDICES  1: check user indices (step indices, timesteps) of CUDA tensors on the
                    host too, raising IndexError as for CPU tensors (one sync per call)
FASTNETS_CACHE_DIR  where the JIT-built extension, the tuner's choices and the static kernel
                    report's compile results are cached (default ~/.cache/fastnets)
FASTNETS_TRITON36_PATH  a folder holding Triton 3.6 (pip install --target), the Triton of the
                    lent GPU machines: the test suite compiles every kernel with it too
FASTNETS_VISION_PATH  a folder holding torchvision and timm (pip install --target): the test
                    session puts it on sys.path for the swap tests on their models
"""
from __future__ import annotations

import os

BACKENDS = ("triton", "cuda", "interpret", "torch")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def forced_backend() -> str | None:
    name = os.environ.get("FASTNETS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTNETS_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def interpret_requested() -> bool:
    """True when Triton kernels are (or will be) built by Triton's CPU interpreter."""
    return _truthy(os.environ.get("TRITON_INTERPRET"))


def poison_outputs() -> bool:
    return _truthy(os.environ.get("FASTNETS_POISON"))


def build_extension_allowed() -> bool:
    return os.environ.get("FASTNETS_BUILD_EXT", "1") != "0"


def check_indices() -> bool:
    """FASTNETS_CHECK_INDICES=1: validate user indices of CUDA tensors on the host too (one
    device-to-host sync per call; for debugging). CPU tensors are always checked."""
    return _truthy(os.environ.get("FASTNETS_CHECK_INDICES"))


def compat_triton_path() -> str | None:
    return os.environ.get("FASTNETS_TRITON36_PATH") or None


def vision_path() -> str | None:
    return os.environ.get("FASTNETS_VISION_PATH") or None


def cache_dir() -> str:
    return os.environ.get("FASTNETS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastnets")


# FASTNETS_BACKEND=interpret must take effect before triton decorates any kernel, and
# `import fastnets` never imports triton itself, so setting the variable here suffices.
if os.environ.get("FASTNETS_BACKEND", "").strip().lower() == "interpret":
    os.environ.setdefault("TRITON_INTERPRET", "1")
