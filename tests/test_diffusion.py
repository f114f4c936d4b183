"""Diffusion: the fused sampler step against its float64 formula and torch eager; the five
drop-in schedulers against diffusers' (same config, same generator: same samples) step by
step and over whole loops, inside diffusers' own pipelines too; q_sample and the timestep
embedding; bad input."""
import pytest
import torch

import fastnets
from fastnets import _dispatch, diffusion, ops, reference
from helpers import DEVICE, KERNEL_BACKEND, assert_close, expect_backend
from tolerances import Tol

try:
    import diffusers
except ImportError:     # the GPU machines have no diffusers: the GPU tests below still run
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed (pip install diffusers)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Whole loops: float32 rounding carried through 50 steps of a sampler (each step's error is
# checked at the table's float32 bound above).
_LOOP_TOL = Tol(atol=2e-4, rtol=2e-4, bench_rel=1e-3)


def test_coefficient_layout_is_shared():
    from fastnets.kernels import diffusion as kd
    assert kd.COEFS == ops.diffusion.COEFS


# --- the step kernel against its formula -------------------------------------------------------------

STEP_CASES = {
    "plain": dict(),
    "noise": dict(noise=True),
    "history": dict(history=True),
    "noise+history": dict(noise=True, history=True),
    "clip": dict(clip=1.0),
    "threshold": dict(threshold=(0.9, 2.5), noise=True),
    "cfg": dict(cfg=3.5),
    "cfg+rescale+history": dict(cfg=7.5, rescale=0.7, history=True),
    "learned": dict(variance="learned", noise=True, clip=1.5),
    "learned_range+cfg": dict(variance="learned_range", noise=True, cfg=2.0),
}


def _step_inputs(case, dtype, shape=(3, 5, 7, 9), steps=6):
    g = torch.Generator().manual_seed(7)
    B, C = shape[0], shape[1]
    mb = 2 * B if "cfg" in case else B
    mc = 2 * C if case.get("variance", "none") != "none" else C
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    m = torch.randn((mb, mc) + shape[2:], generator=g)
    if case.get("variance") == "learned":
        m[:, C:] = m[:, C:].abs() * 0.1        # a variance
    elif case.get("variance") == "learned_range":
        m[:, C:] = m[:, C:].tanh()             # in [-1, 1]
    m = m.to(DEVICE, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = (torch.rand(steps, ops.diffusion.N_COEFS, generator=g) * 1.6 - 0.8).double()
    coef[:, 8] = -6.0 - coef[:, 8].abs()       # log-variance bounds
    coef[:, 9] = -2.0 + coef[:, 9]
    noise = torch.randn(shape, generator=g).to(DEVICE, dtype) if case.get("noise") else None
    hist = torch.randn(shape, generator=g).to(DEVICE, acc) if case.get("history") else None
    return x, m, coef, noise, hist


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_sampler_step_matches_float64_formula(name, dtype):
    case = STEP_CASES[name]
    x, m, coef, noise, hist = _step_inputs(case, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    index = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    kw = dict(guidance_scale=case.get("cfg"), guidance_rescale=case.get("rescale", 0.0),
              clip_sample_range=case.get("clip"), thresholding=case.get("threshold"),
              variance=case.get("variance", "none"))
    hist_ours = hist.clone() if hist is not None else None
    with expect_backend("sampler_step"):
        out, x0 = ops.sampler_step(x, m, coef.to(DEVICE, acc), index, noise=noise, history=hist_ours, return_x0=True,
                                   **kw)
    # float64 ground truth from the same inputs, and torch eager in the input dtype (the bar).
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    hist64 = d64(hist.clone()) if hist is not None else None
    with fastnets.backend("torch"):
        ref_out, ref_x0 = ops.sampler_step(d64(x), d64(m), coef.to(DEVICE), index, noise=d64(noise), history=hist64,
                                           return_x0=True, **kw)
        base_out, _ = ops.sampler_step(x, m, coef.to(DEVICE, acc), index, noise=noise,
                                       history=hist.clone() if hist is not None else None, return_x0=True, **kw)
    assert out.dtype == dtype and x0.dtype == dtype
    assert_close(out, ref_out, dtype, f"{name} prev_sample", baseline=base_out)
    assert_close(x0, ref_x0, dtype, f"{name} x0")
    if hist is not None:
        assert_close(hist_ours, hist64, acc, f"{name} history (x0 written in place)")


def test_sampler_step_reads_the_row_the_device_index_names():
    x, m, coef, _, _ = _step_inputs({}, torch.float32)
    table = coef.float().to(DEVICE)
    outs = []
    for i in range(coef.shape[0]):
        out, _ = ops.sampler_step(x, m, table, torch.tensor([i], device=DEVICE))
        outs.append(out)
        row = coef[i]
        expect = row[3] * x.double() + row[4] * (row[1] * x.double() + row[2] * m.double()) + row[5] * m.double()
        assert_close(out, expect, torch.float32, f"row {i}")
    assert not torch.equal(outs[0], outs[1])


def _launch_unchecked(monkeypatch):
    """What a CUDA tensor gets: no host check of the index (it would cost a sync)."""
    from fastnets.ops import _checks
    monkeypatch.setattr(_checks, "table_index", lambda *a, **k: None)


def test_sampler_step_index_outside_the_table(monkeypatch):
    """Issue 24: a step index past the table read garbage (SIGSEGV for 10**6). On CPU it raises
    IndexError as torch's indexing does, negative indices count from the end; the kernel (what a
    CUDA tensor runs, no host sync) reads nothing outside the table and returns NaN."""
    x, m, coef, _, _ = _step_inputs({}, torch.float32)
    table = coef.float().to(DEVICE)
    steps = table.shape[0]
    last = torch.tensor([steps - 1], device=DEVICE)
    with expect_backend("sampler_step"):
        want, _ = ops.sampler_step(x, m, table, last)
        got, _ = ops.sampler_step(x, m, table, torch.tensor([-1], device=DEVICE))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if DEVICE.type == "cpu":
        for bad in (steps, -steps - 1, 10 ** 6):
            with pytest.raises(IndexError, match=f"step_index holds {bad}"):
                ops.sampler_step(x, m, table, torch.tensor([bad]))
    _launch_unchecked(monkeypatch)
    for bad in (steps, -steps - 1, 10 ** 6, -10 ** 6):
        for kw in ({}, dict(thresholding=(0.9, 2.0)), dict(noise=torch.randn_like(x), history=torch.zeros_like(x))):
            with expect_backend("sampler_step"):
                out, x0 = ops.sampler_step(x, m, table, torch.tensor([bad], device=DEVICE), return_x0=True, **kw)
            assert torch.isnan(out).all() and torch.isnan(x0).all(), (bad, kw)
        with fastnets.backend("torch"):
            out, _ = ops.sampler_step(x, m, table, torch.tensor([bad], device=DEVICE))
        assert torch.isnan(out).all()


def test_q_sample_timesteps_outside_the_table(monkeypatch):
    x, n = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    acp = torch.linspace(0.99, 0.01, 10, device=DEVICE)
    with expect_backend("q_sample"):
        got = ops.q_sample(x, n, torch.tensor([-1, 0, -10], device=DEVICE), acp)
    want = ops.q_sample(x, n, torch.tensor([9, 0, 0], device=DEVICE), acp)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _launch_unchecked(monkeypatch)
    xr, nr = x.clone().requires_grad_(), n.clone().requires_grad_()
    with expect_backend("q_sample"):
        out, v = ops.q_sample(xr, nr, torch.tensor([2, 10, -11], device=DEVICE), acp, target="v_prediction")
    assert not torch.isnan(out[0]).any() and torch.isnan(out[1:]).all() and torch.isnan(v[1:]).all()
    (out.nan_to_num() + v.nan_to_num()).sum().backward()
    assert torch.isnan(xr.grad[1:]).all() and not torch.isnan(xr.grad[0]).any()


def test_check_indices_env_checks_on_the_host(monkeypatch):
    """CPU indices are always checked on the host; others only with FASTNETS_CHECK_INDICES=1."""
    from fastnets.ops import _checks
    on_gpu = torch.empty(1, dtype=torch.int64, device="meta")   # any tensor not on the CPU
    monkeypatch.delenv("FASTNETS_CHECK_INDICES", raising=False)
    assert _checks.host_checks(torch.tensor([1])) and not _checks.host_checks(on_gpu)
    monkeypatch.setenv("FASTNETS_CHECK_INDICES", "1")
    assert _checks.host_checks(on_gpu)
    with pytest.raises(IndexError, match="idx holds 12, outside the table's 5 rows"):
        _checks.table_index("op", "idx", torch.tensor([3, 12]), 5)
    with pytest.raises(ValueError):   # the class fastnets raised before is still caught
        _checks.table_index("op", "idx", torch.tensor([-6]), 5)


def test_sampler_step_bad_input():
    x, m, coef, _, _ = _step_inputs({}, torch.float32)
    table, idx = coef.float().to(DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="model_output must have shape"):
        ops.sampler_step(x, m[:, :2], table, idx)
    with pytest.raises(ValueError, match="with guidance"):
        ops.sampler_step(x, m, table, idx, guidance_scale=2.0)
    with pytest.raises(ValueError, match="coefficients must be"):
        ops.sampler_step(x, m, coef.to(DEVICE), idx)           # float64 table for a float32 sample
    with pytest.raises(ValueError, match="step_index must be"):
        ops.sampler_step(x, m, table, 3)
    with pytest.raises(ValueError, match="variance must be one of"):
        ops.sampler_step(x, m, table, idx, variance="fixed")
    with pytest.raises(ValueError, match="history must be"):
        ops.sampler_step(x, m, table, idx, history=torch.zeros_like(x, dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        ops.sampler_step(x, m, table, idx, guidance_rescale=0.5)


# --- the schedulers against diffusers ------------------------------------------------------------------

def _toy_model(C):
    """A deterministic stand-in for a UNet: mixes channels, depends on t, output ~ unit scale."""
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(3)) * 0.5

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1].to(x.device)
        h = torch.einsum("bchw,cd->bdhw", x.float(), w.to(x.device))
        return (torch.tanh(h) + 0.1 * torch.cos(t / 300.0)).to(x.dtype)
    return model


def _run_both(name, cfg, steps, step_kwargs, shape=(2, 3, 5, 6), dtype=torch.float32, out_channels=None,
              loop_steps=None):
    ours = getattr(diffusion, name).from_config(getattr(diffusers, name)(**cfg).config)
    theirs = getattr(diffusers, name)(**cfg)
    ours.set_timesteps(steps, device=DEVICE)
    theirs.set_timesteps(steps, device=DEVICE)
    # diffusers' per-step scalars in float64 (its sample math stays in the sample dtype): the
    # reference is then the step formula evaluated exactly on the same float32 schedule, not
    # float32 scalar rounding (1 - abar_prev - std^2 under a square root cancels at eta = 1).
    for attr in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
        if isinstance(getattr(theirs, attr, None), torch.Tensor):
            setattr(theirs, attr, getattr(theirs, attr).double())
    assert torch.allclose(ours.timesteps.double(), theirs.timesteps.double()), (ours.timesteps, theirs.timesteps)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    model = _toy_model(shape[1])
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(theirs.init_noise_sigma)).to(
        DEVICE, dtype)
    xo, xt = x.clone(), x.clone()
    go, gt = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for k, (to, tt) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        if loop_steps is not None and k >= loop_steps:
            break
        mo, mt = model(ours.scale_model_input(xo, to), to), model(theirs.scale_model_input(xt, tt), tt)
        if out_channels:                        # learned variance: a second, tanh-squashed half
            mo = torch.cat([mo, torch.tanh(xo)], 1) if out_channels == "range" else torch.cat([mo, xo.abs() * .01], 1)
            mt = torch.cat([mt, torch.tanh(xt)], 1) if out_channels == "range" else torch.cat([mt, xt.abs() * .01], 1)
        with expect_backend("sampler_step"):
            o = ours.step(mo, to, xo, generator=go, **step_kwargs)
        t = theirs.step(mt, tt, xt, generator=gt, **step_kwargs)
        tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        scale = 1 + t.prev_sample.abs().max().item()
        err = (o.prev_sample.double() - t.prev_sample.double()).abs().max().item()
        assert err <= tol * scale * (k + 1), f"{name} {cfg} {step_kwargs} step {k}: prev_sample off by {err}"
        if getattr(t, "pred_original_sample", None) is not None:
            e0 = (o.pred_original_sample.double() - t.pred_original_sample.double()).abs().max().item()
            assert e0 <= tol * (1 + t.pred_original_sample.abs().max().item()) * (k + 1), f"step {k}: x0 off by {e0}"
        xo, xt = o.prev_sample, t.prev_sample
        if hasattr(type(theirs), "step_index"):
            assert ours.step_index == theirs.step_index
    return xo, xt


SCHEDULER_CASES = [
    # DDPM: every variance type, prediction type, spacing and schedule; clipping and thresholding.
    ("DDPMScheduler", dict(), {}, None),
    ("DDPMScheduler", dict(variance_type="fixed_large", prediction_type="v_prediction", timestep_spacing="trailing",
                           beta_schedule="scaled_linear"), {}, None),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", prediction_type="sample", timestep_spacing="linspace",
                           beta_schedule="squaredcos_cap_v2", clip_sample=False), {}, None),
    ("DDPMScheduler", dict(variance_type="learned_range", thresholding=True, sample_max_value=1.5), {}, "range"),
    ("DDPMScheduler", dict(variance_type="learned", steps_offset=1, rescale_betas_zero_snr=True), {}, "var"),
    # DDIM: eta, use_clipped_model_output, set_alpha_to_one, spacings, prediction types.
    ("DDIMScheduler", dict(), {}, None),
    ("DDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                           clip_sample=False), {"eta": 1.0}, None),
    ("DDIMScheduler", dict(prediction_type="sample", set_alpha_to_one=False, timestep_spacing="linspace",
                           beta_schedule="scaled_linear"), {"eta": 0.5, "use_clipped_model_output": True}, None),
    ("DDIMScheduler", dict(thresholding=True, steps_offset=1, beta_schedule="squaredcos_cap_v2"), {"eta": 0.3},
     None),
    # Euler: Karras sigmas, churn, v-prediction, spacings, final sigma.
    ("EulerDiscreteScheduler", dict(), {}, None),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                    final_sigmas_type="sigma_min"), {"s_churn": 0.8, "s_tmin": 0.5}, None),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear"),
     {}, None),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="sample",
                                    interpolation_type="log_linear"), {}, None),
    ("EulerAncestralDiscreteScheduler", dict(), {}, None),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                             rescale_betas_zero_snr=True), {}, None),
    # DPM-Solver++: 2M and 2M SDE, midpoint and heun, Karras, final sigma types, orders.
    ("DPMSolverMultistepScheduler", dict(), {}, None),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                         use_karras_sigmas=True), {}, None),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction",
                                         final_sigmas_type="sigma_min", lower_order_final=False,
                                         timestep_spacing="trailing"), {}, None),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun", prediction_type="sample", thresholding=True,
                                         timestep_spacing="leading", euler_at_final=True), {}, None),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, beta_schedule="scaled_linear"), {}, None),
]


