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
    # With a baseline (torch computing the same thing in the tested dtype, from the same inputs,
    # on this machine), an element may also be off by `baseline` x torch's own error against the
    # high-precision reference: per element (the flash-attention rule, for fp16 / bf16), or, with
    # `baseline_tensorwide`, x torch's largest error over the whole tensor (whole models, where
    # which elements carry the amplified rounding is chance: any two summation orders differ).
    baseline: float = 0.0
    baseline_tensorwide: bool = False


# Whole models in float32 through training-mode BatchNorm. Batch statistics over a few values
# (layer4 of a ResNet at 32x32 input normalizes 1x1 maps over the batch of 2) amplify every
# rounding layer after layer: torch's own float32 ResNet-18 gradients are off its float64 ones
# by 0.2-0.9% of their scale here, and by more on other CPUs, whose kernels sum in other orders.
# A fixed bound there tests the CPU, so these comparisons are judged against float64 with torch's
# float32 model on the same inputs as the yardstick: an element may be off by the floor, or by
# 3x the largest error torch makes on that tensor (ours has measured 0.3-1.3x torch's). Pass the
# baseline wherever training-mode BatchNorm is on the path. Not for single ops.
MODEL_TRAIN_FLOAT32 = Tol(atol=2e-3, rtol=2e-3, bench_rel=5e-3, baseline=3.0, baseline_tensorwide=True)

# Whole transformer models in float64 against another library's float64 model: the flash
# attention kernels take the softmax scale as a Triton float argument, which is 32-bit, so
# each attention layer carries a ~1e-8 relative difference (1/sqrt(d) rounded to float32).
MODEL_FLOAT64 = Tol(atol=1e-7, rtol=1e-6, bench_rel=1e-7)

TOLERANCES = {
    torch.float64: Tol(atol=1e-9, rtol=1e-7, bench_rel=1e-9),
    torch.float32: Tol(atol=2e-5, rtol=2e-5, bench_rel=5e-3),
    torch.float16: Tol(atol=1e-3, rtol=2e-3, bench_rel=1e-2, baseline=2.0),
    torch.bfloat16: Tol(atol=1e-2, rtol=1.6e-2, bench_rel=4e-2, baseline=2.0),
}
