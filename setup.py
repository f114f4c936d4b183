"""Builds fastnets, and fastnets._C from csrc/ when it can.

The CUDA extension is optional. It is built here only when torch is importable in the
build environment (``pip install --no-build-isolation``), torch is a CUDA build, and a
CUDA toolkit (nvcc) is found. Otherwise the pure Python/Triton package installs and one
line says why the extension was skipped; fastnets then JIT-builds it on first use of the
``cuda`` backend (see fastnets/_ext.py).
"""
import glob
import os
import sys

from setuptools import setup


def _extension_or_reason():
    if os.environ.get("FASTNETS_BUILD_EXT", "1") == "0":
        return None, "FASTNETS_BUILD_EXT=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build env (use pip --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit (nvcc) found"
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="fastnets._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None


built, reason = _extension_or_reason()
if built is None:
    print(f"fastnets: CUDA extension skipped ({reason}); the Triton and torch backends work without it",
          file=sys.stderr)
    setup()
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
