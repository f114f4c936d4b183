"""The whole denoising loop: model, guidance and fused step, captured once as a CUDA graph
and replayed per step on a GPU; a plain loop elsewhere.

Why a graph works here: every per-step quantity lives on the device (the step index, the
coefficient table, the model's timestep and input scale per step), and the captured
iteration ends by advancing the index with a device add. Each replay is therefore the
next step, with no host work between steps beyond one graph launch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .schedulers import _FusedScheduler, randn_like_diffusers


def _call(model, x: Tensor, t: Tensor, model_kwargs: dict) -> Tensor:
    out = model(x, t, **model_kwargs)
    if hasattr(out, "sample"):          # diffusers' UNet2DOutput
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def sample(model, scheduler: _FusedScheduler, shape, steps: int = 50, generator=None,
           guidance_scale: Optional[float] = None, cuda_graph: bool = True, *, device=None,
           dtype: torch.dtype = torch.float32, model_kwargs: Optional[dict] = None, guidance_rescale: float = 0.0,
           latents: Optional[Tensor] = None, **step_kwargs) -> Tensor:
    """Sample ``shape`` = (B, C, H, W) from ``model(x, t, **model_kwargs)`` with a fastnets
    scheduler in ``steps`` steps; returns the final sample.

    guidance_scale: classifier-free guidance; the model is then called on the doubled batch
    ``cat([x, x])`` and ``model_kwargs`` must hold the doubled conditioning ([uncond | cond],
    e.g. ``class_labels=cat([null, labels])``); the guidance runs inside the step kernel.
    step_kwargs go to the scheduler's step (eta, s_churn, ...). generator: the initial noise
    and the step noise are drawn from it as a diffusers pipeline would, so the plain loop
    gives the images of the same pipeline with the diffusers scheduler.

    cuda_graph (CUDA only): warm up, capture one iteration, replay it ``steps`` times. The
    step noise of stochastic samplers is then drawn inside the graph from the CUDA default
    generator (or ``generator`` when it is a CUDA generator) -- a different stream of numbers
    than the plain loop's, by design; a CPU generator with a stochastic sampler runs the
    plain loop.
    """
    if not isinstance(scheduler, _FusedScheduler):
        raise TypeError(f"sample: scheduler must be a fastnets.diffusion scheduler, got {type(scheduler).__name__}")
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"sample: shape must be (batch, channels, ...), got {shape}")
    model_kwargs = dict(model_kwargs or {})
    device = torch.device(device) if device is not None else (latents.device if latents is not None else
                                                               next(_params(model), torch.empty(0)).device)
    scheduler.set_timesteps(steps, device=device)
    if latents is None:
        latents = randn_like_diffusers(shape, generator, device, dtype)
    x = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    plan = scheduler._loop_plan(**step_kwargs)
    stochastic = any(plan.noise)
    cpu_gen = generator is not None and not isinstance(generator, (list, tuple)) and generator.device.type == "cpu"
    use_graph = (cuda_graph and device.type == "cuda" and not (stochastic and (cpu_gen or isinstance(generator, (list, tuple)))))
    if not use_graph:
        return _plain_loop(model, scheduler, x, generator, guidance_scale, guidance_rescale, model_kwargs, step_kwargs)
    return _graph_loop(model, scheduler, plan, x, generator, guidance_scale, guidance_rescale, model_kwargs)


def _params(model):
    return model.parameters() if hasattr(model, "parameters") else iter(())


def _plain_loop(model, scheduler, x, generator, guidance_scale, guidance_rescale, model_kwargs, step_kwargs):
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guidance_scale is not None:
            x_in = torch.cat([x_in, x_in])
        out = _call(model, x_in, t.expand(x_in.shape[0]), model_kwargs)
        x = scheduler.step(out, t, x, generator=generator, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, **step_kwargs)[0]
    return x


def _graph_loop(model, scheduler, plan, x, generator, guidance_scale, guidance_rescale, model_kwargs):
    device = x.device
    n = scheduler.num_inference_steps
    table = plan.table(x.dtype, device)
    model_t = scheduler.timesteps.to(device)
    scales = scheduler._input_scales()
    scales = torch.tensor(scales, dtype=x.dtype, device=device) if scales is not None else None
    index = torch.zeros(1, dtype=torch.int32, device=device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    history = torch.zeros(x.shape, dtype=acc, device=device) if plan.history else None
    noise_gen = generator if generator is not None and generator.device.type == "cuda" else None
    stochastic = any(plan.noise)
    state = {"x": x.clone()}

    def iteration():
        cur = state["x"]
        idx = index.long()
        x_in = cur * scales.index_select(0, idx) if scales is not None else cur
        t = model_t.index_select(0, idx)
        if guidance_scale is not None:
            x_in = torch.cat([x_in, x_in])
        out = _call(model, x_in, t.expand(x_in.shape[0]), model_kwargs)
        noise = (torch.randn(cur.shape, generator=noise_gen, device=device, dtype=cur.dtype)
                 if stochastic else None)
        new, _ = ops.sampler_step(cur, out, table, index, noise=noise, history=history,
                                  guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        cur.copy_(new)
        index.add_(1)

    # Warm up on a side stream (compiles every kernel, fills the allocator), then restore.
    start = state["x"].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        iteration()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if noise_gen is not None:
        graph.register_generator_state(noise_gen)
    index.zero_()
    state["x"].copy_(start)
    if history is not None:
        history.zero_()
    with torch.cuda.graph(graph):
        iteration()
    index.zero_()
    state["x"].copy_(start)
    if history is not None:
        history.zero_()
    for _ in range(n):
        graph.replay()
    return state["x"].clone()
