"""Flash attention: scaled_dot_product_attention and flash_attention against the float64
reference and torch's SDPA (same dtype, the 2x rule), forward and dq/dk/dv (and the float
mask's gradient), every option, packed batches, GQA, dropout, decode, bad input.
bfloat16 included (the interpreter's bf16 dot is fixed in kernels._common)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import ops, reference
from fastnets.ops.attention import dropout_mask
import tolerances
from helpers import DEVICE, assert_close, check_op, expect_backend

DTYPES = list(tolerances.DTYPES)


def _qkv(B, Hq, Hk, Sq, Sk, D, dtype, DV=None):
    q = torch.randn(B, Hq, Sq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hk, Sk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hk, Sk, DV or D, device=DEVICE).to(dtype)
    return q, k, v


def _peer_mask(Sq, Sk, causal, bottom_right, window, slopes, B, H):
    """The same band / ALiBi as one additive float32 mask, so torch's SDPA can be the peer."""
    i = torch.arange(Sq, device=DEVICE)[:, None] + (Sk - Sq if bottom_right else 0)
    j = torch.arange(Sk, device=DEVICE)[None, :]
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=DEVICE)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    mask = torch.zeros(Sq, Sk, device=DEVICE).masked_fill(~ok, float("-inf")).expand(B, H, Sq, Sk)
    if slopes is not None:
        sl = slopes.view(1, H, 1, 1) if slopes.dim() == 1 else slopes.view(B, H, 1, 1)
        mask = mask - sl * (i - j).abs().float()
    return mask


def _torch_sdpa(q, k, v, mask=None, **kw):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), **kw,
                                          enable_gqa=q.shape[1] != k.shape[1])


# --- scaled_dot_product_attention: torch's signature -------------------------------------------

SDPA_CASES = [  # B, Hq, Hk, Sq, Sk, D, DV
    (2, 3, 3, 17, 17, 32, 32),
    (1, 2, 2, 1, 1, 16, 16),
    (1, 1, 1, 65, 33, 80, 80),       # non power-of-two head dim, Sq > Sk
    (2, 2, 2, 33, 70, 96, 64),       # value head dim differs
    (1, 4, 2, 19, 45, 64, 64),       # GQA
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SDPA_CASES, ids=[f"case{i}" for i in range(len(SDPA_CASES))])
def test_sdpa(case, dtype, causal):
    B, Hq, Hk, Sq, Sk, D, DV = case
    q, k, v = _qkv(B, Hq, Hk, Sq, Sk, D, dtype, DV)
    gqa = Hq != Hk
    check_op("scaled_dot_product_attention",
             lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
             lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
             [q, k, v], dtype,
             peer=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
             min_scale=1.0 if Sk == 1 else 1e-3)   # one key: softmax is constant, dq is 0 up to rounding


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_masks(dtype):
    """Boolean key-padding mask and an additive (B, 1, Sq, Sk) mask whose gradient is checked."""
    B, H, Sq, Sk, D = 2, 3, 21, 37, 32
    q, k, v = _qkv(B, H, H, Sq, Sk, D, dtype)
    keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 30:] = False
    keep[1, ..., :5] = False
    check_op("scaled_dot_product_attention", lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, keep),
             lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, keep), [q, k, v], dtype,
             peer=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, keep))
    bias = torch.randn(B, 1, Sq, Sk, device=DEVICE).to(dtype)
    check_op("scaled_dot_product_attention", ops.scaled_dot_product_attention,
             reference.scaled_dot_product_attention, [q, k, v, bias], dtype, peer=F.scaled_dot_product_attention)


def test_sdpa_ranks_and_scale():
    """3-D (one head) and 5-D inputs, an explicit scale, a 2-D mask broadcast over batch and heads."""
    q3, k3, v3 = (torch.randn(2, 9, 16, device=DEVICE) for _ in range(3))
    with expect_backend("scaled_dot_product_attention"):
        out = ops.scaled_dot_product_attention(q3, k3, v3, scale=0.3)
    assert_close(out, F.scaled_dot_product_attention(q3.double(), k3.double(), v3.double(), scale=0.3),
                 torch.float32, "3-D")
    q5, k5, v5 = (torch.randn(2, 2, 3, 7, 16, device=DEVICE) for _ in range(3))
    mask = torch.randn(7, 7, device=DEVICE)
    out = ops.scaled_dot_product_attention(q5, k5, v5, mask)
    assert_close(out, F.scaled_dot_product_attention(q5.double(), k5.double(), v5.double(), mask.double()),
                 torch.float32, "5-D")


