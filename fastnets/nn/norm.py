from __future__ import annotations

import torch
from torch import nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` running fastnets' layer_norm kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` running fastnets' rms_norm kernels.

    Extra keyword ``offset`` (default 0.0): scale by ``offset + weight``; Gemma uses 1.0
    with weights initialised to zero. It is not a parameter, so state_dict keys match torch.
    """

    offset: float = 0.0

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 offset: float = 0.0):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.offset = float(offset)
        if offset and self.weight is not None:
            with torch.no_grad():
                self.weight.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps, offset=self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` running fastnets' group_norm kernels.

    Extra keyword ``activation`` (None or "silu") fuses the SiLU that UNet and VAE resnet
    blocks apply right after the norm.
    """

    activation: str | None = None

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *,
                 activation: str | None = None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        if activation not in (None, "silu"):
            raise ValueError(f"GroupNorm: activation must be None or 'silu', got {activation!r}")
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")
