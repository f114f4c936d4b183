"""Drop-in schedulers for diffusers pipelines, each step one fused kernel.

Each class takes the config keys of the diffusers class of the same name and has its
methods and attributes (set_timesteps, timesteps, init_noise_sigma, order, step_index,
begin_index, set_begin_index, scale_model_input, add_noise, step, from_config, config), so

    pipe.scheduler = fastnets.diffusion.DDIMScheduler.from_config(pipe.scheduler.config)

gives the same images from the same generator. What differs is how a step runs:

* set_timesteps(device=...) computes, on the host in float64, every step's coefficients
  (fastnets/kernels/diffusion.py's affine form) into one device table, and allocates a device step
  index. step() then sets the index (a fill kernel, no copy from the host), draws the noise
  the diffusers step would draw (same generator, shape, dtype and order) and launches one
  kernel. No `.item()`, no `.nonzero()`, no indexing of a CPU table by a device timestep.
* The step index of a timestep is found without touching the device: a timestep taken from
  `scheduler.timesteps` (the pipeline loop) is a view whose storage offset is its index; a
  Python number or a CPU tensor is looked up on the host. Only a device tensor from
  elsewhere costs one sync.
* Tables depend on step() options (eta, s_churn, ...) and, for DPM-Solver, on the index
  the run began at; each variant is built once and cached.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import ops
from .._random import randn_like_diffusers  # noqa: F401  (re-exported by fastnets.diffusion)
from ..ops import diffusion as _dops
from . import schedules


@dataclasses.dataclass
class SchedulerOutput:
    """``prev_sample`` and (except for DPM-Solver) ``pred_original_sample``; indexable like
    diffusers' outputs (``out[0]``, ``out.to_tuple()``)."""
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())


