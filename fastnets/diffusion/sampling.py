"""The whole denoising loop: model, guidance and fused step, captured once as a CUDA graph
and replayed per step on a GPU; a plain loop elsewhere.

Why a graph works here: every per-step quantity lives on the device (the step index, the
coefficient table, the model's timestep and input scale per step), and the captured
iteration ends by advancing the index with a device add. Each replay is therefore the
next step, with no host work between steps beyond one graph launch."""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
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
    return _graph_loop(model, scheduler, plan, x, generator, guidance_scale, guidance_rescale, model_kwargs,
                       step_kwargs)


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


class _CapturedLoop:
    """One captured iteration and the static buffers it reads and writes."""

    def __init__(self, model, scheduler, plan, x, generator, guidance_scale, guidance_rescale, model_kwargs):
        device = x.device
        self.n = scheduler.num_inference_steps
        table = plan.table(x.dtype, device)
        model_t = scheduler.timesteps.to(device)
        scales = scheduler._input_scales()
        scales = torch.tensor(scales, dtype=x.dtype, device=device) if scales is not None else None
        self.index = torch.zeros(1, dtype=torch.int32, device=device)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.history = torch.zeros(x.shape, dtype=acc, device=device) if plan.history else None
        noise_gen = generator if generator is not None and generator.device.type == "cuda" else None
        stochastic = any(plan.noise)
        self.x = x.clone()
        # Conditioning tensors are read from buffers of their own, refreshed before each run.
        self.kwargs = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in model_kwargs.items()}
        index, cur, kwargs, history = self.index, self.x, self.kwargs, self.history
        # The graph holds raw pointers: everything it reads must outlive it.
        self._keep = (model, table, model_t, scales)

        def iteration():
            idx = index.long()
            x_in = cur * scales.index_select(0, idx) if scales is not None else cur
            t = model_t.index_select(0, idx)
            if guidance_scale is not None:
                x_in = torch.cat([x_in, x_in])
            out, options = scheduler._kernel_options(_call(model, x_in, t.expand(x_in.shape[0]), kwargs), cur)
            noise = (torch.randn(cur.shape, generator=noise_gen, device=device, dtype=cur.dtype)
                     if stochastic else None)
            new, _ = ops.sampler_step(cur, out, table, index, noise=noise, history=history,
                                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, **options)
            cur.copy_(new)
            index.add_(1)

        # Warm up on a side stream (compiles and tunes every kernel, settles the allocator),
        # then capture; the capture records without running, so the state is reset around it.
        start = cur.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            iteration()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if noise_gen is not None:
            self.graph.register_generator_state(noise_gen)
        self.reset(start, model_kwargs)
        with torch.cuda.graph(self.graph):
            iteration()

    def reset(self, x: Tensor, model_kwargs: dict) -> None:
        self.index.zero_()
        self.x.copy_(x)
        if self.history is not None:
            self.history.zero_()
        for k, v in model_kwargs.items():
            if isinstance(v, Tensor):
                self.kwargs[k].copy_(v)

    def run(self, x: Tensor, model_kwargs: dict) -> Tensor:
        self.reset(x, model_kwargs)
        for _ in range(self.n):
            self.graph.replay()
        return self.x.clone()


def _graph_loop(model, scheduler, plan, x, generator, guidance_scale, guidance_rescale, model_kwargs, step_kwargs):
    """Capture once per (model, shapes, options) and keep it on the scheduler: later calls
    only copy the new latents and conditioning in and replay."""
    schedule = hashlib.sha1(plan.coef.tobytes() + np.asarray(scheduler._timesteps_np).tobytes()
                            + repr((plan.noise, plan.history, scheduler._input_scales() is not None)).encode()).hexdigest()
    key = (id(model), tuple(x.shape), x.dtype, str(x.device), guidance_scale, guidance_rescale, schedule,
           id(generator) if generator is not None and any(plan.noise) else None,
           tuple(sorted((k, tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (k, v)
                        for k, v in model_kwargs.items())))
    cache = scheduler.__dict__.setdefault("_captured_loops", {})
    if key not in cache:
        cache[key] = _CapturedLoop(model, scheduler, plan, x, generator, guidance_scale, guidance_rescale,
                                   model_kwargs)
    return cache[key].run(x, model_kwargs)
