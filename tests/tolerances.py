"""The tolerance table lives in fastnets.reference.tolerances (the benchmark's correctness
check uses it too); this module re-exports it for the tests, with the dtype lists they share."""
import torch

from fastnets.reference.tolerances import TOLERANCES, Tol  # noqa: F401

# What the Triton interpreter computes correctly on CPU: all four for pointwise and
# reduction kernels (norms, activations). Matmul-shaped kernels exclude bfloat16 on CPU
# (interpreter tl.dot on bf16 is wrong); see ARCHITECTURE.md.
POINTWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
