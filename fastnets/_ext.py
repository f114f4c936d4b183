"""fastnets._C, the optional CUDA extension: prebuilt by setup.py, or JIT-built on first use.

Nothing here runs at import. `status()` says whether the extension can be used without
building anything; `load()` imports or builds it and raises a clear error when it cannot.
"""
from __future__ import annotations

import glob
import importlib
import os

import torch

from . import _config

_module = None


def _sources() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        files = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "*.cu")))
        if files:
            return files
    return []


def _prebuilt():
    try:
        return importlib.import_module("fastnets._C")
    except ImportError:
        return None


def status() -> tuple[bool, str]:
    if _module is not None:
        return True, "loaded"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if _prebuilt() is not None:
        return True, "prebuilt fastnets._C"
    if not _config.build_extension_allowed():
        return False, "not prebuilt and FASTNETS_BUILD_EXT=0"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False, "not prebuilt and no CUDA toolkit (nvcc) for a JIT build"
    if not _sources():
        return False, "not prebuilt and the csrc/ sources are missing"
    return True, "JIT-built on first use (takes a minute once, then cached)"


def load():
    """The extension module; JIT-builds it with ninja into FASTNETS_CACHE_DIR if needed."""
    global _module
    if _module is not None:
        return _module
    ok, why = status()
    if not ok:
        raise RuntimeError(f"fastnets CUDA extension unavailable: {why}")
    module = _prebuilt()
    if module is None:
        from torch.utils.cpp_extension import load as jit_load
        build_dir = os.path.join(_config.cache_dir(), f"ext-torch{torch.__version__}-cu{torch.version.cuda}")
        os.makedirs(build_dir, exist_ok=True)
        module = jit_load(name="fastnets_C", sources=_sources(), build_directory=build_dir,
                          extra_cflags=["-O3"],
                          extra_cuda_cflags=["-O3", "-lineinfo"])
    _module = module
    return module