class SchedulerConfig(dict):
    """The constructor arguments, readable as keys or attributes (as diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("scheduler config is frozen: build a new scheduler with from_config(config, **changes)")


@dataclasses.dataclass
class _Plan:
    """Everything one schedule variant needs per step: the coefficient rows (float64), which
    steps draw noise, whether the multistep history is used."""
    coef: np.ndarray
    noise: list
    history: bool = False
    _tables: dict = dataclasses.field(default_factory=dict)

    def table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        key = (acc, str(device))
        if key not in self._tables:
            self._tables[key] = torch.tensor(self.coef, dtype=acc, device=device)
        return self._tables[key]


def _row(**kw) -> np.ndarray:
    row = np.zeros(_dops.N_COEFS)
    for k, v in kw.items():
        row[_dops.COEFS.index(k)] = v
    return row


class _FusedScheduler:
    """What the five schedulers share: config, index bookkeeping, the device table and the step launch."""

    _defaults: dict = {}
    order = 1
    _noise_dtype_float32 = False   # DPM-Solver draws its SDE noise in float32, the others in the model dtype
    _returns_x0 = True

    def __init__(self, **kwargs):
        name = type(self).__name__
        unknown = sorted(set(kwargs) - set(self._defaults))
        if unknown:
            raise TypeError(f"{name}: unknown config keys {unknown}; known: {', '.join(sorted(self._defaults))}")
        cfg = dict(self._defaults)
        cfg.update(kwargs)
        if isinstance(cfg.get("trained_betas"), np.ndarray):
            cfg["trained_betas"] = cfg["trained_betas"].tolist()
        pt = cfg.get("prediction_type")
        if pt not in self._prediction_types():
            raise ValueError(f"{name}: prediction_type must be one of {', '.join(self._prediction_types())}, "
                             f"got {pt!r}")
        if cfg.get("timestep_spacing") not in schedules.SPACINGS:
            raise ValueError(f"{name}: timestep_spacing must be one of {', '.join(schedules.SPACINGS)}, "
                             f"got {cfg.get('timestep_spacing')!r}")
        if not isinstance(cfg["num_train_timesteps"], int) or cfg["num_train_timesteps"] < 1:
            raise ValueError(f"{name}: num_train_timesteps must be a positive int, got {cfg['num_train_timesteps']!r}")
        self._config = SchedulerConfig(cfg)
        self.betas = schedules.make_betas(name, cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._plans: dict = {}
        self._index_dev: dict = {}
        self._index_value: dict = {}
        self._q_tables: dict = {}
        self._init_schedule()

    # --- config ----------------------------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Build from a config dict (or diffusers' FrozenDict, or anything with ``.config``);
        keys this class does not take (diffusers' ``_class_name``, other schedulers' options)
        are ignored, as diffusers ignores them; kwargs override."""
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        merged = dict(config or {})
        merged.update(kwargs)
        return cls(**{k: v for k, v in merged.items() if k in cls._defaults})

    def _prediction_types(self):
        return schedules.PREDICTION_TYPES

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- indices -----------------------------------------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _lookup(self, timestep) -> int:
        """Index of `timestep` in self.timesteps, found on the host (see the module doc)."""
        ts = self.timesteps
        if isinstance(timestep, Tensor):
            if (timestep.numel() == 1 and timestep.device == ts.device and ts.numel()
                    and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
                    and timestep.dtype == ts.dtype):
                return timestep.storage_offset() - ts.storage_offset()
            value = timestep.reshape(-1)[0].item()   # CPU: free; a foreign device tensor: one sync
        else:
            value = timestep
        hits = np.nonzero(self._timesteps_np == np.asarray(value, dtype=self._timesteps_np.dtype))[0]
        if len(hits) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {value} is not in the schedule "
                             f"(scheduler.timesteps after set_timesteps)")
        return int(hits[1] if len(hits) > 1 and self._second_match() else hits[0])

    def _second_match(self) -> bool:
        return False

    def _current_index(self, timestep) -> int:
        return self._lookup(timestep)

    def _device_index(self, i: int, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._index_dev:
            self._index_dev[key] = torch.zeros(1, dtype=torch.int32, device=device)
            self._index_value[key] = 0
        if self._index_value[key] != i:
            self._index_dev[key].fill_(i)      # a fill kernel: the value travels as an argument, no copy, no sync
            self._index_value[key] = i
        return self._index_dev[key]

    def _store_timesteps(self, timesteps: np.ndarray, device) -> None:
        self._timesteps_np = np.asarray(timesteps)
        self.timesteps = torch.from_numpy(self._timesteps_np.copy()).to(device)
        self.num_inference_steps = len(self._timesteps_np)
        self._step_index = None
        self._begin_index = None
        self._plans = {}
        self._index_value = {k: -1 for k in self._index_value}
        self._history = None
        self._device = torch.device(device) if device is not None else None

    # --- the step ----------------------------------------------------------------------------------
    def _plan(self, key: tuple) -> _Plan:
        if key not in self._plans:
            self._plans[key] = self._build_plan(*key)
        return self._plans[key]

    def _kernel_options(self, model_output: Tensor, sample: Tensor) -> tuple[Tensor, dict]:
        """The model output as the kernel reads it, and the config's per-element options
        (clipping, thresholding, learned variance): shared by step() and sample()'s graph."""
        return model_output, {}

    def _clip_options(self) -> dict:
        cfg = self.config
        return {"clip_sample_range": cfg.clip_sample_range if cfg.get("clip_sample") and not cfg.thresholding else None,
                "thresholding": (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None}

    def _fused_step(self, model_output: Tensor, sample: Tensor, i: int, plan: _Plan, *, generator, variance_noise,
                    guidance_scale, guidance_rescale):
        if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
            raise TypeError(f"{type(self).__name__}.step: model_output and sample must be tensors")
        model_output, options = self._kernel_options(model_output, sample)
        noise = None
        if plan.noise[i]:
            if variance_noise is not None:
                if generator is not None:
                    raise ValueError(f"{type(self).__name__}.step: pass generator or variance_noise, not both")
                noise = variance_noise.to(device=sample.device)
            else:
                dtype = torch.float32 if self._noise_dtype_float32 else model_output.dtype
                noise = randn_like_diffusers(sample.shape, generator, model_output.device, dtype)
            if noise.shape != sample.shape:
                raise ValueError(f"{type(self).__name__}.step: variance_noise must have shape {tuple(sample.shape)}, "
                                 f"got {tuple(noise.shape)}")
        history = None
        if plan.history:
            acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
            if (self._history is None or self._history.shape != sample.shape or self._history.dtype != acc
                    or self._history.device != sample.device):
                self._history = torch.zeros(sample.shape, dtype=acc, device=sample.device)
            history = self._history
        table = plan.table(sample.dtype, sample.device)
        index = self._device_index(i, sample.device)
        with torch.no_grad():
            prev, x0 = ops.sampler_step(sample, model_output, table, index, noise=noise, history=history,
                                        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                        return_x0=self._returns_x0, **options)
        if guidance_scale is None and model_output.dtype != prev.dtype:
            prev = prev.to(model_output.dtype)
        return prev, x0

    def _output(self, prev, x0, return_dict):
        out = SchedulerOutput(prev, x0)
        return out if return_dict else out.to_tuple()

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    # --- training ----------------------------------------------------------------------------------
    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise in one fused kernel (fastnets.ops.q_sample)."""
        return ops.q_sample(original_samples, noise, timesteps, self.alphas_cumprod,
                            table=self._q_table(original_samples))

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
        return ops.q_sample(sample, noise, timesteps, self.alphas_cumprod, target="v_prediction",
                            table=self._q_table(sample))[1]

    def _q_table(self, x: Tensor) -> Tensor:
        key = (x.dtype == torch.float64, str(x.device))
        if key not in self._q_tables:
            self._q_tables[key] = _dops.q_sample_table(self.alphas_cumprod, x.dtype, x.device)
        return self._q_tables[key]

    # Used by fastnets.diffusion.sample to build a CUDA-graph loop: the full per-step plan, the
    # model's timestep per step and the model-input scale per step.
    def _loop_plan(self, **step_kwargs) -> _Plan:
        raise NotImplementedError

    def _input_scales(self) -> Optional[np.ndarray]:
        return None


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
           "rescale_betas_zero_snr": False}


def _vp_x0(prediction_type: str, abar: float) -> tuple[float, float]:
    """(a_x, a_m) with x0 = a_x x + a_m m in the variance-preserving parametrisation."""
    sa, sb = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa
    if prediction_type == "sample":
        return 0.0, 1.0
    return sa, -sb


class DDPMScheduler(_FusedScheduler):
    """Ancestral sampling (Ho et al. 2020) as diffusers' DDPMScheduler: posterior variance
    fixed_small / fixed_small_log / fixed_large / learned / learned_range, clipping and
    dynamic thresholding of x0, epsilon / sample / v_prediction."""

    _defaults = dict(_COMMON, variance_type="fixed_small", clip_sample=True, thresholding=False,
                     dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0)
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

    def _init_schedule(self):
        if self.config.variance_type not in self.VARIANCE_TYPES:
            raise ValueError(f"DDPMScheduler: variance_type must be one of {', '.join(self.VARIANCE_TYPES)}, got "
                             f"{self.config.variance_type!r}")
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = self.config.variance_type
        self.custom_timesteps = False
        T = self.config.num_train_timesteps
        self._store_timesteps(np.arange(0, T)[::-1].copy(), None)
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[list] = None) -> None:
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("DDPMScheduler: pass num_inference_steps or timesteps, not both")
        if timesteps is not None:
            if any(timesteps[i] >= timesteps[i - 1] for i in range(1, len(timesteps))):
                raise ValueError("DDPMScheduler: custom timesteps must be in descending order")
            if timesteps[0] >= T:
                raise ValueError(f"DDPMScheduler: timesteps must start below num_train_timesteps ({T})")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None or num_inference_steps < 1 or num_inference_steps > T:
                raise ValueError(f"DDPMScheduler: num_inference_steps must be in [1, {T}], got {num_inference_steps}")
            ts = schedules.spaced_timesteps("DDPMScheduler", self.config.timestep_spacing, T, num_inference_steps,
                                            self.config.steps_offset, np.int64)
            self.custom_timesteps = False
        self._store_timesteps(ts, device)
        if device is not None:
            self._plan(()).table(torch.float32, self._device)

    def previous_timestep(self, timestep):
        i = self._lookup(timestep)
        return int(self._timesteps_np[i + 1]) if i + 1 < len(self._timesteps_np) else -1

    def _build_plan(self) -> _Plan:
        cfg, acp = self.config, self.alphas_cumprod.double().numpy()
        rows, noise = [], []
        ts = self._timesteps_np
        for i, t in enumerate(ts):
            prev_t = int(ts[i + 1]) if i + 1 < len(ts) else -1
            abar, abar_prev = acp[t], (acp[prev_t] if prev_t >= 0 else 1.0)
            beta_prod, beta_prod_prev = 1 - abar, 1 - abar_prev
            cur_alpha = abar / abar_prev
            cur_beta = 1 - cur_alpha
            a_x, a_m = _vp_x0(cfg.prediction_type, abar)
            row = _row(a_x=a_x, a_m=a_m, p=math.sqrt(cur_alpha) * beta_prod_prev / beta_prod,
                       q=math.sqrt(abar_prev) * cur_beta / beta_prod)
            var = max((1 - abar_prev) / (1 - abar) * cur_beta, 1e-20)
            if t > 0:
                vt = self.variance_type
                row[6] = {"fixed_small": math.sqrt(var), "fixed_small_log": math.sqrt(var),
                          "fixed_large": math.sqrt(cur_beta)}.get(vt, 1.0)
                if vt == "learned_range":
                    row[8], row[9] = math.log(var), math.log(cur_beta)
            rows.append(row)
            noise.append(bool(t > 0))
        return _Plan(np.stack(rows), noise)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             variance_noise: Optional[Tensor] = None, guidance_scale: Optional[float] = None,
             guidance_rescale: float = 0.0):
        """diffusers' DDPMScheduler.step. fastnets extras: variance_noise (the noise to use),
        guidance_scale / guidance_rescale (model_output batched [uncond | cond])."""
        i = self._lookup(timestep)
        prev, x0 = self._fused_step(model_output, sample, i, self._plan(()), generator=generator,
                                    variance_noise=variance_noise, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale)
        return self._output(prev, x0, return_dict)

    def _kernel_options(self, model_output: Tensor, sample: Tensor) -> tuple[Tensor, dict]:
        options = self._clip_options()
        if self.variance_type in ("learned", "learned_range"):
            C = sample.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"DDPMScheduler: variance_type {self.variance_type!r} needs model_output with 2 x "
                                 f"{C} channels (prediction | variance), got {model_output.shape[1]}")
            options["variance"] = self.variance_type
        return model_output, options

    def _loop_plan(self, **kw) -> _Plan:
        return self._plan(())


class DDIMScheduler(_FusedScheduler):
    """DDIM (Song et al. 2021) as diffusers' DDIMScheduler: eta, use_clipped_model_output,
    variance_noise, set_alpha_to_one, clipping and dynamic thresholding."""

    _defaults = dict(_COMMON, clip_sample=True, set_alpha_to_one=True, thresholding=False,
                     dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0)

    def _init_schedule(self):
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        T = self.config.num_train_timesteps
        self._store_timesteps(np.arange(0, T)[::-1].copy().astype(np.int64), None)
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"DDIMScheduler: num_inference_steps must be an int in [1, {T}], got "
                             f"{num_inference_steps!r}")
        ts = schedules.spaced_timesteps("DDIMScheduler", self.config.timestep_spacing, T, num_inference_steps,
                                        self.config.steps_offset, np.int64)
        self._store_timesteps(ts, device)
        self.num_inference_steps = num_inference_steps
        if device is not None:
            self._plan((0.0, False)).table(torch.float32, self._device)

    def _build_plan(self, eta: float, use_clipped: bool) -> _Plan:
        cfg, acp = self.config, self.alphas_cumprod.double().numpy()
        final = float(self.final_alpha_cumprod)
        stride = cfg.num_train_timesteps // self.num_inference_steps
        rows = []
        for t in self._timesteps_np:
            prev_t = int(t) - stride      # diffusers' DDIM steps back by T // N whatever the spacing
            abar, abar_prev = acp[t], (acp[prev_t] if prev_t >= 0 else final)
            beta, beta_prev = 1 - abar, 1 - abar_prev
            variance = (beta_prev / beta) * (1 - abar / abar_prev)
            std = eta * math.sqrt(variance)
            direction = math.sqrt(max(1 - abar_prev - std * std, 0.0))
            sa, sb = math.sqrt(abar), math.sqrt(beta)
            a_x, a_m = _vp_x0(cfg.prediction_type, abar)
            q = math.sqrt(abar_prev)
            # pred_epsilon = e_x x + e_m m + e_0 x0 (x0 after clipping), then prev = sqrt(abar_prev) x0 + dir * eps.
            if use_clipped:
                e_x, e_m, e_0 = 1 / sb, 0.0, -sa / sb
            elif cfg.prediction_type == "epsilon":
                e_x, e_m, e_0 = 0.0, 1.0, 0.0
            elif cfg.prediction_type == "sample":
                e_x, e_m, e_0 = 1 / sb, -sa / sb, 0.0
            else:
                e_x, e_m, e_0 = sb, sa, 0.0
            rows.append(_row(a_x=a_x, a_m=a_m, p=direction * e_x, q=q + direction * e_0, s=direction * e_m,
                             r=std if eta > 0 else 0.0))
        return _Plan(np.stack(rows), [eta > 0] * len(rows))

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True, *, guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0):
        """diffusers' DDIMScheduler.step. fastnets extras: guidance_scale / guidance_rescale
        (model_output batched [uncond | cond])."""
        self._require_timesteps()
        i = self._lookup(timestep)
        eta = float(eta)
        if eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be >= 0, got {eta}")
        prev, x0 = self._fused_step(
            model_output, sample, i, self._plan((eta, bool(use_clipped_model_output))), generator=generator,
            variance_noise=variance_noise, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        return self._output(prev, x0, return_dict)

    def _kernel_options(self, model_output: Tensor, sample: Tensor) -> tuple[Tensor, dict]:
        return model_output, self._clip_options()

    def _loop_plan(self, eta: float = 0.0, use_clipped_model_output: bool = False, **kw) -> _Plan:
        return self._plan((float(eta), bool(use_clipped_model_output)))


class _SigmaScheduler(_FusedScheduler):
    """Euler-family bookkeeping: sigmas on the host, the step counter, index_for_timestep."""

    def _karras_bounds(self):
        return self.config.get("sigma_min"), self.config.get("sigma_max")

    def _init_sigma_schedule(self):
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2 ** -24
        T = self.config.num_train_timesteps
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._store_timesteps(np.linspace(0, T - 1, T, dtype=float)[::-1].copy().astype(np.float32), None)
        self.num_inference_steps = None

    def _second_match(self) -> bool:
        return True     # diffusers starts at the second match of a repeated timestep (img2img)

    def _current_index(self, timestep) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._lookup(timestep)
        return self._step_index

    def _step_position(self, timestep) -> int:
        """The step index for step(), after diffusers' checks (set_timesteps called, a timestep
        from the schedule rather than an integer index, steps left)."""
        self._require_timesteps()
        if isinstance(timestep, int) or (isinstance(timestep, Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"{type(self).__name__}.step: pass one of scheduler.timesteps as the timestep, not an "
                             "integer index")
        i = self._current_index(timestep)
        if i >= self.num_inference_steps:
            raise ValueError(f"{type(self).__name__}.step: all {self.num_inference_steps} steps are done; call "
                             "set_timesteps again")
        return i

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        if schedule_timesteps is not None:
            hits = (schedule_timesteps == timestep).nonzero()
            return hits[1 if len(hits) > 1 else 0].item()
        return self._lookup(timestep)

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """sample / sqrt(sigma^2 + 1): sigma is a host number, so this is one kernel and no sync."""
        i = self._current_index(timestep)
        self.is_scale_input_called = True
        return sample / float((self.sigmas[i] ** 2 + 1) ** 0.5)

    def _input_scales(self) -> np.ndarray:
        s = self.sigmas.double().numpy()[:-1]
        return 1.0 / np.sqrt(s * s + 1.0)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x + sigma(t) noise, sigma looked up on the host (as diffusers does)."""
        sig = self._sigmas_for(timesteps, original_samples)
        return original_samples + noise * sig

    def _sigmas_for(self, timesteps, like: Tensor) -> Tensor:
        ts = timesteps.reshape(-1).tolist() if isinstance(timesteps, Tensor) else [timesteps]
        if self._begin_index is None:
            idx = [self._lookup(t) for t in ts]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(ts)
        sig = self.sigmas[idx].to(device=like.device, dtype=like.dtype)
        return sig.view(-1, *([1] * (like.dim() - 1)))

    def _sigma_timesteps(self, num_inference_steps, device, sigmas=None, timesteps=None):
        """(timesteps, sigmas) as diffusers' EulerDiscreteScheduler.set_timesteps builds them."""
        cfg = self.config
        T = cfg.num_train_timesteps
        acp = self.alphas_cumprod.numpy()
        log_sigmas = np.log(np.array(((1 - acp) / acp) ** 0.5))
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = np.array([schedules.sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
            return timesteps, sigmas
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.float32)
        else:
            timesteps = schedules.spaced_timesteps(type(self).__name__, cfg.timestep_spacing, T, num_inference_steps,
                                                   cfg.steps_offset, np.float32)
        base = np.array(((1 - acp) / acp) ** 0.5)
        interp = cfg.get("interpolation_type", "linear")
        if interp == "linear":
            sig = np.interp(timesteps, np.arange(0, len(base)), base)
        elif interp == "log_linear":
            sig = torch.linspace(np.log(base[-1]), np.log(base[0]), num_inference_steps + 1).exp().numpy()
        else:
            raise ValueError(f"{type(self).__name__}: interpolation_type must be 'linear' or 'log_linear', got "
                             f"{interp!r}")
        if cfg.get("use_karras_sigmas"):
            smin, smax = self._karras_bounds()
            sig = schedules.karras_sigmas(smin if smin is not None else sig[-1].item(),
                                          smax if smax is not None else sig[0].item(), num_inference_steps)
            timesteps = np.array([schedules.sigma_to_t(s, log_sigmas) for s in sig])
        final = cfg.get("final_sigmas_type", "zero")
        if final == "sigma_min":
            last = ((1 - acp[0]) / acp[0]) ** 0.5
        elif final == "zero":
            last = 0
        else:
            raise ValueError(f"{type(self).__name__}: final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
        return timesteps, np.concatenate([sig, [last]]).astype(np.float32)


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler (Karras et al. 2022, Algorithm 2) as diffusers' EulerDiscreteScheduler:
    Karras sigmas, s_churn / s_tmin / s_tmax / s_noise, final_sigmas_type, custom sigmas."""

    _defaults = dict(_COMMON, timestep_spacing="linspace", interpolation_type="linear", use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
                     timestep_type="discrete", final_sigmas_type="zero")

    def _init_schedule(self):
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            if self.config[key]:
                raise NotImplementedError(f"{type(self).__name__}: {key} is not implemented in fastnets (use "
                                          "use_karras_sigmas or the default sigmas)")
        if self.config.timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"{type(self).__name__}: timestep_type must be 'discrete' or 'continuous'")
        self.is_scale_input_called = False
        self._init_sigma_schedule()
        if self._continuous():
            self._store_timesteps(np.array([0.25 * math.log(s) for s in self.sigmas.numpy()[:-1]], np.float32), None)
            self.num_inference_steps = None

    def _continuous(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None, sigmas=None):
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{type(self).__name__}: pass timesteps or sigmas, not both")
        if timesteps is not None and self.config.use_karras_sigmas:
            raise ValueError(f"{type(self).__name__}: cannot set timesteps with use_karras_sigmas")
        if num_inference_steps is None:
            if timesteps is None and sigmas is None:
                raise ValueError(f"{type(self).__name__}: pass num_inference_steps, timesteps or sigmas")
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        ts, sig = self._sigma_timesteps(num_inference_steps, device, sigmas=sigmas, timesteps=timesteps)
        self.sigmas = torch.from_numpy(sig)
        if self._continuous():
            ts = np.array([0.25 * math.log(s) for s in sig[:-1]], dtype=np.float32)
        self._store_timesteps(np.asarray(ts).astype(np.float32), device)
        self.num_inference_steps = num_inference_steps
        if device is not None:
            self._plan((0.0, 0.0, float("inf"), 1.0)).table(torch.float32, self._device)

    def _build_plan(self, s_churn, s_tmin, s_tmax, s_noise) -> _Plan:
        pt = self.config.prediction_type
        sig32 = self.sigmas.numpy()
        sig = sig32.astype(np.float64)
        rows, noise = [], []
        for i in range(len(sig) - 1):
            sigma = sig[i]
            gamma = min(s_churn / (len(sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sig32[i] <= s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            k_pre = s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) if gamma > 0 else 0.0
            if pt == "sample":
                a_x, a_m = 0.0, 1.0
            elif pt == "epsilon":
                a_x, a_m = 1.0, -sigma_hat
            else:
                a_x, a_m = 1.0 / (sigma ** 2 + 1), -sigma / math.sqrt(sigma ** 2 + 1)
            dt = sig[i + 1] - sigma_hat
            rows.append(_row(k_pre=k_pre, a_x=a_x, a_m=a_m, p=1.0 + dt / sigma_hat, q=-dt / sigma_hat))
            noise.append(gamma > 0)
        return _Plan(np.stack(rows), noise)

    def _prediction_types(self):
        return ("epsilon", "v_prediction", "sample", "original_sample")

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             variance_noise: Optional[Tensor] = None, guidance_scale: Optional[float] = None,
             guidance_rescale: float = 0.0):
        """diffusers' EulerDiscreteScheduler.step (x0 is returned in the sample's dtype)."""
        i = self._step_position(timestep)
        plan = self._plan((float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))
        prev, x0 = self._fused_step(model_output, sample, i, plan, generator=generator, variance_noise=variance_noise,
                                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        self._step_index += 1
        return self._output(prev, x0, return_dict)

    def _loop_plan(self, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, **kw) -> _Plan:
        return self._plan((float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler ancestral as diffusers' EulerAncestralDiscreteScheduler (sample prediction added)."""

    _defaults = dict(_COMMON, timestep_spacing="linspace")

    def _init_schedule(self):
        self.is_scale_input_called = False
        self._init_sigma_schedule()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"{type(self).__name__}: num_inference_steps must be an int in [1, {T}], got "
                             f"{num_inference_steps!r}")
        ts = schedules.spaced_timesteps(type(self).__name__, self.config.timestep_spacing, T, num_inference_steps,
                                        self.config.steps_offset, np.float32)
        acp = self.alphas_cumprod.numpy()
        sig = np.interp(ts, np.arange(0, len(acp)), np.array(((1 - acp) / acp) ** 0.5))
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self._store_timesteps(ts, device)
        if device is not None:
            self._plan(()).table(torch.float32, self._device)

    def _build_plan(self) -> _Plan:
        pt = self.config.prediction_type
        sig = self.sigmas.numpy().astype(np.float64)
        rows = []
        for i in range(len(sig) - 1):
            s_from, s_to = sig[i], sig[i + 1]
            s_up = math.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
            s_down = math.sqrt(max(s_to ** 2 - s_up ** 2, 0.0))
            if pt == "epsilon":
                a_x, a_m = 1.0, -s_from
            elif pt == "sample":
                a_x, a_m = 0.0, 1.0
            else:
                a_x, a_m = 1.0 / (s_from ** 2 + 1), -s_from / math.sqrt(s_from ** 2 + 1)
            dt = s_down - s_from
            rows.append(_row(a_x=a_x, a_m=a_m, p=1.0 + dt / s_from, q=-dt / s_from, r=s_up))
        return _Plan(np.stack(rows), [True] * len(rows))

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             variance_noise: Optional[Tensor] = None, guidance_scale: Optional[float] = None,
             guidance_rescale: float = 0.0):
        """diffusers' EulerAncestralDiscreteScheduler.step."""
        i = self._step_position(timestep)
        prev, x0 = self._fused_step(model_output, sample, i, self._plan(()), generator=generator,
                                    variance_noise=variance_noise, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale)
        self._step_index += 1
        return self._output(prev, x0, return_dict)

    def _loop_plan(self, **kw) -> _Plan:
        return self._plan(())


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++ (Lu et al. 2022) 1S / 2M and its SDE form, as diffusers'
    DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" or "sde-dpmsolver++",
    solver_type midpoint / heun, solver_order 1 or 2. The previous step's x0 stays on the
    device in a float32 history buffer the step kernel reads and rewrites."""

    _defaults = dict(_COMMON, timestep_spacing="linspace", solver_order=2, thresholding=False,
                     dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
                     solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                     use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                     lambda_min_clipped=-float("inf"), variance_type=None, use_dynamic_shifting=False,
                     time_shift_type="exponential")
    _noise_dtype_float32 = True
    _returns_x0 = False

    def _init_schedule(self):
        cfg, name = self.config, type(self).__name__
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise NotImplementedError(f"{name}: algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++' (the "
                                      f"deprecated noise-prediction forms are not implemented), got "
                                      f"{cfg.algorithm_type!r}")
        if cfg.solver_order not in (1, 2):
            raise NotImplementedError(f"{name}: solver_order must be 1 or 2 (3 is not implemented), got "
                                      f"{cfg.solver_order!r}")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{name}: solver_type must be 'midpoint' or 'heun', got {cfg.solver_type!r}")
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                    "use_dynamic_shifting"):
            if cfg[key]:
                raise NotImplementedError(f"{name}: {key} is not implemented in fastnets")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', got "
                             f"{cfg.final_sigmas_type!r}")
        if cfg.variance_type not in (None, "learned", "learned_range"):
            raise ValueError(f"{name}: variance_type must be None, 'learned' or 'learned_range'")
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        T = cfg.num_train_timesteps
        self._store_timesteps(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy(), None)
        self.num_inference_steps = None
        self.lower_order_nums = 0

    @property
    def init_noise_sigma(self):
        return 1.0

    def _karras_bounds(self):
        return None, None

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        return sample

    def _input_scales(self):
        return None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None,
                      timesteps: Optional[list] = None) -> None:
        cfg, name = self.config, type(self).__name__
        if mu is not None:
            raise NotImplementedError(f"{name}: dynamic shifting (mu) is not implemented in fastnets")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError(f"{name}: cannot use timesteps with use_karras_sigmas")
        T = cfg.num_train_timesteps
        acp = self.alphas_cumprod.numpy()
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
        else:
            if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
                raise ValueError(f"{name}: num_inference_steps must be an int in [1, {T}], got "
                                 f"{num_inference_steps!r}")
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last = int((cfg.num_train_timesteps - clipped_idx).numpy().item())
            ts = schedules.spaced_timesteps(name, cfg.timestep_spacing, T, num_inference_steps, cfg.steps_offset,
                                            np.int64, last=last, plus_one=True)
        base = np.array(((1 - acp) / acp) ** 0.5)
        log_sigmas = np.log(base)
        if cfg.use_karras_sigmas:
            flipped = np.flip(base).copy()
            sig = schedules.karras_sigmas(flipped[-1].item(), flipped[0].item(), num_inference_steps)
            ts = np.array([schedules.sigma_to_t(s, log_sigmas) for s in sig])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sig = np.interp(ts, np.arange(0, len(base)), base)
        last_sigma = ((1 - acp[0]) / acp[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sig, [last_sigma]]).astype(np.float32))
        self._store_timesteps(np.asarray(ts).astype(np.int64), device)
        self.lower_order_nums = 0
        self.model_outputs = [None] * cfg.solver_order
        if device is not None:
            self._plan((0,)).table(torch.float32, self._device)

    def _order_at(self, i: int, lower_order_nums: int) -> int:
        cfg, n = self.config, len(self._timesteps_np)
        final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        if cfg.solver_order == 1 or lower_order_nums < 1 or final:
            return 1
        return 2

    def _build_plan(self, begin: int) -> _Plan:
        cfg = self.config
        pt, sde = cfg.prediction_type, cfg.algorithm_type == "sde-dpmsolver++"
        sig = self.sigmas.numpy().astype(np.float64)
        rows = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(len(sig) - 1):
                order = self._order_at(i, i - begin) if i >= begin else 1
                alpha_s, sigma_s = _alpha_sigma(sig[i])
                alpha_t, sigma_t = _alpha_sigma(sig[i + 1])
                lam_s = math.log(alpha_s) - math.log(sigma_s)
                lam_t = math.log(alpha_t) - (math.log(sigma_t) if sigma_t > 0 else -math.inf)
                h = lam_t - lam_s
                if pt == "epsilon":
                    a_x, a_m = 1.0 / alpha_s, -sigma_s / alpha_s
                elif pt == "sample":
                    a_x, a_m = 0.0, 1.0
                else:
                    a_x, a_m = alpha_s, -sigma_s
                e_h = math.exp(-h)
                if sde:
                    e_2h = math.exp(-2.0 * h)
                    p = sigma_t / sigma_s * e_h
                    A = alpha_t * (1 - e_2h)
                    r = sigma_t * math.sqrt(1.0 - e_2h)
                else:
                    p = sigma_t / sigma_s
                    A = -alpha_t * (e_h - 1.0)
                    r = 0.0
                q, u = A, 0.0
                if order == 2:
                    alpha_s1, sigma_s1 = _alpha_sigma(sig[i - 1])
                    h_0 = lam_s - (math.log(alpha_s1) - math.log(sigma_s1))
                    r0 = h_0 / h
                    if cfg.solver_type == "midpoint":
                        q, u = A * (1 + 0.5 / r0), -A * 0.5 / r0
                    else:
                        Bc = (alpha_t * ((1.0 - e_2h) / (-2.0 * h) + 1.0) if sde
                              else alpha_t * ((e_h - 1.0) / h + 1.0))
                        q, u = A + Bc / r0, -Bc / r0
                rows.append(_row(a_x=a_x, a_m=a_m, p=p, q=q, r=r, u=u))
        return _Plan(np.stack(rows), [sde] * len(rows), history=cfg.solver_order > 1)

    def _prediction_types(self):
        return schedules.PREDICTION_TYPES

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0):
        """diffusers' DPMSolverMultistepScheduler.step (returns prev_sample only, as it does)."""
        self._require_timesteps()
        cfg = self.config
        start = self._step_index is None
        i = self._current_index(timestep)
        if i >= self.num_inference_steps:
            raise ValueError(f"{type(self).__name__}.step: all {self.num_inference_steps} steps are done; call "
                             "set_timesteps again")
        if start:
            self._run_begin = i - self.lower_order_nums
        plan = self._plan((self._run_begin,))
        expected = self._order_at(i, self.lower_order_nums)
        if expected != self._order_at(i, i - self._run_begin):
            plan = self._plan((i - self.lower_order_nums,))
        prev, _ = self._fused_step(model_output, sample, i, plan, generator=generator, variance_noise=variance_noise,
                                   guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        out = SchedulerOutput(prev)
        return out if return_dict else (prev,)

    def _kernel_options(self, model_output: Tensor, sample: Tensor) -> tuple[Tensor, dict]:
        C = sample.shape[1]
        if self.config.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C].contiguous()     # the predicted variance is not used here
        return model_output, self._clip_options()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """alpha_t x + sigma_t noise with (alpha_t, sigma_t) of the schedule's sigma at t."""
        sig = self._sigmas_for(timesteps, original_samples)
        alpha = 1 / (sig ** 2 + 1) ** 0.5
        return alpha * original_samples + alpha * sig * noise

    def _loop_plan(self, **kw) -> _Plan:
        return self._plan((0,))

    def _store_timesteps(self, timesteps, device) -> None:
        super()._store_timesteps(timesteps, device)
        self.lower_order_nums = 0
        self._run_begin = 0
