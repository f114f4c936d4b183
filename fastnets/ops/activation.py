"""bias_act: fused ``act(x + bias)`` and gated ``act(gate + b_g) * (up + b_u)`` in one pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from . import _checks, _double


def _activation_kernels():
    """fastnets.kernels.activation, imported on first use (importing fastnets never imports triton)."""
    from ..kernels import activation
    return activation

ACTIVATIONS = tuple(reference.activation.ACTIVATIONS)   # the one list of names, owned by the reference
GATED = tuple(reference.activation.GATED)

_dispatch.register_op("bias_act", "fused bias + activation (relu, leaky_relu, gelu, gelu_tanh, silu, tanh, "
                                  "sigmoid, quick_gelu) and gated swiglu / geglu", has_cuda=True)


class _CudaBiasAct:
    """fastnets._C's bias_act behind the Triton launchers' interface: makes x's device
    current and hands the kernels torch's current stream."""

    def __init__(self, ext):
        self.ext = ext

    def bias_act_fwd(self, x, bias, activation, slope):
        with torch.cuda.device(x.device):
            return self.ext.bias_act_fwd(x, bias, activation, slope, torch.cuda.current_stream().cuda_stream)

    def bias_act_bwd(self, dy, x, bias, activation, slope):
        with torch.cuda.device(x.device):
            dz = self.ext.bias_act_bwd(dy, x, bias, activation, slope, torch.cuda.current_stream().cuda_stream)
        # The C++ kernel is flat 1-D, so dbias is a separate float32 column sum of dz.
        return dz, (dz.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None)


def _impl(name: str, x: Tensor, bias: Optional[Tensor]):
    """(launchers, bias) for an implementation: Triton (also interpreted) or fastnets._C.
    The C++ kernels take the bias in the input's dtype; Triton loads any float dtype."""
    if name == "cuda":
        from .. import _ext
        return _CudaBiasAct(_ext.load()), (bias.to(x.dtype).contiguous() if bias is not None else None)
    return _activation_kernels(), bias


@torch.library.custom_op("fastnets::bias_act_fwd", mutates_args=())
def _bias_act_fwd(x: Tensor, bias: Optional[Tensor], activation: str, slope: float, impl: str, gain: float,
                  clamp: Optional[float]) -> Tensor:
    module, bias = _impl(impl, x, bias)
    if impl == "cuda":
        return module.bias_act_fwd(x, bias, activation, slope)
    return module.bias_act_fwd(x, bias, activation, slope, gain, clamp)


@_bias_act_fwd.register_fake
def _(x, bias, activation, slope, impl, gain, clamp):
    cols = x.shape[1] // 2 if activation in GATED else x.shape[1]
    return x.new_empty((x.shape[0], cols))


@torch.library.custom_op("fastnets::bias_act_bwd", mutates_args=())
def _bias_act_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], activation: str, slope: float,
                  impl: str, gain: float, clamp: Optional[float]) -> tuple[Tensor, Tensor]:
    module, kernel_bias = _impl(impl, x, bias)
    if impl == "cuda":
        dz, dbias = module.bias_act_bwd(dy.contiguous(), x, kernel_bias, activation, slope)
    else:
        dz, dbias = module.bias_act_bwd(dy.contiguous(), x, kernel_bias, activation, slope, gain, clamp)
    return dz, (dbias.to(bias.dtype) if bias is not None else x.new_empty((0,)))


@_bias_act_bwd.register_fake
def _(dy, x, bias, activation, slope, impl, gain, clamp):
    return torch.empty_like(x), (torch.empty_like(bias) if bias is not None else x.new_empty((0,)))


def _saves_output(activation: str, gain: float, clamp) -> bool:
    """relu's derivative reads the sign of its output as well as of its input (gain > 0, no
    clamp): save the output, as torch's relu does. The input is then free once the layer
    before is done with it (a BN output between BN and ReLU), so out-of-place relu holds as
    much memory as torch's ReLU(inplace=True)."""
    return activation == "relu" and gain > 0 and clamp is None


