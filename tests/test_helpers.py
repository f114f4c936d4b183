"""The one compare helper judges what it says it judges: the tolerance floor, the per-element
torch baseline of fp16 / bf16, the tensor-wide torch yardstick of whole float32 models, and a
baseline that is itself NaN loosening nothing."""
import pytest
import torch

from helpers import assert_close
from tolerances import MODEL_TRAIN_FLOAT32, TOLERANCES


def _expected():
    return torch.linspace(-1.0, 1.0, 11, dtype=torch.float64)


def test_floor_alone_without_a_baseline():
    e = _expected()
    tol = TOLERANCES[torch.float32]
    assert_close(e + 0.5 * tol.atol, e, torch.float32, "within the floor")
    with pytest.raises(AssertionError, match=r"1/11 elements off.*first bad \(flat, finite\) index 3"):
        bad = e.clone()
        bad[3] += 1e-3
        assert_close(bad, e, torch.float32, "off the floor")
    with pytest.raises(AssertionError, match="allowed"):   # tensor_scale: a scalar bound, still explained
        assert_close(e + 1.0, e, torch.float32, "tensor scale", tensor_scale=True)


def test_float32_ops_ignore_the_baseline():
    e = _expected()
    with pytest.raises(AssertionError):
        assert_close(e + 1e-2, e, torch.float32, "op", baseline=e + 1e-2)


def test_bfloat16_baseline_is_per_element():
    e = _expected()
    torch_bf16 = e.clone()
    torch_bf16[2] += 0.2                 # torch errs 0.2 at element 2 only
    ours = e.clone()
    ours[2] += 0.39                      # < 2x torch's error there: allowed
    assert_close(ours, e, torch.bfloat16, "per element", baseline=torch_bf16)
    ours[5] += 0.1                       # torch is exact at 5, and 0.1 is far over the floor
    with pytest.raises(AssertionError, match=r"index 5.*2x its error per element"):
        assert_close(ours, e, torch.bfloat16, "per element", baseline=torch_bf16)


def test_model_tolerance_yardstick_is_tensorwide():
    e = _expected()
    torch32 = e.clone()
    torch32[0] += 0.05                   # torch's largest error on the tensor: 0.05
    ours = e.clone()
    ours[7] += 0.14                      # elsewhere, under 3x that
    assert_close(ours, e, torch.float32, "model", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    ours[7] += 0.02                      # 0.16 > 3 x 0.05 and > the floor
    with pytest.raises(AssertionError, match=r"errs 0\.05 at most \(allowed 3x that\)"):
        assert_close(ours, e, torch.float32, "model", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    with pytest.raises(AssertionError):  # without a baseline, the floor alone
        assert_close(e + 0.01, e, torch.float32, "model", tol=MODEL_TRAIN_FLOAT32)


def test_nan_in_the_baseline_loosens_nothing():
    e = _expected()
    torch32 = e.clone()
    torch32[4] = float("nan")
    torch32[6] = float("inf")
    with pytest.raises(AssertionError):
        assert_close(e + 0.5, e, torch.float32, "model", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    with pytest.raises(AssertionError):
        assert_close(e + 0.5, e, torch.bfloat16, "op", baseline=torch32)


def test_nan_and_inf_must_sit_where_the_reference_has_them():
    e = _expected()
    e[1] = float("nan")
    e[2] = float("inf")
    assert_close(e.clone(), e, torch.float32, "same places")
    moved = e.clone()
    moved[1], moved[3] = 0.0, float("nan")
    with pytest.raises(AssertionError, match="NaN mismatch"):
        assert_close(moved, e, torch.float32, "moved NaN")
    flipped = e.clone()
    flipped[2] = -float("inf")
    with pytest.raises(AssertionError, match="inf mismatch"):
        assert_close(flipped, e, torch.float32, "flipped inf")
