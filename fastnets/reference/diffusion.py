"""Plain-PyTorch forms of the diffusion ops: the generic sampler step, q_sample and the
sinusoidal timestep embedding (diffusers' get_timestep_embedding). Compute in float32
(float64 for float64 input); the tests run them in float64 as ground truth."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sampler_step(sample: Tensor, model_output: Tensor, coef_row: Tensor, *, noise: Tensor | None = None,
                 history: Tensor | None = None, guidance_scale: float | None = None,
                 rescale: Tensor | None = None, clip_range: float | None = None, threshold: Tensor | None = None,
                 variance: str = "none", x0_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The step of fastnets/kernels/diffusion.py in torch ops (see COEFS there); coef_row: (N_COEFS,).
    Returns (prev_sample, x0); history is replaced by x0 in place when given."""
    acc = _acc(sample)
    k_pre, a_x, a_m, p, q, s, r, u, lmin, lmax = coef_row.to(acc).unbind(0)
    B, C = sample.shape[0], sample.shape[1]
    x = sample.to(acc)
    mo = model_output.to(acc)
    if guidance_scale is not None:
        uncond, cond = mo[:B], mo[B:]
        mo_eps = uncond[:, :C] + guidance_scale * (cond[:, :C] - uncond[:, :C])
        var_src = cond
    else:
        mo_eps, var_src = mo[:, :C], mo
    if rescale is not None:
        mo_eps = mo_eps * rescale.to(acc).view(-1, *([1] * (sample.dim() - 1)))
    if noise is not None:
        n = noise.to(acc)
        x = x + k_pre * n
    x0 = a_x * x + a_m * mo_eps
    if threshold is not None:
        thr = threshold.to(acc).view(-1, *([1] * (sample.dim() - 1)))
        x0 = torch.minimum(torch.maximum(x0, -thr), thr) / thr
    elif clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    out = p * x + q * x0 + s * mo_eps
    if noise is not None:
        if variance == "learned":
            out = out + r * var_src[:, C:].sqrt() * n
        elif variance == "learned_range":
            frac = (var_src[:, C:] + 1) / 2
            out = out + r * torch.exp(0.5 * (frac * lmax + (1 - frac) * lmin)) * n
        else:
            out = out + r * n
    if history is not None:
        out = out + u * history.to(acc)
        history.copy_(x0)
    return out.to(sample.dtype), x0.to(x0_dtype or sample.dtype)


def q_sample(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    acc = _acc(x0)
    abar = alphas_cumprod.to(device=x0.device, dtype=acc)[timesteps.to(x0.device).long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    c, d = abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)
    x, n = x0.to(acc), noise.to(acc)
    return (c * x + d * n).to(x0.dtype), (c * n - d * x).to(x0.dtype)


def timestep_frequencies(dim: int, downscale_freq_shift: float = 1.0, max_period: float = 10000.0,
                         device=None) -> Tensor:
    """The (dim // 2,) float32 frequencies of diffusers' get_timestep_embedding, computed
    with the same float32 operations in the same order."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> Tensor:
    """diffusers' get_timestep_embedding, float32 out (float64 when timesteps are float64)."""
    half = dim // 2
    freqs = timestep_frequencies(dim, downscale_freq_shift, max_period, timesteps.device)
    acc = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    emb = timesteps[:, None].to(acc) * freqs.to(acc)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb
