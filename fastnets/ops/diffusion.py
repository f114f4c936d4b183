"""Diffusion ops: the fused sampler step, q_sample (forward process + training target) and
the sinusoidal timestep embedding. fastnets.diffusion's schedulers are built on these.

sampler_step takes the step's coefficients from a device table and a device index, so a
sampling loop never reads a scalar back to the host (see fastnets/kernels/diffusion.py for the
form every sampler reduces to)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks


def _diffusion_kernels():
    from ..kernels import diffusion
    return diffusion


# The coefficient layout, owned here (fastnets/kernels/diffusion.py holds the same tuple; a test keeps them equal).
COEFS = ("k_pre", "a_x", "a_m", "p", "q", "s", "r", "u", "lmin", "lmax")
N_COEFS = len(COEFS)
VARIANCES = ("none", "learned", "learned_range")
TARGETS = ("epsilon", "sample", "v_prediction")

_dispatch.register_op("sampler_step", "fused diffusion sampler step (DDPM, DDIM, Euler, Euler a, DPM-Solver++ "
                                      "2M / 2M SDE) with classifier-free guidance, coefficients read on the device")
_dispatch.register_op("q_sample", "forward diffusion x_t = sqrt(abar) x0 + sqrt(1 - abar) noise with the v target")
_dispatch.register_op("timestep_embedding", "sinusoidal timestep embedding (diffusers' get_timestep_embedding)")


# --- sampler step: fastnets::sampler_step ----------------------------------------------------------

@torch.library.custom_op("fastnets::sampler_step", mutates_args=("hist",))
def _sampler_step(x: Tensor, m: Tensor, coef: Tensor, index: Tensor, noise: Optional[Tensor], hist: Optional[Tensor],
                  thresh: Optional[Tensor], rescale: Optional[Tensor], guidance: Optional[float],
                  clip_range: Optional[float], variance: str, write_x0: bool,
                  x0_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out, x0 = _diffusion_kernels().sampler_step(x, m, coef, index, noise, hist, thresh, rescale, guidance, clip_range,
                                               variance, write_x0, x0_dtype)
    return out, (x0 if x0 is not None else x.new_empty((0,), dtype=x0_dtype))


@_sampler_step.register_fake
def _(x, m, coef, index, noise, hist, thresh, rescale, guidance, clip_range, variance, write_x0, x0_dtype):
    return torch.empty_like(x), (torch.empty_like(x, dtype=x0_dtype) if write_x0 else x.new_empty((0,), dtype=x0_dtype))


def _per_sample(t: Tensor, ndim: int) -> Tensor:
    return t.view(-1, *([1] * (ndim - 1)))


def _guidance_factor(model_output: Tensor, B: int, C: int, guidance_scale: float, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, diffusers' rescale_noise_cfg) as one per-sample
    factor: phi * std(cond) / std(guided) + (1 - phi). Torch reductions, on the device."""
    acc = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    uncond, cond = model_output[:B, :C].to(acc), model_output[B:, :C].to(acc)
    guided = uncond + guidance_scale * (cond - uncond)
    dims = list(range(1, guided.dim()))
    return rescale * cond.std(dim=dims) / guided.std(dim=dims) + (1.0 - rescale)


def _coefficient_row(coef: Tensor, index: Tensor) -> Tensor:
    """coef[index] as torch indexes it (negative from the end), with no host sync: an index
    outside the table (CUDA; the host raised already for CPU tensors) gives a NaN row, as the
    kernel does."""
    steps = coef.shape[0]
    i = index.reshape(1).long()
    i = torch.where(i < 0, i + steps, i)
    ok = (i >= 0) & (i < steps)
    row = coef.index_select(0, i.clamp(0, max(steps - 1, 0)))[0]
    return torch.where(ok, row, torch.full_like(row, float("nan")))


