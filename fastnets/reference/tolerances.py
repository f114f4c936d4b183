"""The one tolerance table, used by the test suite (tests/helpers.py) and by the benchmark's
correctness check (fastnets/bench/harness.py).

Tests measure errors against a float64 reference computed from the same (low-precision)
inputs, so they cover our arithmetic and the output rounding; a low-precision result also
passes when its max-abs error is within 2x that of PyTorch eager in the same dtype, plus atol
(the flash-attention rule): torch is the bar users hold us to, not a fixed number.

The benchmark compares fastnets' output with torch's on the same inputs at full size, where a
float64 reference is too slow: `bench_rel` bounds the relative norm error ||ours - torch|| /
||torch||, loose enough for two roundings in the dtype (TF32 included for float32), tight
enough that a wrong kernel (garbage, NaN, a skipped tile) never passes.
"""
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    bench_rel: float


# Whole models in float32 through training-mode BatchNorm (batch statistics over a few values
# amplify every rounding layer after layer): judged against float64 with this fixed floor,
# ~3x the worst error seen, rather than against torch's own float32 error, which moves with the
# CPU's kernels. Not for single ops.
MODEL_TRAIN_FLOAT32 = Tol(atol=2e-3, rtol=2e-3, bench_rel=5e-3)

# Whole transformer models in float64 against another library's float64 model: the flash
# attention kernels take the softmax scale as a Triton float argument, which is 32-bit, so
# each attention layer carries a ~1e-8 relative difference (1/sqrt(d) rounded to float32).
MODEL_FLOAT64 = Tol(atol=1e-7, rtol=1e-6, bench_rel=1e-7)

TOLERANCES = {
    torch.float64: Tol(atol=1e-9, rtol=1e-7, bench_rel=1e-9),
    torch.float32: Tol(atol=2e-5, rtol=2e-5, bench_rel=5e-3),
    torch.float16: Tol(atol=1e-3, rtol=2e-3, bench_rel=1e-2),
    torch.bfloat16: Tol(atol=1e-2, rtol=1.6e-2, bench_rel=4e-2),
}
