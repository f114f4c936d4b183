"""The persistent recurrent kernel: its dispatch by shape, the NVRTC program fastnets builds
from the device source (compiled here with nvcc for sm_80 and sm_90a, as NVRTC would for
those GPUs), and the shared-memory formula both sides use. Its numerics run on a GPU."""
import shutil
import subprocess

import pytest
import torch

from fastnets.ops import rnn_persistent as P

H100 = dict(sm_count=132, smem_limit=227 * 1024)


def test_plan_takes_small_batches_that_fit_on_chip():
    plan, why = P.plan("LSTM", 8, 1024, torch.float16, False, **H100)
    assert plan == {"block_j": 8, "grid": 128, "smem": P.smem_bytes("LSTM", 1024, 8, 2)}, why
    assert plan["smem"] < 100 * 1024
    # GRU and Elman cells, bf16 and fp32 at hidden 512.
    for mode in ("GRU", "RNN_TANH", "RNN_RELU"):
        for dtype in (torch.bfloat16, torch.float32):
            plan, why = P.plan(mode, 1, 512, dtype, False, **H100)
            assert plan is not None and plan["grid"] <= 132, (mode, dtype, why)


@pytest.mark.parametrize("args, reason", [
    (("LSTM", 8, 1024, torch.float16, True), "proj_size"),
    (("LSTM", 8, 256, torch.float64, False), "float64"),
    (("LSTM", 64, 256, torch.float16, False), "batch 64"),
    (("LSTM", 8, 4096, torch.float32, False), "shared memory"),
])
def test_plan_falls_back_to_the_per_step_path(args, reason):
    plan, why = P.plan(*args, **H100)
    assert plan is None and reason in why


def test_opt_in_until_measured(monkeypatch):
    monkeypatch.delenv("FASTNETS_RNN_PERSISTENT", raising=False)
    assert not P.wanted(None) and not P.wanted("triton") and P.wanted("cuda")
    with P.use_persistent():
        assert P.wanted(None)
        with P.use_persistent(False):
            assert not P.wanted("cuda")
    monkeypatch.setenv("FASTNETS_RNN_PERSISTENT", "1")
    assert P.wanted(None)
    monkeypatch.setenv("FASTNETS_RNN_PERSISTENT", "0")
    assert not P.wanted("cuda")


def test_runs_only_on_cuda_tensors():
    xg = torch.zeros(1, 3, 2, 28)
    assert P.maybe_run("LSTM", xg, torch.zeros(1, 2, 7), torch.zeros(1, 2, 7), torch.zeros(1, 28, 7), None, None,
                       None) is None


def test_nvrtc_source_is_self_contained():
    src = P.nvrtc_source()
    assert "#pragma once" not in src
    assert "rnn_persistent_fwd_kernel" in src
    names = P.name_expressions()
    assert len(names) == 12 and len(set(names)) == 12
    assert "fastnets::rnn::rnn_persistent_fwd_kernel<__nv_bfloat16, 1>" in names
    assert "--use_fast_math" in P.nvrtc_options()


def _instantiating_program() -> str:
    """The NVRTC program plus what NVRTC's name expressions do: take each kernel's address."""
    refs = ",\n".join(f"  reinterpret_cast<const void*>(&{n})" for n in P.name_expressions())
    return P.nvrtc_source() + f"\nconst void* fastnets_nvrtc_instances[] = {{\n{refs}\n}};\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_nvrtc_program_compiles_without_spills(tmp_path, arch):
    path = tmp_path / "rnn_persistent_nvrtc.cu"
    path.write_text(_instantiating_program())
    # No -I: NVRTC has no include path but its own fp16 / bf16 headers, and neither has nvcc here.
    out = subprocess.run(["nvcc", "-cubin", *P.nvrtc_options(), f"-arch={arch}", "-Xptxas", "-v",
                          str(path), "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = out.stderr
    assert report.count("Compiling entry function") == 12
    assert "0 bytes spill stores" in report and " bytes spill stores" not in report.replace("0 bytes spill stores", "")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_extension_source_compiles_for_ampere_and_hopper(tmp_path):
    root = P.header_path().parent
    for arch in ("sm_80", "sm_90a"):
        out = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", f"-arch={arch}", f"-I{root}",
                              str(root / "rnn_persistent.cu"), "-o", str(tmp_path / f"rnn_{arch}.o")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_python_shared_memory_formula_matches_the_device_source(tmp_path):
    """plan() sizes launches with a Python mirror of rnn::smem_bytes: run the C++ one (host
    code, no GPU needed) on the same cases."""
    cases = [(c, h, bj, e) for c in range(4) for h in (7, 33, 512, 1000) for bj in (1, 3, 8) for e in (2, 4)]
    body = "\n".join(f'  std::printf("%zu\\n", fastnets::rnn::smem_bytes({c}, {h}, {bj}, {e}));' for c, h, bj, e in cases)
    (tmp_path / "main.cu").write_text(f'#include <cstdio>\n#include "rnn_persistent.cuh"\nint main() {{\n{body}\n}}\n')
    exe = tmp_path / "smem"
    out = subprocess.run(["nvcc", "-std=c++17", f"-I{P.header_path().parent}", str(tmp_path / "main.cu"), "-o",
                          str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    modes = list(P.CELLS)
    assert got == [P.smem_bytes(modes[c], h, bj, e) for c, h, bj, e in cases]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the persistent kernel's numerics need a GPU")
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_persistent_matches_per_step_on_gpu(mode, dtype):
    """Same outputs (and so the same saved activations for the shared backward) as the
    per-step Triton path, with lengths, both directions."""
    import fastnets
    from fastnets import _dispatch, ops
    if P.runner(torch.device("cuda")) is None:
        pytest.skip("neither fastnets._C nor CuPy can run the persistent kernel here")
    torch.manual_seed(0)
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    kw = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    m = cls(48, 200, num_layers=2, bidirectional=True, **kw).cuda().to(dtype)
    x = torch.randn(50, 6, 48, device="cuda", dtype=dtype)
    lengths = torch.tensor([50, 3, 17, 50, 1, 29], device="cuda")
    before = _dispatch.calls[("rnn", "cuda")]
    with P.use_persistent():
        y, h = ops.rnn(mode, x, None, m._flat_weights, True, 2, 0.0, True, True, False, lengths=lengths)
    assert _dispatch.calls[("rnn", "cuda")] > before, "the persistent kernel did not run"
    with fastnets.backend("triton"):
        y_ref, h_ref = ops.rnn(mode, x, None, m._flat_weights, True, 2, 0.0, True, True, False, lengths=lengths)
    tol = {torch.float32: 2e-3,   # the per-step path runs TF32
           torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=tol, rtol=tol)
