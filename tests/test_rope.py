"""Rotary embedding: both conventions, partial rotary, position_ids, per-token tables,
(B, S, H, D) layout, forward and backward against the float64 reference, errors."""
import pytest
import torch

from fastnets import ops, reference
from helpers import DEVICE, check_op, expect_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape,rotary_dim", [((2, 3, 17, 32), 32), ((1, 2, 9, 80), 40), ((2, 1, 5, 24), 24)])
def test_rope(shape, rotary_dim, interleaved, dtype):
    cos, sin = reference.rope_cos_sin(40, rotary_dim, device=DEVICE)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    kw = dict(interleaved=interleaved, seqlen_offset=3)
    check_op("apply_rotary_emb", lambda x: ops.apply_rotary_emb(x, cos, sin, **kw),
             lambda x: reference.apply_rotary_emb(x, cos, sin, **kw), [x], dtype,
             peer=lambda x: reference.apply_rotary_emb(x.float(), cos, sin, **kw).to(dtype))


def test_rope_position_ids_and_bshd():
    B, S, H, D = 2, 7, 3, 16
    cos, sin = reference.rope_cos_sin(64, D, device=DEVICE)
    pos = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 2, 3, 4, 5]], device=DEVICE)  # left-padded row 2
    x = torch.randn(B, S, H, D, device=DEVICE)
    kw = dict(position_ids=pos, layout="bshd")
    check_op("apply_rotary_emb", lambda x: ops.apply_rotary_emb(x, cos, sin, **kw),
             lambda x: reference.apply_rotary_emb(x, cos, sin, **kw), [x], torch.float32)
    assert ops.apply_rotary_emb(x, cos, sin, **kw).is_contiguous()


def test_rope_per_token_tables_and_pair():
    B, H, S, D = 2, 2, 6, 16
    cos, sin = reference.rope_cos_sin(S, D, device=DEVICE)
    cos3, sin3 = cos.expand(B, S, D // 2), sin.expand(B, S, D // 2)
    q, k = torch.randn(B, H, S, D, device=DEVICE), torch.randn(B, 1, S, D, device=DEVICE)
    with expect_backend("apply_rotary_emb"):
        qr, kr = ops.rope(q, k, cos3, sin3)
    torch.testing.assert_close(qr, reference.apply_rotary_emb(q, cos, sin))
    torch.testing.assert_close(kr, reference.apply_rotary_emb(k, cos, sin))


def test_rope_preserves_norm_and_inverts():
    """A rotation keeps each pair's norm; its backward (the inverse rotation) undoes it."""
    cos, sin = reference.rope_cos_sin(9, 32, device=DEVICE)
    x = torch.randn(1, 2, 9, 32, device=DEVICE, requires_grad=True)
    y = ops.apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    (g,) = torch.autograd.grad(y, x, y.detach())
    torch.testing.assert_close(g, x.detach(), atol=1e-5, rtol=1e-5)


def test_rope_errors():
    cos, sin = reference.rope_cos_sin(8, 16, device=DEVICE)
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="R <= head dim"):
        ops.apply_rotary_emb(x[..., :8], cos, sin)
    with pytest.raises(ValueError, match="positions up to"):
        ops.apply_rotary_emb(x, cos, sin, seqlen_offset=1)
    with pytest.raises(ValueError, match="shapes differ"):
        ops.apply_rotary_emb(x, cos, sin[:4])
    with pytest.raises(ValueError, match="position_ids must be int"):
        ops.apply_rotary_emb(x, cos, sin, position_ids=torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="4-D"):
        ops.apply_rotary_emb(x[0], cos, sin)


