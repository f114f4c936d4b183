"""Install that never hurts: a plain wheel builds here without the CUDA extension and ships
kernels/ as fastnets.kernels plus the csrc/ sources; csrc/ compiles with this machine's
CUDA toolkit and host compiler."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_extension(tmp_path):
    env = dict(os.environ, FASTNETS_BUILD_EXT="0")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next(tmp_path.glob("fastnets-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ["fastnets/__init__.py", "fastnets/kernels/norm.py", "fastnets/kernels/activation.py",
                     "fastnets/csrc/bias_act.cu", "fastnets/csrc/fastnets.cpp", "fastnets/csrc/bias_act.h"]:
        assert expected in names, f"{expected} missing from the wheel"
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package must never ship"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    out = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}",
                          str(ROOT / "csrc" / "bias_act.cu"), "-o", str(tmp_path / "bias_act.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    out = subprocess.run(["c++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", *includes,
                          str(ROOT / "csrc" / "fastnets.cpp")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
