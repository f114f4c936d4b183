"""Convolution modules: subclasses of the torch.nn classes (same constructor arguments,
attributes and state_dict keys), forward through fastnets.ops.

Extras (keyword-only, default off): ``activation`` on Conv* fuses an activation into the
kernel's epilogue; Conv2d.forward takes an optional ``residual``.
`conv_bn_act` runs conv -> BN -> (+ residual) -> activation, as one fused conv in eval mode.
`FusedConv2d.fuse(conv, bn, activation, relu)` turns a Conv2d -> BatchNorm2d (-> ReLU) chain
of modules into one fused conv in eval mode (swap()'s conv-BN rule, VGG with batch_norm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..reference.activation import ACTIVATIONS as _TORCH_ACT
from .activation import FoldedReLU
from .batchnorm import BatchNorm2d, FoldedBatchNorm2d, check_activation

_IDENTITY = "identity"


def _padded(conv: nn.Module, x: Tensor):
    """(input, padding) for the kernels: padding modes other than zeros pad with torch first,
    exactly as torch's own modules do, and then convolve without padding."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    return x, conv.padding


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv's (weight, bias) with the eval-mode BN folded in. Folding reads every weight, so
    inference reuses the result until a tensor changes (their version counters say so); with
    autograd recording, or inside torch.compile, it is recomputed every call. The cache is a
    `_fastnets_` entry of the conv's __dict__: never a parameter, buffer or state_dict key,
    and dropped by unswap()."""
    tensors = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    cacheable = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    key = tuple(None if t is None else (id(t), t._version) for t in tensors) + (bn.eps,)
    cached = conv.__dict__.get("_fastnets_fold_cache")
    if cacheable and cached is not None and cached[0] == key:
        return cached[1]
    folded = ops.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if cacheable:
        conv.__dict__["_fastnets_fold_cache"] = (key, folded)
    return folded


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` on fastnets' implicit-GEMM kernels. padding_mode other than
    "zeros" pads with torch first, as torch does, then convolves with the kernels."""

    activation: str = _IDENTITY
    negative_slope: float = 0.01      # of a fused leaky_relu

    def __init__(self, *args, activation: str = _IDENTITY, negative_slope: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = check_activation("Conv2d", activation)
        if negative_slope != 0.01:
            self.negative_slope = float(negative_slope)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
              residual: Optional[Tensor]) -> Tensor:
        x, padding = _padded(self, x)
        return ops.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                          activation=activation, negative_slope=self.negative_slope, residual=residual)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._conv(input, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


class FusedConv2d(Conv2d):
    """The conv of a Conv2d -> BatchNorm2d (-> ReLU) chain, fused: in eval mode (conv and BN
    both in eval, BN with running statistics) it runs with the BN folded into its weight and
    bias and the activation in its epilogue, and the FoldedBatchNorm2d / FoldedReLU after it
    pass their input through. Training mode runs the three modules as usual. The BN stays
    where it was in the module tree (same state_dict keys); the link is a plain reference."""

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str = _IDENTITY,
             relu: Optional[nn.ReLU] = None) -> None:
        """Fuse the chain in place: conv becomes a FusedConv2d, bn a FoldedBatchNorm2d and a
        ReLU used only after that BN a FoldedReLU (same objects, same parameters)."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"FusedConv2d.fuse: needs a Conv2d and a BatchNorm2d, got {type(conv).__name__} and "
                            f"{type(bn).__name__}")
        if conv.out_channels != bn.num_features:
            raise ValueError(f"FusedConv2d.fuse: conv has {conv.out_channels} output channels, bn "
                             f"{bn.num_features} features")
        conv.__class__, bn.__class__ = cls, FoldedBatchNorm2d
        conv.__dict__["_fastnets_fused_bn"] = bn
        conv.__dict__["_fastnets_fused_activation"] = check_activation("FusedConv2d", activation)
        # With a FoldedReLU the model's own ReLU is gone and the epilogue must apply it. Without
        # one (a ReLU module shared with other call sites, or F.relu in the model's forward),
        # the model still applies its ReLU after this conv and the epilogue's is a repeat.
        conv.__dict__["_fastnets_epilogue_owned"] = relu is not None
        bn.__dict__["_fastnets_fused_conv"] = conv
        if relu is not None:
            bn.__dict__["_fastnets_fused_relu"] = True
            relu.__class__ = FoldedReLU
            relu.__dict__["_fastnets_fused_conv"] = conv

    @property
    def fused_bn(self) -> nn.BatchNorm2d:
        return self.__dict__["_fastnets_fused_bn"]

    @property
    def fused_activation(self) -> str:
        return self.__dict__["_fastnets_fused_activation"]

    def fusion_active(self) -> bool:
        bn = self.fused_bn
        return not self.training and not bn.training and bn.running_mean is not None

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.fusion_active():
            weight, bias = _folded(self, self.fused_bn)
            activation = self.fused_activation
            if (activation != _IDENTITY and not self.__dict__.get("_fastnets_epilogue_owned", True)
                    and torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                        for t in (input, weight, bias, residual))):
                # An activation epilogue saves its output for the backward, and the ReLU the
                # model applies next may run in place on that very tensor (torchvision's
                # blocks share one ReLU(inplace=True) between call sites): with autograd
                # recording (eval-mode fine-tuning, saliency maps) the conv stops at the
                # folded BN and leaves the ReLU to the model, which applies it anyway.
                activation = _IDENTITY
            return self._conv(input, weight, bias, activation, residual)
        return super().forward(input, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused_bn=True, fused_activation={self.fused_activation!r}"


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` on the conv2d kernels (a (N, C, 1, L) view)."""

    activation: str = _IDENTITY

    def __init__(self, *args, activation: str = _IDENTITY, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = check_activation("Conv1d", activation)

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
        self.activation = check_activation("ConvTranspose2d", activation)

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("ConvTranspose2d: only padding_mode='zeros' is supported (as in torch)")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return ops.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                    self.groups, self.dilation, activation=self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation != _IDENTITY else "")


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