def test_rope_position_ids_out_of_table():
    """CPU: a position outside the table raises. The kernel (what a CUDA tensor gets, with no
    host sync) reads nothing outside the table and makes that row NaN; the others are exact."""
    cos, sin = reference.rope_cos_sin(8, 16, device=DEVICE)
    x = torch.randn(2, 2, 5, 16, device=DEVICE)
    for bad in (8, -1, 1000):
        pos = torch.tensor([0, 1, bad, 3, 4], device=DEVICE)
        with pytest.raises(ValueError, match="outside the cos/sin table"):
            ops.apply_rotary_emb(x, cos, sin, position_ids=pos)
        from fastnets.kernels import rope as rope_kernels
        y = rope_kernels.rope(x, cos, sin, pos.expand(2, 5), 0, False, False)
        assert torch.isnan(y[:, :, 2, :16]).all()
        good = [0, 1, 3, 4]
        want = reference.apply_rotary_emb(x, cos, sin, position_ids=pos.clamp(0, 7))
        torch.testing.assert_close(y[:, :, good], want[:, :, good])
    with pytest.raises(ValueError, match="position_ids is on"):
        ops.apply_rotary_emb(x, cos, sin, position_ids=torch.arange(5, device="meta"))
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor"):
        ops.apply_rotary_emb(x, cos, sin, position_ids=[0, 1, 2, 3, 4])


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradcheck_float64_full(interleaved):
    """Full (not fast-mode) float64 gradcheck of the kernel's backward, partial rotary,
    position_ids."""
    cos, sin = reference.rope_cos_sin(12, 12, device=DEVICE, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([3, 0, 11, 5, 5], device=DEVICE)
    with expect_backend("apply_rotary_emb"):
        assert torch.autograd.gradcheck(lambda x: ops.apply_rotary_emb(x, cos, sin, interleaved, position_ids=pos),
                                        (x,), fast_mode=False)


def _hf_rotate_half(x, interleaved):
    """transformers' rotate_half (Llama) and its interleaved form (Cohere, GLM)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("repeat", [True, False], ids=["hf-tables", "distinct-halves"])
def test_rope_full_tables_match_transformers_form(repeat, interleaved, dtype):
    """tables="full": per-dim cos/sin as Hugging Face builds them, (B or 1, S, R), in x's dtype,
    partial rotary; against x * cos + rotate_half(x) * sin in float64. With distinct halves
    (not a rotation) the backward is still the exact transpose."""
    B, H, S, D, R = 2, 3, 7, 24, 16
    g = torch.Generator().manual_seed(5)
    angles = torch.rand(1, S, R // 2, generator=g, dtype=torch.float64) * 6
    if repeat:
        angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    else:
        angles = torch.rand(1, S, R, generator=g, dtype=torch.float64) * 6
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    x = torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype)

    def transformers_form(x):
        c, s = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
        rot, rest = x[..., :R], x[..., R:]
        return torch.cat((rot * c + _hf_rotate_half(rot, interleaved) * s, rest), -1)

    kw = dict(interleaved=interleaved, tables="full")
    check_op("apply_rotary_emb", lambda x: ops.apply_rotary_emb(x, cos, sin, **kw), transformers_form, [x], dtype,
             peer=lambda x: transformers_form(x))
    torch.testing.assert_close(reference.apply_rotary_emb(x.double(), cos, sin, **kw), transformers_form(x.double()))


def test_rope_full_tables_gradcheck_and_errors():
    g = torch.Generator().manual_seed(6)
    cos, sin = torch.rand(5, 8, generator=g, dtype=torch.float64), torch.rand(5, 8, generator=g, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin, x = cos.to(DEVICE), sin.to(DEVICE), x.detach().to(DEVICE).requires_grad_()
    with expect_backend("apply_rotary_emb"):
        assert torch.autograd.gradcheck(lambda x: ops.apply_rotary_emb(x, cos, sin, tables="full"), (x,),
                                        fast_mode=False)
    with pytest.raises(ValueError, match="R even"):
        ops.apply_rotary_emb(x, cos[:, :7], sin[:, :7], tables="full")
    with pytest.raises(ValueError, match="tables must be"):
        ops.apply_rotary_emb(x, cos, sin, tables="hf")
