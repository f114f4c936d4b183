"""Diffusion benchmark cases (`python -m fastnets bench --ops diffusion`).

- One sampler step of each kind on 64x4x128x128 float32 latents (16 MiB a tensor) and at
  batch 1 (1x4x64x64, the launch-bound case): fastnets' scheduler.step (host logic, index
  fill, one kernel), the bare fused kernel ("fastnets-kernel"), the same formula as a chain
  of torch ops (eager and torch.compile), and diffusers' step() on the same tensors. Bytes:
  x, the model output (both halves with guidance), the noise, the history (DPM-Solver++)
  read; x_{t-1}, x0 (all but DPM-Solver) and the history written. All impls read the same
  noise tensor, so their outputs compare; diffusers draws its own where its step() takes
  no noise argument (DDPM, Euler a).
- q_sample (x_t, forward + backward) and the timestep embedding vs torch eager / compile.
- A 50-step DDIM / DPM-Solver++ loop of a small UNet2D: the loop captured as one CUDA graph
  (fastnets.diffusion.sample), the same loop without the graph, and diffusers' scheduler
  driving the same model (the output is the final sample; times are whole loops).
- The UNet2D training step (64x64, batch 64, bf16 autocast, forward + backward) vs
  diffusers' UNet2DModel with the same weights, eager and torch.compile'd.
"""
from __future__ import annotations

import importlib.util

import torch

from .. import diffusion, ops, reference
from .harness import Case, dtype_size, peers

N_STEPS, STEP_AT = 50, 25


def _diffusers():
    return importlib.util.find_spec("diffusers") is not None


# kind: (scheduler class name, config, step kwargs, guidance scale)
STEP_KINDS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}, {}, None),
    "ddim_eta1": ("DDIMScheduler", {"clip_sample": False}, {"eta": 1.0}, None),
    "ddim_cfg": ("DDIMScheduler", {"clip_sample": False}, {}, 7.5),
    "ddpm": ("DDPMScheduler", {}, {}, None),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}, None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, {}, None),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, None),
}


def _at_step(sched, k: int) -> None:
    """Put a scheduler (ours or diffusers') at step k of a run, as if k steps had been taken."""
    if hasattr(sched, "_step_index"):
        sched._step_index = k
    if hasattr(sched, "lower_order_nums"):
        sched.lower_order_nums = sched.config.solver_order
    if hasattr(sched, "_run_begin"):
        sched._run_begin = 0