@needs_diffusers
@pytest.mark.parametrize("name,cfg,step_kwargs,var", SCHEDULER_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SCHEDULER_CASES)])
def test_scheduler_matches_diffusers_step_by_step(name, cfg, step_kwargs, var):
    _run_both(name, cfg, 8, step_kwargs, out_channels=var)


@needs_diffusers
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_scheduler_low_precision_matches_diffusers(name, dtype):
    _run_both(name, {}, 6, {}, dtype=dtype)


@needs_diffusers
@pytest.mark.parametrize("name,cfg", [("DDIMScheduler", dict(timestep_spacing="trailing")),
                                      ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"))])
def test_fifty_step_loop_matches_diffusers(name, cfg):
    ours, theirs = _run_both(name, cfg, 50, {}, shape=(1, 4, 4, 4))
    assert_close(ours, theirs.double(), torch.float32, f"{name} 50-step loop", tol=_LOOP_TOL)




@needs_diffusers
def test_step_guidance_matches_unfused_guidance():
    """step(..., guidance_scale=) on the batched [uncond | cond] output equals diffusers'
    pipeline pattern (guidance in torch, then step)."""
    ours, theirs = diffusion.DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(4, 3, 4, 4)
    for rescale in (0.0, 0.7):
        t = ours.timesteps[1]
        got = ours.step(out, t, x, guidance_scale=6.0, guidance_rescale=rescale).prev_sample
        u, c = out.chunk(2)
        guided = u + 6.0 * (c - u)
        if rescale:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
            guided = rescale_noise_cfg(guided, c, guidance_rescale=rescale)
        want = theirs.step(guided, theirs.timesteps[1], x).prev_sample
        assert_close(got, want.double(), torch.float32, f"guided step rescale={rescale}")


def test_timestep_lookup_needs_no_device_read():
    """The pipeline loop hands step() views of scheduler.timesteps: their index is their
    storage offset, so nothing is read from the tensor (a read on CUDA would sync)."""
    s = diffusion.DDIMScheduler()
    s.set_timesteps(10)
    for i, t in enumerate(s.timesteps):
        assert s._lookup(t) == i
    assert s._lookup(int(s.timesteps[3])) == 3
    assert s._lookup(torch.tensor(int(s.timesteps[7]))) == 7


def test_scheduler_bad_input():
    s = diffusion.DDIMScheduler()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, 5, x)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        diffusion.DDPMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="model_output must have shape"):
        s.step(torch.randn(1, 4, 4, 4), s.timesteps[0], x)
    with pytest.raises(TypeError, match="unknown config keys"):
        diffusion.DDIMScheduler(num_train_steps=10)
    with pytest.raises(NotImplementedError, match="solver_order"):
        diffusion.DPMSolverMultistepScheduler(solver_order=3)
    e = diffusion.EulerDiscreteScheduler()
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="not an integer index"):
        e.step(x, 0, x)
    d = diffusion.DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="2 x 3 channels"):
        d.step(x, 999, x)