def _threshold(sample: Tensor, model_output: Tensor, coef: Tensor, index: Tensor, noise: Optional[Tensor],
               guidance_scale: Optional[float], factor: Optional[Tensor], ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding's per-sample s = clamp(quantile(|x0|, ratio), 1, max_value): x0 is
    formed once more in torch (the quantile needs all of it before any element is stepped)."""
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    B, C = sample.shape[0], sample.shape[1]
    row = _coefficient_row(coef, index).to(acc)
    mo = model_output.to(acc)
    m = mo[:B, :C] + guidance_scale * (mo[B:, :C] - mo[:B, :C]) if guidance_scale is not None else mo[:, :C]
    if factor is not None:
        m = m * _per_sample(factor, m.dim())
    x = sample.to(acc)
    if noise is not None:
        x = x + row[0] * noise.to(acc)
    x0 = row[1] * x + row[2] * m
    s = torch.quantile(x0.reshape(B, -1).abs(), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def sampler_step(sample: Tensor, model_output: Tensor, coefficients: Tensor, step_index: Tensor, *,
                 noise: Optional[Tensor] = None, history: Optional[Tensor] = None,
                 guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0,
                 clip_sample_range: Optional[float] = None, thresholding: Optional[tuple[float, float]] = None,
                 variance: str = "none", return_x0: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """One sampler step in one pass: ``(prev_sample, pred_original_sample or None)``.

    sample: (B, C, ...); model_output: (B, C, ...), or (2B, ...) with guidance ([uncond |
    cond], as pipelines batch it), with 2C channels for a learned variance (its second half);
    coefficients: (steps, N_COEFS) float32 (float64 for float64 samples) on sample's device,
    one row per step (fastnets.diffusion's schedulers build them); step_index: 1-element
    integer tensor on the device that picks the row, as coefficients[step_index] would
    (negative from the end; for a CUDA tensor never read on the host: a step outside the table
    comes out NaN and nothing outside it is read; a CPU one outside raises IndexError); noise: like
    sample (drawn by the caller from its generator); history: float32 (float64) buffer like
    sample, read as the previous x0 and overwritten with this step's (DPM-Solver++);
    guidance_scale / guidance_rescale: classifier-free guidance (and its rescale) applied to
    the model output inside the step; clip_sample_range: clamp x0; thresholding: (ratio,
    max_value) of dynamic thresholding; variance: "none", "learned" or "learned_range" (scales
    the noise; unused on a step without noise).
    No autograd (sampling runs under no_grad). Backends: triton, interpret, torch.
    """
    op = "sampler_step"
    _checks.tensor(op, "sample", sample, min_dim=2)
    _checks.tensor(op, "model_output", model_output, min_dim=2)
    if variance not in VARIANCES:
        raise ValueError(f"{op}: variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    B, C = sample.shape[0], sample.shape[1]
    want = (2 * B if guidance_scale is not None else B, 2 * C if variance != "none" else C) + tuple(sample.shape[2:])
    if tuple(model_output.shape) != want:
        raise ValueError(f"{op}: model_output must have shape {want} for sample of shape {tuple(sample.shape)}"
                         f"{' with guidance' if guidance_scale is not None else ''}"
                         f"{' and a learned variance' if variance != 'none' else ''}, got {tuple(model_output.shape)}")
    if model_output.device != sample.device:
        raise ValueError(f"{op}: model_output is on {model_output.device} but sample is on {sample.device}")
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    if (not isinstance(coefficients, Tensor) or coefficients.dim() != 2 or coefficients.shape[1] != N_COEFS
            or coefficients.dtype != acc or coefficients.device != sample.device):
        raise ValueError(f"{op}: coefficients must be a ({'steps'}, {N_COEFS}) {acc} tensor on {sample.device}, got "
                         f"{_describe(coefficients)}")
    if (not isinstance(step_index, Tensor) or step_index.numel() != 1 or step_index.is_floating_point()
            or step_index.is_complex() or step_index.dtype == torch.bool or step_index.device != sample.device):
        raise ValueError(f"{op}: step_index must be a 1-element integer tensor on {sample.device}, got "
                         f"{_describe(step_index)}")
    # A row of the table, as coefficients[step_index] picks it (negative from the end): checked
    # on the host where that costs no sync; on CUDA a step outside the table comes out NaN.
    _checks.table_index(op, "step_index", step_index, coefficients.shape[0])
    for name, t, dtype in (("noise", noise, None), ("history", history, acc)):
        if t is None:
            continue
        _checks.tensor(op, name, t)
        if tuple(t.shape) != tuple(sample.shape) or t.device != sample.device or (dtype and t.dtype != dtype):
            raise ValueError(f"{op}: {name} must be a{' ' + str(dtype) if dtype else ''} tensor of shape "
                             f"{tuple(sample.shape)} on {sample.device}, got {_describe(t)}")
    guidance = None if guidance_scale is None else _checks.number(op, "guidance_scale", guidance_scale)
    rescale = _checks.number(op, "guidance_rescale", guidance_rescale, min_value=0.0)
    if rescale and guidance is None:
        raise ValueError(f"{op}: guidance_rescale needs guidance_scale")
    clip = None if clip_sample_range is None else _checks.number(op, "clip_sample_range", clip_sample_range,
                                                                 min_value=0.0)
    factor = _guidance_factor(model_output, B, C, guidance, rescale) if rescale else None
    thresh = None
    if thresholding is not None:
        ratio, max_value = thresholding
        thresh = _threshold(sample, model_output, coefficients, step_index, noise, guidance, factor,
                            _checks.number(op, "thresholding ratio", ratio), _checks.number(op, "sample_max_value",
                                                                                            max_value))
    backend = _dispatch.choose(op, sample.device, empty=sample.numel() == 0)
    if backend == "torch":
        row = _coefficient_row(coefficients, step_index)
        out, x0 = reference.diffusion.sampler_step(sample, model_output, row, noise=noise, history=history,
                                                   guidance_scale=guidance, rescale=factor, clip_range=clip,
                                                   threshold=thresh, variance=variance)
        return out, (x0 if return_x0 else None)
    out, x0 = torch.ops.fastnets.sampler_step(
        sample.contiguous(), model_output.contiguous(), coefficients.contiguous(), step_index,
        noise.contiguous() if noise is not None else None, history, thresh, factor, guidance, clip, variance,
        return_x0, sample.dtype)
    return out, (x0 if return_x0 else None)


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


# --- q_sample: fastnets::q_sample_fwd / fastnets::q_sample_bwd ------------------------------------------

@torch.library.custom_op("fastnets::q_sample_fwd", mutates_args=())
def _q_sample_fwd(x0: Tensor, noise: Tensor, t: Tensor, table: Tensor, target: str) -> tuple[Tensor, Tensor]:
    xt, v = _diffusion_kernels().q_sample_fwd(x0, noise, t, table, target)
    return xt, (v if v is not None else x0.new_empty((0,)))


@_q_sample_fwd.register_fake
def _(x0, noise, t, table, target):
    return torch.empty_like(x0), (torch.empty_like(x0) if target == "v_prediction" else x0.new_empty((0,)))


@torch.library.custom_op("fastnets::q_sample_bwd", mutates_args=())
def _q_sample_bwd(dxt: Tensor, dv: Optional[Tensor], t: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    return _diffusion_kernels().q_sample_bwd(dxt, dv, t, table)


@_q_sample_bwd.register_fake
def _(dxt, dv, t, table):
    return torch.empty_like(dxt), torch.empty_like(dxt)


def _q_setup(ctx, inputs, output):
    _, _, t, table, target = inputs
    ctx.save_for_backward(t, table)
    ctx.target = target


def _q_backward(ctx, dxt, dv):
    t, table = ctx.saved_tensors
    dv = dv.contiguous() if ctx.target == "v_prediction" and dv is not None else None
    dx0, dnoise = torch.ops.fastnets.q_sample_bwd(dxt.contiguous(), dv, t, table)
    return dx0, dnoise, None, None, None


_q_sample_fwd.register_autograd(_q_backward, setup_context=_q_setup)


def q_sample_table(alphas_cumprod: Tensor, dtype: torch.dtype, device) -> Tensor:
    """(T, 2) [sqrt(abar), sqrt(1 - abar)] in the compute dtype, the table q_sample reads."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    abar = alphas_cumprod.to(device=device, dtype=torch.float64)
    return torch.stack([abar.sqrt(), (1 - abar).sqrt()], dim=1).to(acc).contiguous()


def q_sample(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
             target: Optional[str] = None, table: Optional[Tensor] = None):
    """The forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers'
    ``add_noise``), fused with the training target when asked: returns x_t, or ``(x_t,
    target)`` for target "epsilon" (the noise), "sample" (x0) or "v_prediction" (``sqrt(abar)
    noise - sqrt(1 - abar) x0``, diffusers' ``get_velocity``, written in the same pass).

    x0, noise: (B, ...) same shape; timesteps: (B,) integer (one per sample) or a scalar;
    alphas_cumprod: (T,) the schedule's cumulative products. Differentiable in x0 and
    noise (backward: one fused kernel). table: a cached ``q_sample_table`` to skip its
    three tiny kernels per call. Backends: triton, interpret, torch.
    """
    op = "q_sample"
    _checks.tensor(op, "x0", x0, min_dim=1)
    _checks.tensor(op, "noise", noise)
    if noise.shape != x0.shape or noise.device != x0.device or noise.dtype != x0.dtype:
        raise ValueError(f"{op}: noise must match x0 ({_describe(x0)}), got {_describe(noise)}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"{op}: target must be one of {', '.join(TARGETS)} or None, got {target!r}")
    if not isinstance(timesteps, Tensor):
        timesteps = torch.tensor(timesteps, device=x0.device)
    if timesteps.is_floating_point() or timesteps.is_complex():
        raise TypeError(f"{op}: timesteps must be an integer tensor, got {timesteps.dtype}")
    timesteps = timesteps.to(x0.device).reshape(-1)
    B = x0.shape[0]
    if timesteps.numel() == 1 and B != 1:
        timesteps = timesteps.expand(B)
    if timesteps.numel() != B:
        raise ValueError(f"{op}: timesteps must have one entry per sample ({B}), got {timesteps.numel()}")
    _checks.tensor(op, "alphas_cumprod", alphas_cumprod, min_dim=1)
    # Indexed as torch indexes alphas_cumprod[timesteps] (negative from the end); checked on
    # the host where that costs no sync, else the kernel makes an out-of-range sample NaN.
    _checks.table_index(op, "timesteps", timesteps, alphas_cumprod.shape[0])
    backend = _dispatch.choose(op, x0.device, empty=x0.numel() == 0)
    if backend == "torch":
        xt, v = reference.diffusion.q_sample(x0, noise, timesteps, alphas_cumprod)
    else:
        if table is None:
            table = q_sample_table(alphas_cumprod, x0.dtype, x0.device)
        xt, v = torch.ops.fastnets.q_sample_fwd(x0.contiguous(), noise.contiguous(), timesteps.contiguous(), table,
                                                "v_prediction" if target == "v_prediction" else "none")
    if target is None:
        return xt
    return xt, {"epsilon": noise, "sample": x0, "v_prediction": v}[target]


# --- timestep embedding: fastnets::timestep_embedding ---------------------------------------------------

@torch.library.custom_op("fastnets::timestep_embedding", mutates_args=())
def _timestep_embedding(t: Tensor, freqs: Tensor, dim: int, scale: float, flip: bool, dtype: torch.dtype) -> Tensor:
    return _diffusion_kernels().timestep_embedding(t, freqs, dim, scale, flip, dtype)


@_timestep_embedding.register_fake
def _(t, freqs, dim, scale, flip, dtype):
    return t.new_empty((t.shape[0], dim), dtype=dtype)


@functools.lru_cache(maxsize=64)
def _frequencies(dim: int, shift: float, max_period: float, device: torch.device) -> Tensor:
    return reference.diffusion.timestep_frequencies(dim, shift, max_period, device)


def timestep_embedding(timesteps: Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000, *,
                       dtype: Optional[torch.dtype] = None) -> Tensor:
    """diffusers' ``get_timestep_embedding`` in one kernel: (N,) timesteps (integer or float)
    to (N, embedding_dim) ``[sin | cos]`` of ``scale * t * max_period^(-k / (half - shift))``
    (``[cos | sin]`` with flip_sin_to_cos). Written directly in ``dtype`` (default float32),
    the dtype of the first linear that reads it. Not differentiable in timesteps."""
    op = "timestep_embedding"
    if not isinstance(timesteps, Tensor) or timesteps.dim() != 1:
        raise ValueError(f"{op}: timesteps must be a 1-D tensor, got {_describe(timesteps)}")
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 2:
        raise ValueError(f"{op}: embedding_dim must be an int >= 2, got {embedding_dim!r}")
    if embedding_dim // 2 == downscale_freq_shift:
        raise ValueError(f"{op}: downscale_freq_shift ({downscale_freq_shift}) must differ from embedding_dim // 2")
    dtype = dtype or torch.float32
    backend = _dispatch.choose(op, timesteps.device, empty=timesteps.numel() == 0)
    if backend == "torch":
        return reference.diffusion.timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos,
                                                      downscale_freq_shift, scale, max_period).to(dtype)
    freqs = _frequencies(embedding_dim, float(downscale_freq_shift), float(max_period), timesteps.device)
    return torch.ops.fastnets.timestep_embedding(timesteps.contiguous(), freqs, embedding_dim, float(scale),
                                                 bool(flip_sin_to_cos), dtype)
