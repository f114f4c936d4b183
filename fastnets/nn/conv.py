"""Convolution, BatchNorm and pooling modules: subclasses of the torch.nn classes (same
constructor arguments, attributes and state_dict keys), forward through fastnets.ops.

Extras (keyword-only, default off): ``activation`` on Conv*/BatchNorm2d fuses an
activation into the kernel's epilogue; Conv2d.forward takes an optional ``residual``.
`conv_bn_act` runs conv -> BN -> (+ residual) -> activation, as one fused conv in eval mode.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..reference.activation import _ACTIVATIONS as _TORCH_ACT

_IDENTITY = "identity"


def _check_activation(cls: str, activation: str) -> str:
    if activation not in ops.conv.ACTIVATIONS:
        raise ValueError(f"{cls}: activation must be one of {', '.join(ops.conv.ACTIVATIONS)}, got {activation!r}")
    return activation


def _padded(conv: nn.Module, x: Tensor):
    """(input, padding) for the kernels: padding modes other than zeros pad with torch first,
    exactly as torch's own modules do, and then convolve without padding."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    return x, conv.padding


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv's (weight, bias) with the eval-mode BN folded in. Folding reads every weight, so
    inference reuses the result until a tensor changes (their version counters say so); with
    autograd recording, or inside torch.compile, it is recomputed every call."""
    tensors = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    cacheable = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    key = tuple(None if t is None else (id(t), t._version) for t in tensors) + (bn.eps,)
    cached = conv.__dict__.get("_fold_cache")
    if cacheable and cached is not None and cached[0] == key:
        return cached[1]
    folded = ops.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if cacheable:
        conv.__dict__["_fold_cache"] = (key, folded)
    return folded


class _Fusion:
    """A Conv2d -> BatchNorm2d (-> ReLU) chain that swap() found in someone else's model. In
    eval mode the conv runs with the BN folded into its weights and the ReLU in its epilogue;
    the BN (and a ReLU used only there) then pass their input through. Training mode runs
    the three modules as usual. Plain Python object: not a submodule, not in state_dict."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str):
        self.conv, self.bn, self.activation = conv, bn, activation

    def active(self) -> bool:
        return not self.conv.training and not self.bn.training and self.bn.running_mean is not None


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` on fastnets' implicit-GEMM kernels. padding_mode other than
    "zeros" pads with torch first, as torch does, then convolves with the kernels."""

    activation: str = _IDENTITY
    _fusion: Optional[_Fusion] = None

    def __init__(self, *args, activation: str = _IDENTITY, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation("Conv2d", activation)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
              residual: Optional[Tensor]) -> Tensor:
        x, padding = _padded(self, x)
        return ops.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                          activation=activation, residual=residual)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        fusion = self._fusion
        if fusion is not None and fusion.active():
            return self._conv(input, *_folded(self, fusion.bn), fusion.activation, residual)
        return self._conv(input, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` on the conv2d kernels (a (N, C, 1, L) view)."""

    activation: str = _IDENTITY

    def __init__(self, *args, activation: str = _IDENTITY, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation("Conv1d", activation)

    def forward(self, input: Tensor) -> Tensor:
        input, padding = _padded(self, input)
        return ops.conv1d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                          activation=self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` (forward(input, output_size=None) as torch)."""

    activation: str = _IDENTITY

    def __init__(self, *args, activation: str = _IDENTITY, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation("ConvTranspose2d", activation)

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("ConvTranspose2d: only padding_mode='zeros' is supported (as in torch)")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return ops.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                    self.groups, self.dilation, activation=self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastnets' batch_norm kernels; running statistics,
    momentum=None (cumulative average) and num_batches_tracked behave as in torch."""

    activation: str = _IDENTITY
    _fusion: Optional[_Fusion] = None

    def __init__(self, *args, activation: str = _IDENTITY, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation("BatchNorm2d", activation)

    def forward(self, input: Tensor, activation: Optional[str] = None) -> Tensor:
        """activation (fastnets extra): overrides the module's fused activation for this call."""
        if self._fusion is not None and self._fusion.active():
            return input  # folded into the preceding conv
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return ops.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                              self.weight, self.bias, bn_training, factor, self.eps,
                              activation=self.activation if activation is None else activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class ReLU(nn.ReLU):
    """``torch.nn.ReLU``; when swap() fused it into a conv (eval mode) it passes through."""

    _fusion: Optional[_Fusion] = None

    def forward(self, input: Tensor) -> Tensor:
        if self._fusion is not None and self._fusion.active():
            return input
        return super().forward(input)


class MaxPool2d(nn.MaxPool2d):
    def forward(self, input: Tensor):
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                              self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    def forward(self, input: Tensor) -> Tensor:
        return ops.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                              self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, input: Tensor) -> Tensor:
        return ops.adaptive_avg_pool2d(input, self.output_size)


class AdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    def forward(self, input: Tensor):
        return ops.adaptive_max_pool2d(input, self.output_size, self.return_indices)


for _cls in (MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d):
    _cls.__doc__ = f"``torch.nn.{_cls.__name__}`` on fastnets' pooling kernels (NCHW or channels_last)."


def conv_bn_act(conv: nn.Conv2d, bn: nn.Module, x: Tensor, activation: str = "relu",
                residual: Optional[Tensor] = None) -> Tensor:
    """``act(bn(conv(x)) + residual)``: the ResNet building block.

    Eval mode (conv and BN both in eval, BN with running stats, or BN already folded away
    into nn.Identity by fuse_conv_bn): one conv kernel with the BN folded into its weights
    and bias, the residual add and the activation in its epilogue. Training mode: the conv,
    then BN with the activation fused when there is no residual."""
    is_bn = isinstance(bn, nn.BatchNorm2d)
    if not is_bn or (not conv.training and not bn.training and bn.running_mean is not None):
        w, b = _folded(conv, bn) if is_bn else (conv.weight, conv.bias)
        x, pad = _padded(conv, x)
        return ops.conv2d(x, w, b, conv.stride, pad, conv.dilation, conv.groups, activation=activation,
                          residual=residual)
    y = conv(x)
    if residual is None and isinstance(bn, BatchNorm2d):
        return bn(y, activation=activation)  # BN + activation in one kernel pass
    y = bn(y)
    if residual is not None:
        y = y + residual
    return _TORCH_ACT[activation](y, 0.01)