@needs_diffusers
def test_from_config_round_trip_and_extra_keys():
    theirs = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    ours = diffusion.DPMSolverMultistepScheduler.from_config(theirs.config)
    assert ours.config.algorithm_type == "sde-dpmsolver++" and ours.config["use_karras_sigmas"]
    # A config of another scheduler (as pipelines pass) keeps the shared keys, ignores the rest.
    ddim = diffusion.DDIMScheduler.from_config(ours.config, clip_sample=False)
    assert ddim.config.clip_sample is False and "algorithm_type" not in ddim.config
    back = diffusers.DDIMScheduler.from_config(ddim.config)
    assert back.config.clip_sample is False


# --- inside diffusers' pipelines ---------------------------------------------------------------------------

def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


@needs_diffusers
@pytest.mark.parametrize("pipeline,name,kwargs", [("DDIMPipeline", "DDIMScheduler", {"eta": 0.5}),
                                                  ("DDPMPipeline", "DDPMScheduler", {})])
def test_pipeline_with_fastnets_scheduler_gives_the_same_images(pipeline, name, kwargs):
    unet = _tiny_unet()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=getattr(diffusers, name)())
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(5), output_type="np",
                **kwargs).images
    pipe.scheduler = getattr(diffusion, name).from_config(pipe.scheduler.config)
    _dispatch.calls.clear()
    got = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(5), output_type="np",
               **kwargs).images
    assert _dispatch.calls[("sampler_step", KERNEL_BACKEND)] == 6
    assert abs(got - want).max() < 1e-4, abs(got - want).max()


