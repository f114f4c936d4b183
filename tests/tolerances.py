"""The one tolerance table. Errors are measured against a float64 reference computed from
the same (low-precision) inputs, so they cover our arithmetic and the output rounding.

A low-precision result also passes when its max-abs error is within 2x that of PyTorch
eager in the same dtype, plus atol (the flash-attention rule): torch is the bar users hold
us to, not a fixed number.
"""
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


TOLERANCES = {
    torch.float64: Tol(atol=1e-9, rtol=1e-7),
    torch.float32: Tol(atol=2e-5, rtol=2e-5),
    torch.float16: Tol(atol=1e-3, rtol=2e-3),
    torch.bfloat16: Tol(atol=1e-2, rtol=1.6e-2),
}

# What the Triton interpreter computes correctly on CPU: all four for pointwise and
# reduction kernels (norms, activations). Matmul-shaped kernels exclude bfloat16 on CPU
# (interpreter tl.dot on bf16 is wrong); see ARCHITECTURE.md.
POINTWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
