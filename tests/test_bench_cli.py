"""`python -m fastnets bench --quick` runs end to end here and writes its results, and the
results file carries what ARCHITECTURE.md asks (device, versions, commit, command, timings
with median and spread)."""
import json
import subprocess
import sys

import torch


def test_bench_quick_runs_and_writes_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastnets", "bench", "--quick", "--ops", "layer_norm", "bias_act_swiglu",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    name = "cpu-functional" if not torch.cuda.is_available() else None
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and (name is None or files[0].stem == name)
    result = json.loads(files[0].read_text())
    env = result["environment"]
    assert {"device", "torch", "triton", "git_commit", "command"} <= set(env)
    rows = result["results"]
    assert {r["op"] for r in rows} == {"layer_norm", "bias_act_swiglu"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd"}
    assert all(r["error"] is None and r["ms_median"] > 0 and r["ms_p20"] <= r["ms_p80"] for r in rows)
    assert (tmp_path / "norm.png").exists() and (tmp_path / "activation.png").exists()
    if not torch.cuda.is_available():
        assert "FUNCTIONAL RUN" in out.stdout


def _case(impls, dtype=torch.float32):
    from fastnets.bench.harness import Case
    return Case("norm", "toy", "4x8", 8, dtype, lambda dev: (torch.randn(4, 8, device=dev, requires_grad=True),),
                impls, 256, 384)


def test_harness_fails_a_wrong_or_crashing_fastnets_kernel():
    """A wrong result or an exception from fastnets fails the case (naming it); a peer that is
    not installed is only skipped, and a correct case passes with every row timed."""
    import pytest

    from fastnets.bench.harness import CaseFailure, run_case
    dev = torch.device("cpu")
    good = _case({"fastnets": lambda x: x * 2, "torch": lambda x: x * 2})
    rows = run_case(good, dev, True, {})
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    with pytest.raises(CaseFailure, match="toy 4x8 float32: correctness: fastnets: output relative error"):
        run_case(_case({"fastnets": lambda x: x * 2.1, "torch": lambda x: x * 2}), dev, True, {})
    with pytest.raises(CaseFailure, match="gradient of input 0"):
        run_case(_case({"fastnets": lambda x: x * 2 + _bad_grad(x), "torch": lambda x: x * 2}), dev, True, {})

    def crash(x):
        raise RuntimeError("kernel exploded")
    with pytest.raises(CaseFailure, match="kernel exploded"):
        run_case(_case({"fastnets": crash, "torch": lambda x: x * 2}), dev, True, {})

    def missing_peer(x):
        raise ImportError("no module named flash_attn")
    rows = run_case(_case({"fastnets": lambda x: x * 2, "torch": lambda x: x * 2, "flash_attn 2": missing_peer}),
                    dev, True, {})
    assert all(r["error"].startswith("skipped") for r in rows if r["impl"] == "flash_attn 2")


def _bad_grad(x):
    """Zero in the forward, a wrong gradient in the backward."""
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.zeros_like(t)

        @staticmethod
        def backward(ctx, g):
            return g * 5.0
    return WrongGrad.apply(x)


def test_bench_diffusion_cases_run_and_check(tmp_path):
    """The diffusion family end to end (functional on CPU): every step kind's fused path
    agrees with the torch formula on the same noise and history, before any timing."""
    out = subprocess.run([sys.executable, "-m", "fastnets", "bench", "--quick", "--ops", "diffusion",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    ops_seen = {r["op"] for r in rows}
    assert {"step_ddim", "step_ddpm", "step_ddim_cfg", "q_sample", "timestep_embedding"} <= ops_seen
    assert all(r["error"] is None for r in rows if r["impl"].startswith("fastnets"))


def test_bench_gan_vae_cases_run_and_check(tmp_path):
    """The StyleGAN resampling and VAE cases end to end (functional on CPU): fastnets agrees
    with the same math in torch before any timing (the R1 step is checked in
    test_double_backward; interpreted, it alone would take minutes here)."""
    out = subprocess.run([sys.executable, "-m", "fastnets", "bench", "--quick", "--no-plots", "--ops", "upfirdn2d_up2",
                          "filtered_lrelu_up2_down2", "gaussian_sample", "gaussian_kl", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert {r["op"] for r in rows} == {"upfirdn2d_up2", "filtered_lrelu_up2_down2", "gaussian_sample", "gaussian_kl"}
    assert all(r["error"] is None for r in rows if r["impl"].startswith("fastnets"))


def test_bench_contrastive_cases_run_and_check(tmp_path):
    """clip_loss (softmax and sigmoid) against the unfused open_clip formula, end to end
    (functional on CPU): outputs and every gradient checked before any timing."""
    out = subprocess.run([sys.executable, "-m", "fastnets", "bench", "--quick", "--no-plots", "--ops", "contrastive",
                          "clip", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert {r["op"] for r in rows} == {"clip_loss_softmax", "clip_loss_sigmoid", "zero_shot_logits", "patch_embed"}
    assert all(r["error"] is None for r in rows if r["impl"].startswith("fastnets"))