@needs_diffusers
def test_sample_plain_loop_matches_diffusers_loop():
    """fastnets.diffusion.sample (the loop a GPU captures as a graph) = the pipeline loop."""
    model = _toy_model(3)
    ours = diffusion.EulerAncestralDiscreteScheduler()
    got = diffusion.sample(model, ours, (2, 3, 4, 4), steps=7, generator=torch.Generator().manual_seed(2),
                           device=DEVICE)
    theirs = diffusers.EulerAncestralDiscreteScheduler()
    theirs.set_timesteps(7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((2, 3, 4, 4), generator=g) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        x = theirs.step(model(theirs.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    assert_close(got, x.double(), torch.float32, "sample() loop", tol=_LOOP_TOL)


def test_sample_with_guidance_uses_the_doubled_batch():
    calls = []

    def model(x, t, class_labels):
        calls.append((x.shape[0], class_labels.tolist()))
        return torch.tanh(x) * (1 + class_labels.view(-1, 1, 1, 1).float())
    labels = torch.tensor([0, 0, 1, 2])          # [uncond (null) x2 | cond]
    out = diffusion.sample(model, diffusion.DDIMScheduler(), (2, 3, 4, 4), steps=3, guidance_scale=4.0,
                           generator=torch.Generator().manual_seed(0), model_kwargs={"class_labels": labels})
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    assert calls == [(4, [0, 0, 1, 2])] * 3


# --- q_sample and the timestep embedding ----------------------------------------------------------------

@needs_diffusers
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", [None, "epsilon", "sample", "v_prediction"])
def test_q_sample_matches_formula_and_diffusers(target, dtype):
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 7, 5, generator=g).to(DEVICE, dtype).requires_grad_()
    noise = torch.randn(5, 3, 7, 5, generator=g).to(DEVICE, dtype).requires_grad_()
    t = torch.tensor([0, 999, 17, 500, 998], device=DEVICE)
    with expect_backend("q_sample"):
        out = ops.q_sample(x0, noise, t, sched.alphas_cumprod, target=target)
    xt, tgt = out if target else (out, None)
    x64, n64 = x0.detach().double().requires_grad_(), noise.detach().double().requires_grad_()
    ref_xt, ref_v = reference.diffusion.q_sample(x64, n64, t, sched.alphas_cumprod.double())
    assert_close(xt, ref_xt, dtype, "x_t", baseline=sched.add_noise(x0.detach(), noise.detach(), t))
    if dtype == torch.float32:
        assert_close(xt, sched.add_noise(x0.detach().double(), noise.detach().double(), t), dtype, "x_t vs diffusers")
    ref_t = {"epsilon": n64, "sample": x64, "v_prediction": ref_v, None: None}[target]
    if target:
        assert_close(tgt, ref_t, dtype, f"target {target}")
    # Backward through both outputs.
    gx, gt = torch.randn_like(xt), torch.randn_like(xt)
    loss = (xt * gx).sum() + ((tgt * gt).sum() if target else 0)
    loss.backward()
    ref_loss = (ref_xt * gx.double()).sum() + ((ref_t * gt.double()).sum() if target else 0)
    ref_loss.backward()
    assert_close(x0.grad, x64.grad, dtype, "d x0")
    assert_close(noise.grad, n64.grad, dtype, "d noise")


@needs_diffusers
def test_scheduler_add_noise_and_velocity_use_the_fused_kernel():
    ours, theirs = diffusion.DDIMScheduler(), diffusers.DDIMScheduler()
    x, n = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([1, 250, 999, 600])
    with expect_backend("q_sample"):
        got = ours.add_noise(x, n, t)
        v = ours.get_velocity(x, n, t)
    assert_close(got, theirs.add_noise(x.double(), n.double(), t), torch.float32, "add_noise")
    assert_close(v, theirs.get_velocity(x.double(), n.double(), t), torch.float32, "get_velocity")


def test_q_sample_bad_input():
    x = torch.randn(2, 3)
    acp = torch.linspace(0.99, 0.01, 10)
    with pytest.raises(IndexError, match="timesteps holds 10, outside the table's 10 rows"):
        ops.q_sample(x, x, torch.tensor([0, 10]), acp)
    with pytest.raises(IndexError, match="timesteps holds -11"):
        ops.q_sample(x, x, torch.tensor([-11, 0]), acp)
    with pytest.raises(ValueError, match="one entry per sample"):
        ops.q_sample(x, x, torch.tensor([0, 1, 2]), acp)
    with pytest.raises(ValueError, match="target must be one of"):
        ops.q_sample(x, x, torch.tensor([0, 1]), acp, target="noise")
    with pytest.raises(TypeError, match="integer tensor"):
        ops.q_sample(x, x, torch.tensor([0.5, 1.0]), acp)


@needs_diffusers
@pytest.mark.parametrize("dim,flip,shift,scale,out_dtype",
                         [(320, True, 0, 1.0, torch.float32), (33, False, 1, 1.0, torch.bfloat16),
                          (128, False, 1, 25.0, torch.float16), (2, True, 0, 1.0, torch.float64)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift, scale, out_dtype):
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.cat([torch.arange(0, 1000, 37), torch.tensor([999])]).to(DEVICE)
    tf = t.float() + 0.25                      # fractional timesteps (Euler's) too
    for ts in (t, tf):
        with expect_backend("timestep_embedding"):
            got = ops.timestep_embedding(ts, dim, flip, shift, scale, dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == (ts.shape[0], dim)
        # Exact sin / cos of the float32 arguments diffusers forms (the argument's own rounding is shared).
        f = reference.diffusion.timestep_frequencies(dim, shift, device=DEVICE)
        arg = (scale * (ts[:, None].float() * f[None])).double()
        exact = torch.cat([arg.sin(), arg.cos()], -1)
        if flip:
            exact = torch.cat([exact[:, dim // 2:], exact[:, :dim // 2]], -1)
        exact = torch.nn.functional.pad(exact, (0, dim % 2))
        theirs = get_timestep_embedding(ts, dim, flip, shift, scale)
        assert_close(got, exact, out_dtype if out_dtype != torch.float64 else torch.float32, "embedding",
                     baseline=theirs.to(out_dtype), tol=_EMB_TOL if out_dtype in (torch.float32, torch.float64) else None)
        assert_close(theirs, exact, torch.float32, "diffusers itself", tol=_EMB_TOL)


# Two float32 ulps of 1 (~2.4e-7) for sin / cos of arguments up to ~25k: the arguments are
# the same float32 numbers torch forms; only the sine differs (ours: Cody-Waite + minimax).
_EMB_TOL = Tol(atol=5e-7, rtol=0.0, bench_rel=1e-6)


def test_timestep_embedding_bad_input():
    with pytest.raises(ValueError, match="1-D tensor"):
        ops.timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="embedding_dim"):
        ops.timestep_embedding(torch.zeros(2), 1)


# --- GPU: graphs and no host sync ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_step_does_not_sync_and_graph_loop_matches(name):
    model = _toy_model(4)
    sched = getattr(diffusion, name)()
    sched.set_timesteps(20, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda") * float(sched.init_noise_sigma)
    first = sched.timesteps[0]
    out = model(sched.scale_model_input(x, first), first)
    sched.step(out, first, x)            # builds everything once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in sched.timesteps[1:]:
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    plain = diffusion.sample(model, getattr(diffusion, name)(), (2, 4, 16, 16), steps=20,
                             generator=torch.Generator("cuda").manual_seed(0), cuda_graph=False)
    graphed = diffusion.sample(model, getattr(diffusion, name)(), (2, 4, 16, 16), steps=20,
                               generator=torch.Generator("cuda").manual_seed(0), cuda_graph=True)
    assert_close(graphed, plain.double(), torch.float32, f"{name} graph loop", tol=_LOOP_TOL)


@needs_diffusers
def test_every_scheduler_is_listed():
    assert {c.__name__ for c in diffusion.SCHEDULERS} == {
        "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler"}
    for cls in diffusion.SCHEDULERS:
        assert set(cls._defaults) <= set(getattr(diffusers, cls.__name__)().config) | {"trained_betas"}

