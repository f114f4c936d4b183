"""Diffusion sampling on fastnets' fused step kernels: drop-in schedulers for diffusers
pipelines (same config keys, methods and results) and a whole-loop sampler that captures
model + guidance + step in one CUDA graph."""
from .sampling import sample
from .schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                         EulerDiscreteScheduler, SchedulerConfig, SchedulerOutput, randn_like_diffusers)

SCHEDULERS = (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
              DPMSolverMultistepScheduler)

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "SCHEDULERS", "SchedulerConfig", "SchedulerOutput", "randn_like_diffusers",
           "sample"]
