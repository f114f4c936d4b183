"""Plain-PyTorch activations: the one list of activation names every fastnets op accepts
(ACTIVATIONS: pointwise, GATED: act(gate) * up over a split last dim)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "identity": lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
    "gelu": lambda z, s: F.gelu(z),
    "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
    "silu": lambda z, s: F.silu(z),
    "tanh": lambda z, s: torch.tanh(z),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "quick_gelu": lambda z, s: z * torch.sigmoid(1.702 * z),     # OpenAI CLIP's activation
}
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def bias_act(input, bias=None, activation="relu", *, negative_slope=0.01, gain=1.0, clamp=None):
    z = input.double() if input.dtype == torch.float64 else input.float()
    if bias is not None:
        z = z + bias.to(z.dtype)
    if activation in GATED:
        gate, up = z.chunk(2, dim=-1)
        y = ACTIVATIONS[GATED[activation]](gate, negative_slope) * up
    else:
        y = ACTIVATIONS[activation](z, negative_slope)
    if gain != 1.0:
        y = y * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y.to(input.dtype)
