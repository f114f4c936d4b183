"""Builds fastnets, and fastnets._C from csrc/ when it can.

The CUDA extension is optional. It is built here only when torch is importable in the
build environment (``pip install --no-build-isolation``), torch is a CUDA build, and a
CUDA toolkit (nvcc) is found. Otherwise the pure Python/Triton package installs and one
line says why the extension was skipped; fastnets then JIT-builds it on first use of the
``cuda`` backend (see fastnets/_ext.py).

Installing never fails because of the extension: with a CUDA torch, nvcc and no visible GPU
(a build machine), the arch list defaults to sm_80 and sm_90 + PTX (torch would raise on an
empty one), and any failure while building the extension prints the same one-line skip.
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
    _default_arch_list(torch)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="fastnets._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
    return (ext, tolerant_build_ext(BuildExtension.with_options(use_ninja=True))), None


DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _default_arch_list(torch) -> None:
    """torch picks the arch list from the visible GPUs and raises when there are none; a
    build machine without a GPU gets Ampere and Hopper (+ PTX for later GPUs)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def _skip(reason) -> None:
    print(f"fastnets: CUDA extension skipped ({reason}); the Triton and torch backends work without it",
          file=sys.stderr)


def tolerant_build_ext(base):
    """`base` (a build_ext command class) whose extension build failing skips the extension
    (the package installs; fastnets JIT-builds it on first use of the cuda backend)."""

    class TolerantBuildExt(base):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:   # noqa: BLE001  (any compiler / toolchain failure)
                _skip(f"build failed: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
                self.extensions = []

    return TolerantBuildExt


def main() -> None:
    try:
        built, reason = _extension_or_reason()
    except Exception as err:   # noqa: BLE001  (a broken torch install must not break ours)
        built, reason = None, f"{type(err).__name__}: {err}"
    if built is None:
        _skip(reason)
        setup()
    else:
        ext, build_ext = built
        setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})


if __name__ == "__main__":
    main()
