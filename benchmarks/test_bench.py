"""pytest-benchmark entries for the same cases as `python -m fastnets bench --quick`.

    pytest benchmarks/ --benchmark-only          # from the repository root

On a CPU the kernels run under Triton's interpreter (a functional run, not a speed figure).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastnets.bench.cases import FAMILIES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(case, impl) for make in FAMILIES.values() for case in make(DEVICE, quick=True) for impl in case.impls]


@pytest.mark.parametrize("case,impl", CASES,
                         ids=[f"{c.op}-{c.label}-{str(c.dtype)[6:]}-{i}" for c, i in CASES])
def test_forward_backward(benchmark, case, impl):
    inputs = case.make_inputs(DEVICE)
    fn = case.impls[impl]

    backward = "fwd_bwd" in case.modes   # dgrad / wgrad cases time one kernel call only

    def step():
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=case.op, shape=case.label, impl=impl, bytes=case.bytes_fwd + case.bytes_bwd)
    benchmark(step)
