"""Activation modules, and the one map from an activation someone else wrote (a torch.nn
module, a torch function, a name, a Hugging Face activation class) to the name fastnets'
fused epilogues take."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..reference.activation import ACTIVATIONS

# Hugging Face's activation classes, by class name (transformers is optional: no import).
_HF_ACTIVATIONS = {"SiLUActivation": "silu", "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
                   "GELUTanh": "gelu_tanh", "QuickGELUActivation": "quick_gelu", "PytorchGELUTanh": "gelu_tanh", "GELUPytorchTanh": "gelu_tanh"}
# timm's activation classes (timm.layers.activations), by class name (timm is optional too).
_TIMM_ACTIVATIONS = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "Swish": "silu", "Sigmoid": "sigmoid",
                     "Tanh": "tanh"}
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh",
              F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}


def fused_activation_name(act) -> Optional[str]:
    """The fused-epilogue name (one of fastnets.reference.activation.ACTIVATIONS) computing
    exactly what `act` computes, or None when there is none (run `act` as given)."""
    if isinstance(act, str):
        return act if act in ACTIVATIONS else None
    if isinstance(act, _Activation):   # a torch activation module swap() already converted
        return act._fastnets_activation
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    for cls, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"),
                      (nn.Identity, "identity")):
        if type(act) is cls:
            return name
    if isinstance(act, nn.Module):
        name, home = type(act).__name__, type(act).__module__
        if home.startswith("transformers."):
            return _HF_ACTIVATIONS.get(name)
        if home.startswith("timm."):
            if name == "GELU":
                return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(act, "approximate", "none"))
            return _TIMM_ACTIVATIONS.get(name)
        return None
    try:
        return _FUNCTIONS.get(act)
    except TypeError:   # unhashable callables
        return None


class _Activation:
    """forward through fastnets' bias_act kernel (no bias): one read, one write. `inplace=True`
    modules compute out of place, as their output is what every caller uses (torch's own
    autograd keeps the output for the backward either way)."""

    _fastnets_activation = "identity"

    def forward(self, input: Tensor) -> Tensor:
        if not input.is_floating_point():
            return super().forward(input)   # integer tensors: torch's semantics, nothing to fuse
        return ops.bias_act(input, None, self._fastnets_activation,
                            negative_slope=getattr(self, "negative_slope", 0.01))


class ReLU(_Activation, nn.ReLU):
    """``torch.nn.ReLU`` on fastnets' activation kernel."""
    _fastnets_activation = "relu"


class LeakyReLU(_Activation, nn.LeakyReLU):
    """``torch.nn.LeakyReLU`` on fastnets' activation kernel."""
    _fastnets_activation = "leaky_relu"


class SiLU(_Activation, nn.SiLU):
    """``torch.nn.SiLU`` on fastnets' activation kernel."""
    _fastnets_activation = "silu"


class Tanh(_Activation, nn.Tanh):
    """``torch.nn.Tanh`` on fastnets' activation kernel."""
    _fastnets_activation = "tanh"


class Sigmoid(_Activation, nn.Sigmoid):
    """``torch.nn.Sigmoid`` on fastnets' activation kernel."""
    _fastnets_activation = "sigmoid"


class GELU(_Activation, nn.GELU):
    """``torch.nn.GELU`` (erf or tanh approximation) on fastnets' activation kernel."""

    @property
    def _fastnets_activation(self) -> str:
        return "gelu_tanh" if self.approximate == "tanh" else "gelu"


class FoldedReLU(ReLU):
    """A ReLU used only after a Conv2d -> BatchNorm2d chain that fastnets fused
    (fastnets.nn.FusedConv2d): in eval mode the conv's epilogue applies it, in training the
    FoldedBatchNorm2d's pass does (batch_norm with the activation fused), so it passes its
    input through."""

    @property
    def fused_conv(self) -> nn.Module:
        return self.__dict__["_fastnets_fused_conv"]

    def forward(self, input: Tensor) -> Tensor:
        return input