def _step_case(kind: str, shape: tuple, dtype: torch.dtype, device: torch.device, n_steps: int, k: int) -> Case:
    name, cfg, step_kwargs, g = STEP_KINDS[kind]
    ours = getattr(diffusion, name)(**cfg)
    ours.set_timesteps(n_steps, device=device)
    plan = ours._loop_plan(**step_kwargs)
    stochastic, history = plan.noise[k], plan.history
    B = shape[0]
    acc = torch.float32
    h0 = torch.randn(shape, device=device, dtype=acc) if history else None
    if history:
        ours._history = h0.clone()
    t_ours = ours.timesteps[k]

    def inputs(dev):
        mb = 2 * B if g is not None else B
        return (torch.randn(shape, device=dev, dtype=dtype), torch.randn((mb,) + shape[1:], device=dev, dtype=dtype),
                torch.randn(shape, device=dev, dtype=dtype))

    def fast(x, m, noise):
        _at_step(ours, k)
        return ours.step(m, t_ours, x, variance_noise=noise if stochastic else None, guidance_scale=g,
                         **step_kwargs)[0]

    table = plan.table(dtype, device)
    index = torch.full((1,), k, dtype=torch.int32, device=device)
    _, options = ours._kernel_options(torch.empty(shape, device="meta"), torch.empty(shape, device="meta"))
    hk = h0.clone() if history else None

    def kernel(x, m, noise):
        return ops.sampler_step(x, m, table, index, noise=noise if stochastic else None, history=hk,
                                guidance_scale=g, return_x0=ours._returns_x0, **options)[0]

    row = torch.tensor(plan.coef[k], dtype=torch.float64, device=device)
    ht = h0.clone() if history else None

    def torch_formula(x, m, noise):
        return reference.diffusion.sampler_step(x, m, row, noise=noise if stochastic else None, history=ht,
                                                guidance_scale=g, clip_range=options.get("clip_sample_range"))[0]

    impls = {"fastnets": fast, "fastnets-kernel": kernel, **peers(torch_formula, device)}
    if _diffusers():
        import diffusers
        theirs = getattr(diffusers, name)(**cfg)
        theirs.set_timesteps(n_steps, device=device)
        t_theirs = theirs.timesteps[k]
        takes_noise = name in ("DDIMScheduler", "DPMSolverMultistepScheduler")

        def diffusers_step(x, m, noise):
            _at_step(theirs, k)
            if history:
                theirs.model_outputs = [None, m[:B]]
            if g is not None:   # the pipelines' guidance: torch ops before step()
                u, c = m.chunk(2)
                m = u + g * (c - u)
            kw = dict(step_kwargs)
            if takes_noise and stochastic:
                kw["variance_noise"] = noise
            return theirs.step(m, t_theirs, x, **kw)[0]
        impls["diffusers"] = diffusers_step
    es = dtype_size(dtype)
    numel = 1
    for s in shape:
        numel *= s
    reads = numel * es * (2 + (1 if g is not None else 0) + (1 if stochastic else 0)) + (numel * 4 if history else 0)
    writes = numel * es * (1 + (1 if ours._returns_x0 else 0)) + (numel * 4 if history else 0)
    label = f"{kind} {'x'.join(map(str, shape))}"
    return Case("diffusion", f"step_{kind}", label, numel, dtype, inputs, impls, reads + writes, 0, modes=("fwd",))


def step_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        shapes = [(64, 4, 128, 128), (1, 4, 64, 64)]
        kinds = ("ddim", "ddpm", "dpmpp_2m", "ddim_cfg") if quick else tuple(STEP_KINDS)
        n, k = N_STEPS, STEP_AT
    else:
        shapes, kinds, n, k = [(2, 4, 8, 8)], ("ddim", "ddpm", "dpmpp_2m_sde", "ddim_cfg"), 10, 5
    return [_step_case(kind, shape, torch.float32, device, n, k) for shape in shapes for kind in kinds]


def q_sample_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    shape = (64, 4, 128, 128) if cuda else (2, 4, 8, 8)
    dtypes = ((torch.float32,) if quick else (torch.float32, torch.bfloat16)) if cuda else (torch.float32,)
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    cases = []
    for dtype in dtypes:
        table = ops.diffusion.q_sample_table(acp, dtype, device)
        acp_dev = acp.to(device)

        def inputs(dev, dtype=dtype):
            return (torch.randn(shape, device=dev, dtype=dtype, requires_grad=True),
                    torch.randn(shape, device=dev, dtype=dtype, requires_grad=True),
                    torch.randint(0, 1000, (shape[0],), device=dev))

        def torch_q_sample(x0, noise, t, acp=acp_dev):
            # diffusers' add_noise, as training scripts call it
            a = acp[t].to(x0.dtype)
            view = (-1,) + (1,) * (x0.dim() - 1)
            return a.sqrt().view(view) * x0 + (1 - a).sqrt().view(view) * noise

        impls = {"fastnets": lambda x0, n, t, table=table: ops.q_sample(x0, n, t, acp, table=table),
                 **peers(torch_q_sample, device)}
        numel = 1
        for s in shape:
            numel *= s
        es = dtype_size(dtype)
        cases.append(Case("diffusion", "q_sample", "x".join(map(str, shape)), numel, dtype, inputs, impls,
                          3 * numel * es, 3 * numel * es, modes=("fwd", "fwd_bwd")))
    dim, n = 320, 64

    def t_inputs(dev):
        return (torch.randint(0, 1000, (n,), device=dev),)

    impls = {"fastnets": lambda t: ops.timestep_embedding(t, dim, True, 0),
             **peers(lambda t: reference.diffusion.timestep_embedding(t, dim, True, 0), device)}
    cases.append(Case("diffusion", "timestep_embedding", f"{n}x{dim}", n, torch.float32, t_inputs, impls,
                      n * dim * 4 + n * 8, 0, modes=("fwd",)))
    return cases


