"""Every Triton kernel specialization the launchers produce compiles for Hopper (sm_90),
checked ahead of time without a GPU (see aot_compile.py). The interpreter alone would not
catch compiler-only errors: this found a plain Python global read inside a jit function."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the whole suite compiles and runs the kernels")
def test_all_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).with_name("aot_compile.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "compiled" in out.stdout
