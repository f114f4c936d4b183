"""Random numbers drawn exactly as diffusers draws them, so the same generator gives the
same samples in fastnets and in diffusers (schedulers' noise, VAE reparameterization)."""
from __future__ import annotations

import torch
from torch import Tensor


def randn_like_diffusers(shape, generator, device, dtype) -> Tensor:
    """diffusers' randn_tensor: a CPU generator draws on the CPU and the result moves; a
    list of generators draws one sample each. Same generator -> same numbers as diffusers."""
    device = torch.device(device)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, (list, tuple)) else generator.device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator is on {gen_type} but the noise is needed on {device.type}")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator list has {len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)