def test_sdpa_keeps_bshd_layout():
    """(B, S, H, D) storage passed as a transposed view: no copy in, same layout out."""
    q, k, v = (torch.randn(2, 13, 3, 32, device=DEVICE).transpose(1, 2) for _ in range(3))
    out = ops.scaled_dot_product_attention(q, k, v)
    assert out.stride() == q.stride()
    assert_close(out, reference.scaled_dot_product_attention(q.double(), k.double(), v.double()), torch.float32,
                 "bshd")


# --- flash_attention: the richer options ----------------------------------------------------------

FLASH_CASES = [  # B, Hq, Hk, Sq, Sk, D, causal, window, alibi
    (2, 2, 2, 17, 17, 32, "top_left", None, None),
    (1, 2, 1, 23, 51, 16, "bottom_right", None, None),     # Sq < Sk, MQA
    (1, 2, 2, 40, 19, 32, "top_left", None, None),         # Sq > Sk: every row sees key 0
    (1, 2, 2, 40, 19, 32, "bottom_right", None, None),     # Sq > Sk: first rows see nothing -> zeros
    (2, 2, 2, 37, 37, 64, False, (5, 3), None),            # sliding window
    (1, 3, 3, 29, 45, 32, True, (8, -1), None),            # causal + left window
    (2, 4, 2, 31, 31, 32, True, None, "heads"),            # ALiBi (H,), GQA
    (2, 2, 2, 18, 26, 48, False, None, "batch_heads"),     # ALiBi (B, H)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FLASH_CASES, ids=[f"case{i}" for i in range(len(FLASH_CASES))])
def test_flash_attention_options(case, dtype):
    B, Hq, Hk, Sq, Sk, D, causal, window, alibi = case
    q, k, v = _qkv(B, Hq, Hk, Sq, Sk, D, dtype)
    slopes = None
    if alibi == "heads":
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / Hq) for h in range(Hq)], device=DEVICE)
    elif alibi == "batch_heads":
        slopes = torch.rand(B, Hq, device=DEVICE) * 0.5
    is_causal = causal is not False
    bottom_right = causal != "top_left"   # also the window / ALiBi alignment when not causal
    kw = dict(causal=causal, window=window, alibi_slopes=slopes)
    ref_window = None if window is None else window
    peer_mask = _peer_mask(Sq, Sk, is_causal, bottom_right, ref_window, slopes, B, Hq)
    fully_masked_rows = torch.isneginf(peer_mask).all(-1).any()
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q, k, v, **kw),
             lambda q, k, v: reference.attention(q, k, v, causal=is_causal, bottom_right=bottom_right,
                                                 window=ref_window, alibi_slopes=slopes),
             [q, k, v], dtype,
             # torch gives NaN on fully masked rows, so it cannot be the peer there.
             peer=None if fully_masked_rows else (lambda q, k, v: _torch_sdpa(q, k, v, peer_mask)))


@pytest.mark.parametrize("D", [16, 24, 80, 96, 128, 160, 256])
def test_flash_attention_head_dims(D):
    q, k, v = _qkv(1, 2, 2, 19, 23, D, torch.float16)
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
             lambda q, k, v: reference.attention(q, k, v, causal=True, bottom_right=True), [q, k, v], torch.float16,
             peer=lambda q, k, v: _torch_sdpa(q, k, v, _peer_mask(19, 23, True, True, None, None, 1, 2)))


@pytest.mark.parametrize("seqlen", [1, 17, 1000])
def test_flash_attention_seq_lengths(seqlen):
    q, k, v = _qkv(1, 1, 1, seqlen, seqlen, 16, torch.float32)
    # One key: the softmax is constant, dq is 0 up to the rounding of dp - delta (terms of size ~1).
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
             lambda q, k, v: reference.attention(q, k, v, causal=True), [q, k, v], torch.float32,
             min_scale=1.0 if seqlen == 1 else 1e-3)


