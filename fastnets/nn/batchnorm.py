"""BatchNorm2d on fastnets' batch_norm kernels, and FoldedBatchNorm2d: a BatchNorm2d whose
eval-mode work a preceding FusedConv2d does (fastnets.nn.conv)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops

_IDENTITY = "identity"


def check_activation(cls: str, activation: str) -> str:
    if activation not in ops.conv.ACTIVATIONS:
        raise ValueError(f"{cls}: activation must be one of {', '.join(ops.conv.ACTIVATIONS)}, got {activation!r}")
    return activation


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastnets' batch_norm kernels; running statistics,
    momentum=None (cumulative average) and num_batches_tracked behave as in torch.
    Extra keyword ``activation`` fuses an activation into the same pass (BN + ReLU)."""

    activation: str = _IDENTITY
    negative_slope: float = 0.01      # of a fused leaky_relu

    def __init__(self, *args, activation: str = _IDENTITY, negative_slope: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = check_activation("BatchNorm2d", activation)
        if negative_slope != 0.01:
            self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor, activation: Optional[str] = None) -> Tensor:
        """activation (fastnets extra): overrides the module's fused activation for this call."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return ops.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                              self.weight, self.bias, bn_training, factor, self.eps,
                              activation=self.activation if activation is None else activation,
                              negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class FoldedBatchNorm2d(BatchNorm2d):
    """The BatchNorm2d of a fused Conv2d -> BatchNorm2d (-> ReLU) chain (fastnets.nn.FusedConv2d).
    In eval mode the conv runs with this BN folded into its weights, so this module passes
    its input through; in training it is BatchNorm2d. Same parameters, buffers and
    state_dict keys as the BatchNorm2d it was."""

    @property
    def fused_conv(self) -> nn.Module:
        return self.__dict__["_fastnets_fused_conv"]

    def forward(self, input: Tensor, activation: Optional[str] = None) -> Tensor:
        if self.fused_conv.fusion_active():
            return input   # folded into the preceding conv
        if activation is None and self.__dict__.get("_fastnets_fused_relu", False):
            activation = "relu"   # the FoldedReLU after this BN passes its input through
        return super().forward(input, activation)