def loop_cases(device: torch.device, quick: bool) -> list[Case]:
    """50-step loops of a small UNet2D (32x32x4 latents, batch 16). GPU only: the loop is
    what the CUDA graph is for, and the interpreter takes minutes per loop."""
    if device.type != "cuda":
        return []
    from ..models import UNet2D, UNet2DConfig
    torch.manual_seed(0)
    cfg = UNet2DConfig(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    model = UNet2D(cfg).to(device).eval()
    shape = (16, 4, 32, 32)
    cases = []
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        ours = getattr(diffusion, name)()

        def inputs(dev):
            return (torch.randn(shape, device=dev),)

        def graphed(lat, ours=ours):
            return diffusion.sample(model, ours, shape, N_STEPS, latents=lat, cuda_graph=True)

        def plain(lat, ours=ours):
            return diffusion.sample(model, ours, shape, N_STEPS, latents=lat, cuda_graph=False)

        impls = {"fastnets": graphed, "fastnets-no-graph": plain}
        if _diffusers():
            import diffusers
            theirs = getattr(diffusers, name)()

            @torch.no_grad()
            def diffusers_loop(lat, theirs=theirs):
                theirs.set_timesteps(N_STEPS, device=device)
                x = lat * theirs.init_noise_sigma
                for t in theirs.timesteps:
                    out = model(theirs.scale_model_input(x, t), t).sample
                    x = theirs.step(out, t, x).prev_sample
                return x
            impls["torch"] = diffusers_loop     # diffusers' scheduler, same model: the check's reference
        label = f"{name.replace('Scheduler', '')} {N_STEPS} steps UNet2D 16x4x32x32"
        cases.append(Case("diffusion", f"loop_{name.replace('Scheduler', '').lower()}", label, N_STEPS,
                          torch.float32, inputs, impls, 0, 0, modes=("fwd",), check_rel=2e-3))
    return cases


def unet_train_cases(device: torch.device, quick: bool) -> list[Case]:
    """UNet2D training step, 64x64 RGB, batch 64 (32 quick), bf16 autocast, vs diffusers'
    UNet2DModel with the same weights (eager and torch.compile'd). Size = images."""
    if device.type != "cuda" or not _diffusers():
        return []
    import diffusers
    from ..models import UNet2D
    B = 32 if quick else 64
    cfg = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**cfg).to(device)
    ours = UNet2D(theirs.config).to(device)
    ours.load_state_dict(theirs.state_dict())

    def step(model):
        def fn(x, t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, t).sample
        return fn

    def inputs(dev):
        return torch.randn(B, 3, 64, 64, device=dev, requires_grad=True), torch.randint(0, 1000, (B,), device=dev)

    impls = {"fastnets": step(ours), "torch": step(theirs), "torch.compile": step(torch.compile(theirs))}
    return [Case("diffusion", "unet2d_train_step", f"UNet2D 64x64 batch {B}", B, torch.bfloat16, inputs, impls,
                 0, 0, modes=("fwd_bwd",), check_rel=0.05)]


def diffusion_cases(device: torch.device, quick: bool) -> list[Case]:
    return step_cases(device, quick) + q_sample_cases(device, quick) + loop_cases(device, quick) + \
        unet_train_cases(device, quick)