def test_flash_attention_long_sequence():
    """4097 keys (one past a power of two), queries in two regimes: a chunk (flash path) and
    one token (decode path)."""
    q, k, v = _qkv(1, 1, 1, 130, 4097, 16, torch.float32)
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
             lambda q, k, v: reference.attention(q, k, v, causal=True, bottom_right=True), [q, k, v], torch.float32)
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q[:, :, -1:], k, v),
             lambda q, k, v: reference.attention(q[:, :, -1:], k, v), [q, k, v], torch.float32)


def test_flash_attention_bshd_layout():
    B, S, H, D = 2, 15, 3, 32
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE) for _ in range(3))
    out = ops.flash_attention(q, k, v, causal=True, layout="bshd")
    assert out.shape == (B, S, H, D) and out.is_contiguous()
    want = reference.attention(*(t.transpose(1, 2).double() for t in (q, k, v)), causal=True).transpose(1, 2)
    assert_close(out, want, torch.float32, "bshd")


def test_fully_masked_rows_give_zeros():
    """Defined behaviour: a row with every key masked out outputs zeros and passes no gradient."""
    q, k, v = _qkv(1, 2, 2, 6, 9, 16, torch.float32)
    keep = torch.ones(1, 2, 6, 9, dtype=torch.bool, device=DEVICE)
    keep[0, 1, 2] = False
    keep[0, 0, 5] = False
    q.requires_grad_(True)
    out = ops.scaled_dot_product_attention(q, k, v, keep)
    assert torch.isfinite(out).all()
    assert out[0, 1, 2].abs().max() == 0 and out[0, 0, 5].abs().max() == 0
    assert_close(out, reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), keep),
                 torch.float32, "masked rows")
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[0, 1, 2].abs().max() == 0
    bias = torch.full((1, 1, 6, 9), float("-inf"), device=DEVICE)
    bias[..., :3, :] = 0.0
    out = ops.scaled_dot_product_attention(q.detach(), k, v, bias)
    assert torch.isfinite(out).all() and out[:, :, 3:].abs().max() == 0


# --- packed variable-length batches --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    """A mix with zero-length sequences next to others, in queries and in keys."""
    lens_q = [5, 0, 17, 1, 9]
    lens_k = [7, 3, 17, 0, 30]
    Hq, Hk, D = 4, 2, 32
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(sum(lens_k), Hk, D, device=DEVICE).to(dtype)
    v = torch.randn(sum(lens_k), Hk, D, device=DEVICE).to(dtype)
    kw = dict(causal=causal)
    check_op("flash_attention",
             lambda q, k, v: ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, layout="thd", **kw),
             lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, bottom_right=True, **kw),
             [q, k, v], dtype,
             peer=lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, bottom_right=True, **kw).to(dtype))


def test_varlen_window_alibi_and_max_seqlen():
    lens = [11, 4, 20]
    cu = torch.tensor([0, 11, 15, 35], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lens), 2, 16, device=DEVICE) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    out = ops.flash_attention(q, k, v, causal=True, window=(3, 0), alibi_slopes=slopes, cu_seqlens_q=cu,
                              cu_seqlens_k=cu, max_seqlen_q=20, max_seqlen_k=20, layout="thd")
    want = reference.varlen_attention(q.double(), k.double(), v.double(), cu, cu, causal=True, window=(3, 0),
                                      alibi_slopes=slopes)
    assert_close(out, want, torch.float32, "varlen window alibi")


# --- dropout -----------------------------------------------------------------------------------------

def test_dropout_reproducible_and_matches_its_mask():
    B, H, Sq, Sk, D, p = 2, 2, 19, 27, 16, 0.3
    q, k, v = _qkv(B, H, H, Sq, Sk, D, torch.float32)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(1234)
    out = ops.flash_attention(qg, kg, vg, causal=True, dropout_p=p)
    torch.manual_seed(1234)
    again = ops.flash_attention(q, k, v, causal=True, dropout_p=p)
    assert torch.equal(out, again), "same seed, different output"
    assert not torch.equal(out, ops.flash_attention(q, k, v, causal=True, dropout_p=p)), "fresh seed, same output"
    # Regenerate the seed the op drew, materialise its mask, and check forward and backward
    # against the reference with that mask: the backward must reuse the forward's mask.
    torch.manual_seed(1234)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    keep = dropout_mask(q, seed, Sk, p)
    assert 0.55 < keep.float().mean().item() < 0.85
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    want = reference.attention(qr, kr, vr, causal=True, bottom_right=True, dropout_p=p, dropout_keep=keep)
    assert_close(out, want, torch.float32, "dropout forward")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qg, kg, vg), g)
    ref = torch.autograd.grad(want, (qr, kr, vr), g.double())
    for name, a, e in zip("qkv", got, ref):
        assert_close(a, e, torch.float32, f"dropout d{name}")