def _setup(ctx, inputs, output):
    x, bias, activation, slope, impl, gain, clamp = inputs
    ctx.from_output = _saves_output(activation, gain, clamp)
    if ctx.from_output:
        # relu'(y + 0) = relu'(x + b); a zero bias keeps the kernel's dbias column sum.
        ctx.save_for_backward(output, None if bias is None else torch.zeros_like(bias))
    else:
        ctx.save_for_backward(x, bias)
    ctx.activation, ctx.slope, ctx.impl, ctx.gain, ctx.clamp = activation, slope, impl, gain, clamp


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    if _double.wanted():   # create_graph: a differentiable backward (second derivatives)
        dz, dbias = _double.reference_grads(
            lambda xx, bb: reference.bias_act(xx, bb, ctx.activation, negative_slope=ctx.slope, gain=ctx.gain,
                                              clamp=ctx.clamp), (x, bias), dy)
        return dz, dbias, None, None, None, None, None
    # dz is the gradient of the pre-activation x + bias, so it is dx; dbias is its column
    # sum, reduced in float32 inside the backward kernel.
    dz, dbias = torch.ops.fastnets.bias_act_bwd(dy, x, bias, ctx.activation, ctx.slope, ctx.impl, ctx.gain,
                                                ctx.clamp)
    return dz, (dbias if bias is not None else None), None, None, None, None, None


_bias_act_fwd.register_autograd(_backward, setup_context=_setup)


def bias_act(input: Tensor, bias: Optional[Tensor] = None, activation: str = "relu", *,
             negative_slope: float = 0.01, gain: float = 1.0, clamp: Optional[float] = None) -> Tensor:
    """``act(input + bias)`` in one read and one write, bias broadcast over the last dim.

    input: (*, C), float16 / bfloat16 / float32 / float64; bias: (C,) or None.
    activation: "identity", "relu", "leaky_relu" (uses ``negative_slope``), "gelu" (erf),
    "gelu_tanh", "silu", "tanh", "sigmoid", "quick_gelu" (OpenAI CLIP's x * sigmoid(1.702 x));
    or gated "swiglu", "geglu", "geglu_tanh", which split the last dim in halves [gate | up]
    and return ``act(gate) * up`` of shape (*, C/2).
    gain / clamp (StyleGAN2's bias_act): the result is multiplied by ``gain`` and then clamped
    to [-clamp, clamp]; the gradient is torch.clamp's (zero where clamped). Triton only: the
    forced cuda backend raises for them.
    Backward: input and bias, second derivatives too; the activation's derivative is
    recomputed from the input, or for relu from the output (saved instead of the input, as
    torch's relu does: no more memory than an in-place ReLU). Backends: triton (CUDA), cuda (fastnets._C, forced),
    interpret (CPU), torch.
    """
    _checks.tensor("bias_act", "input", input, min_dim=1)
    if activation not in ACTIVATIONS and activation not in GATED:
        raise ValueError(f"bias_act: activation must be one of {', '.join(ACTIVATIONS + GATED)}, got {activation!r}")
    C = input.shape[-1]
    if activation in GATED and C % 2:
        raise ValueError(f"bias_act: gated activation {activation!r} needs an even last dim of input, got {C}")
    bias = _checks.optional_param("bias_act", "bias", bias, like=input, shape=(C,))
    slope = _checks.number("bias_act", "negative_slope", negative_slope)
    gain = _checks.number("bias_act", "gain", gain)
    if clamp is not None:
        clamp = _checks.number("bias_act", "clamp", clamp, min_value=0.0)
    backend = _dispatch.choose("bias_act", input.device, empty=input.numel() == 0)
    if backend == "torch":
        return reference.bias_act(input, bias, activation, negative_slope=slope, gain=gain, clamp=clamp)
    if backend == "cuda" and (gain != 1.0 or clamp is not None):
        raise ValueError("bias_act: gain and clamp are implemented in the Triton kernels only; the forced 'cuda' "
                         "backend (fastnets._C) does not take them")
    impl = "cuda" if backend == "cuda" else "triton"
    order = _dense_order(input) if bias is None and activation not in GATED else None
    if order is not None:
        # Pointwise with nothing indexed by a dim: run over the storage in its own order, so a
        # channels_last (or any dense permuted) tensor keeps its layout and is never copied.
        dense = input.permute(order)
        y = torch.ops.fastnets.bias_act_fwd(dense.reshape(-1, dense.shape[-1]), None, activation, slope, impl, gain,
                                            clamp)
        return y.view(dense.shape).permute([order.index(d) for d in range(input.dim())])
    x2d = input.reshape(-1, C).contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.ops.fastnets.bias_act_fwd(x2d, bias, activation, slope, impl, gain, clamp)
    return y.view(*input.shape[:-1], y.shape[-1])


def _dense_order(t: Tensor) -> Optional[list]:
    """The dim order in which a non-contiguous t is dense (channels_last: N, H, W, C), or None
    (contiguous already, or not dense: strided views are copied as before)."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None
