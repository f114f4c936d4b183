"""Backend choice: defaults, FASTNETS_BACKEND, the context manager, the report, the CLI."""
import subprocess
import sys

import pytest
import torch

import fastnets
from fastnets import _dispatch, ops
from helpers import DEVICE, KERNEL_BACKEND, expect_backend


def test_default_backend_runs_kernels_here():
    with expect_backend("rms_norm", KERNEL_BACKEND):
        ops.rms_norm(torch.randn(2, 8, device=DEVICE), (8,))


def test_context_manager_forces_torch_and_restores():
    x = torch.randn(2, 8, device=DEVICE)
    with fastnets.backend("torch"), expect_backend("layer_norm", "torch"):
        ops.layer_norm(x, (8,))
    with expect_backend("layer_norm", KERNEL_BACKEND):
        ops.layer_norm(x, (8,))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend name must be one of"):
        with fastnets.backend("tpu"):
            pass


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTNETS_BACKEND", "torch")
    with expect_backend("bias_act", "torch"):
        ops.bias_act(torch.randn(3, 4, device=DEVICE))
    monkeypatch.setenv("FASTNETS_BACKEND", "warp")
    with pytest.raises(ValueError, match="FASTNETS_BACKEND"):
        ops.bias_act(torch.randn(3, 4, device=DEVICE))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks CPU-only dispatch rules")
def test_forcing_gpu_backends_on_cpu_tensors_is_a_clear_error():
    x = torch.randn(2, 4)
    with fastnets.backend("cuda"), pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        ops.bias_act(x)
    with fastnets.backend("triton"), expect_backend("bias_act", "interpret"):
        ops.bias_act(x)  # "triton" on a CPU tensor means the interpreter when it is on


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.explain("layer_norm", torch.device("cpu"))[0] == "torch"


def test_backend_report_lists_every_op():
    rows = fastnets.backend_report()
    assert {r["op"] for r in rows} >= {"layer_norm", "rms_norm", "group_norm", "bias_act"}
    assert all(r["backend"] in ("triton", "cuda", "interpret", "torch") and r["why"] for r in rows)
    assert next(r for r in rows if r["op"] == "bias_act")["cuda_kernel"]


def test_info_cli_runs():
    out = subprocess.run([sys.executable, "-m", "fastnets", "info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "layer_norm" in out and "fastnets._C" in out


def test_import_does_not_import_triton_or_touch_cuda():
    code = ("import sys, torch; torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('cuda queried'));"
            "import fastnets, fastnets.nn, fastnets.ops; assert 'triton' not in sys.modules, 'triton imported';"
            "assert 'fastnets._C' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# --- no silent fallback ----------------------------------------------------------------------------

@pytest.mark.parametrize("why, setup", [
    ("TRITON_INTERPRET=1", lambda mp: mp.setenv("TRITON_INTERPRET", "1")),
    ("triton is not installed", lambda mp: mp.setattr(_dispatch, "triton_available", lambda: False)),
])
def test_cuda_tensor_torch_fallbacks_warn_and_count(monkeypatch, why, setup):
    """A CUDA tensor that runs torch (no Triton, or the interpreter on) warns once, counts as
    a fallback and shows in backend_report(). The decision is made from the device type, so
    it is checked here without a GPU."""
    setup(monkeypatch)
    cuda = torch.device("cuda")
    before = _dispatch.fallbacks.copy()
    with pytest.warns(UserWarning, match=f"fastnets.layer_norm: running the torch reference .*{why}"):
        assert _dispatch.choose("layer_norm", cuda) == "torch"
    assert sum(_dispatch.fallbacks.values()) == sum(before.values()) + 1
    row = next(r for r in fastnets.backend_report(cuda) if r["op"] == "layer_norm")
    assert row["backend"] == "torch" and why in row["why"] and any(why in f for f in row["fallbacks_seen"])


def test_forced_torch_is_not_a_fallback(monkeypatch):
    before = sum(_dispatch.fallbacks.values())
    with fastnets.backend("torch"), expect_backend("rms_norm", "torch"):
        ops.rms_norm(torch.randn(2, 8, device=DEVICE), (8,))
    assert sum(_dispatch.fallbacks.values()) == before


def test_empty_inputs_count_as_torch():
    """No kernel launches for an empty tensor: the call counts as torch, what ran."""
    for op, run in [("layer_norm", lambda: ops.layer_norm(torch.randn(0, 8, device=DEVICE), (8,))),
                    ("bias_act", lambda: ops.bias_act(torch.randn(0, 8, device=DEVICE))),
                    ("conv2d", lambda: ops.conv2d(torch.randn(0, 3, 5, 5, device=DEVICE),
                                                  torch.randn(4, 3, 3, 3, device=DEVICE))),
                    ("max_pool2d", lambda: ops.max_pool2d(torch.randn(0, 3, 4, 4, device=DEVICE), 2))]:
        kernel = _dispatch.calls[(op, KERNEL_BACKEND)]
        with expect_backend(op, "torch"):
            out = run()
        assert out.numel() == 0 and _dispatch.calls[(op, KERNEL_BACKEND)] == kernel, op


def test_module_fallbacks_go_through_dispatch(monkeypatch):
    """nn.MultiheadAttention with add_bias_kv runs torch: warned, counted, reported."""
    mha = fastnets.nn.MultiheadAttention(8, 2, add_bias_kv=True).to(DEVICE)
    x = torch.randn(3, 2, 8, device=DEVICE)
    before = _dispatch.calls[("scaled_dot_product_attention", "torch")]
    with pytest.warns(UserWarning, match="add_bias_kv"):
        mha(x, x, x)
    assert _dispatch.calls[("scaled_dot_product_attention", "torch")] == before + 1
    row = next(r for r in fastnets.backend_report(DEVICE) if r["op"] == "scaled_dot_product_attention")
    assert any("add_bias_kv" in f for f in row["fallbacks_seen"])