# --- decode (split-key) path ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_path(dtype):
    """One and a few query tokens against a long cache, GQA 4:1, causal bottom-right, ALiBi and
    a key-padding mask: the split-key kernels run and match, and the backward works from
    their saved LSE."""
    kernels = pytest.importorskip("fastnets.kernels.attention")
    B, Hq, Hk, Sk, D = 2, 8, 2, 300, 64
    for Sq in (1, 3):
        q, k, v = _qkv(B, Hq, Hk, Sq, Sk, D, dtype)
        slopes = torch.rand(Hq, device=DEVICE) * 0.1
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=DEVICE)
        keep[1, ..., 250:] = False
        before = kernels.path_counts["decode"]
        check_op("flash_attention",
                 lambda q, k, v: ops.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, attn_mask=keep),
                 lambda q, k, v: reference.attention(q, k, v, causal=True, bottom_right=True, alibi_slopes=slopes,
                                                     attn_mask=keep),
                 [q, k, v], dtype,
                 peer=lambda q, k, v: _torch_sdpa(q, k, v, _peer_mask(Sq, Sk, True, True, None, slopes, B, Hq)
                                                  .masked_fill(~keep, float("-inf"))))
        assert kernels.path_counts["decode"] > before, "the decode path did not run"


# --- float64 gradcheck through the kernels, backends, errors ------------------------------------------

def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 1, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with expect_backend("scaled_dot_product_attention"):
        torch.autograd.gradcheck(lambda q, k, v, m: ops.scaled_dot_product_attention(q, k, v, m), (q, k, v, bias),
                                 fast_mode=True)
    torch.autograd.gradcheck(lambda q, k, v: ops.flash_attention(q, k, v, causal=True, window=(2, 0)), (q, k, v),
                             fast_mode=True)
    # A bool mask in float64 runs as the equivalent additive 0 / -inf mask (fastnets/kernels/attention.py
    # _mask_args), fully masked row included: the same values and gradients as the reference.
    keep = torch.rand(1, 1, 4, 4, device=DEVICE) > 0.4
    keep[0, 0, 1] = False
    with expect_backend("scaled_dot_product_attention"):
        torch.autograd.gradcheck(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, keep), (q, k, v),
                                 fast_mode=True)
        got = ops.scaled_dot_product_attention(q, k, v, keep)
    assert_close(got, reference.scaled_dot_product_attention(q, k, v, keep), torch.float64, "float64 bool mask")


def test_torch_backend_is_the_reference():
    q, k, v = _qkv(1, 2, 1, 7, 9, 16, torch.float32)
    with fastnets.backend("torch"), expect_backend("flash_attention", "torch"):
        out = ops.flash_attention(q, k, v, causal=True)
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), causal=True, bottom_right=True),
                 torch.float32, "torch backend")


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float16
    assert_close(out, reference.attention(q.half().double(), k.half().double(), v.half().double(), causal=True),
                 torch.float16, "autocast")


def test_empty_inputs():
    q, k, v = _qkv(0, 2, 2, 5, 5, 16, torch.float32)
    assert ops.scaled_dot_product_attention(q, k, v).shape == (0, 2, 5, 16)
    q, k, v = _qkv(1, 2, 2, 4, 0, 16, torch.float32)
    out = ops.flash_attention(q, k, v)
    assert out.shape == (1, 2, 4, 16) and out.abs().max() == 0


