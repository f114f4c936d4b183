"""The tolerance table lives in fastnets.reference.tolerances (the benchmark's correctness
check uses it too); this module re-exports it for the tests, with the dtype lists they share."""
import torch

from fastnets.reference.tolerances import MODEL_FLOAT64, MODEL_TRAIN_FLOAT32, TOLERANCES, Tol  # noqa: F401

# Every kernel is tested in these dtypes on CPU too: the interpreter's bf16 tl.dot is fixed
# by kernels._common.fix_interpreter_bf16_dot (bf16 operands upcast to float32 before the
# dot, what a bf16 tensor-core dot computes), so matmul-shaped kernels run bf16 like the rest.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POINTWISE_DTYPES = DTYPES