def _raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_errors():
    q, k, v = _qkv(1, 4, 2, 5, 6, 16, torch.float32)
    sdpa, fa = ops.scaled_dot_product_attention, ops.flash_attention
    _raises(ValueError, "head dims differ", lambda: sdpa(q, k[..., :8], v, enable_gqa=True))
    _raises(ValueError, "enable_gqa", lambda: sdpa(q, k, v))
    _raises(ValueError, "multiple of the number of key/value heads", lambda: fa(q, k[:, :1].expand(1, 3, 6, 16),
                                                                                  v[:, :1].expand(1, 3, 6, 16)))
    big = torch.randn(1, 1, 4, 257, device=DEVICE)
    _raises(ValueError, "up to 256", lambda: fa(big, big, big))
    _raises(ValueError, "not both", lambda: sdpa(q, q, q, torch.ones(5, 5, dtype=torch.bool, device=DEVICE),
                                                 is_causal=True))
    _raises(ValueError, "attn_mask of shape", lambda: sdpa(q, q, q, torch.ones(3, 5, device=DEVICE)))
    _raises(TypeError, "attn_mask must be bool", lambda: sdpa(q, q, q, torch.ones(5, 5, dtype=torch.int64,
                                                                                         device=DEVICE)))
    _raises(ValueError, "dropout_p", lambda: sdpa(q, q, q, dropout_p=1.0))
    _raises(TypeError, "share a dtype", lambda: sdpa(q, q.half(), q))
    _raises(ValueError, "layout", lambda: fa(q, q, q, layout="sbhd"))
    _raises(ValueError, "causal must be", lambda: fa(q, q, q, causal="diagonal"))
    _raises(TypeError, "window", lambda: fa(q, q, q, window=(1, 2, 3)))
    _raises(ValueError, "alibi_slopes must have shape", lambda: fa(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE)))
    packed = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    _raises(ValueError, "rise from 0 to the packed length 10",
            lambda: fa(packed, packed, packed, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE),
                       cu_seqlens_k=cu, layout="thd"))
    _raises(ValueError, "need layout='thd'", lambda: fa(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu))
    _raises(ValueError, "same batch", lambda: fa(packed, packed, packed, cu_seqlens_q=cu,
                                                 cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32, device=DEVICE),
                                                 layout="thd"))
    _raises(ValueError, "max_seqlen", lambda: fa(packed, packed, packed, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                 max_seqlen_q=3, layout="thd"))
    _raises(ValueError, "4-D", lambda: fa(packed, packed, packed))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_long(causal):
    """bf16 at sizes users run (GPU only): the 2x-of-torch rule against a float32 reference."""
    q, k, v = _qkv(2, 8, 8, 1024, 1024, 128, torch.bfloat16)
    check_op("flash_attention", lambda q, k, v: ops.flash_attention(q, k, v, causal=causal),
             lambda q, k, v: reference.attention(q, k, v, causal=causal), [q, k, v], torch.bfloat16,
             peer=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert math.isfinite(q.float().sum().item())


# --- property test: random legal shapes, strides, masks, GQA, causal ------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=st.sampled_from(DTYPES), causal=st.booleans(), bshd=st.booleans(),
       mask_kind=st.sampled_from([None, "bool", "float"]))
def test_sdpa_property(data, dtype, causal, bshd, mask_kind):
    hk = data.draw(st.integers(1, 2))
    hq = hk * data.draw(st.integers(1, 2))
    sq, sk = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    d = data.draw(st.sampled_from([16, 24, 32, 40, 64]))
    b = data.draw(st.integers(1, 2))
    if bshd:   # (B, S, H, D) storage seen as (B, H, S, D): the kernels take any head / seq strides
        q = torch.randn(b, sq, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hk, d, device=DEVICE).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hk, d, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        q, k, v = _qkv(b, hq, hk, sq, sk, d, dtype)
    mask = None
    if mask_kind is not None and not causal:
        keep = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.3
        keep[..., 0] = True   # every query keeps a key (a fully masked row is 0 here, NaN in torch)
        mask = keep if mask_kind == "bool" else torch.randn(b, 1, sq, sk, device=DEVICE).to(dtype).masked_fill(
            ~keep, float("-inf"))
    gqa = hq != hk
    check_op("scaled_dot_product_attention",
             lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa),
             lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa),
             [q, k, v], dtype,
             peer=lambda q, k, v: F.scaled_dot_product_attention(
                 q, k, v, None if mask is None else (mask if mask.dtype == torch.bool else mask.to(q.dtype)),
                 is_causal=causal, enable_gqa=gqa),
             min_scale=1.0 if sk == 1 else 1e-3, grad_args=(0, 1, 2))
