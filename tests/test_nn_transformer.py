"""fastnets.nn MultiheadAttention, TransformerEncoderLayer / DecoderLayer and CrossEntropyLoss
against the torch modules with the same weights: outputs and parameter gradients."""
import copy

import pytest
import torch
from torch import nn

import fastnets
from fastnets import nn as fnn
from helpers import DEVICE, assert_close, expect_backend


def _compare(torch_mod, fast_mod, inputs, call, what, op="scaled_dot_product_attention"):
    """Same forward and same parameter / input gradients (float32, against torch in float64)."""
    ref = copy.deepcopy(torch_mod).double()
    fast_mod.zero_grad(set_to_none=True)
    ref_in = [t.double().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for t in inputs]
    ours_in = [t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
               for t in inputs]
    with expect_backend(op):
        out = call(fast_mod, ours_in)
    want = call(ref, ref_in)
    assert_close(out, want, torch.float32, f"{what} forward")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    for (name, p), (_, pr) in zip(fast_mod.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, torch.float32, f"{what} grad of {name}")
    for i, (a, b) in enumerate(zip(ours_in, ref_in)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert_close(a.grad, b.grad, torch.float32, f"{what} grad of input {i}")


def _fast(module):
    fast = copy.deepcopy(module)
    return fastnets.swap(fast).model


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_self_attention_with_masks(batch_first):
    E, H, N, L = 32, 4, 3, 11
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).to(DEVICE)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), device=DEVICE)
    kpm = torch.zeros(N, L, dtype=torch.bool, device=DEVICE)
    kpm[1, 7:] = True
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=DEVICE), 1)
    fast = _fast(mha)
    assert type(fast) is fnn.MultiheadAttention
    call = lambda m, a: m(a[0], a[0], a[0], key_padding_mask=kpm, attn_mask=causal, need_weights=False)[0]  # noqa: E731
    _compare(mha, fast, [x], call, "mha self")
    float_mask = torch.randn(N * H, L, L, device=DEVICE)
    call = lambda m, a: m(a[0], a[0], a[0], attn_mask=a[1], need_weights=False)[0]  # noqa: E731
    _compare(mha, fast, [x, float_mask], call, "mha float mask")
    call = lambda m, a: m(a[0], a[0], a[0], attn_mask=causal, is_causal=True, need_weights=False)[0]  # noqa: E731
    _compare(mha, fast, [x], call, "mha is_causal")


def test_mha_cross_attention_kdim_vdim_and_unbatched():
    mha = nn.MultiheadAttention(24, 3, kdim=16, vdim=20, batch_first=True).to(DEVICE)
    fast = _fast(mha)
    q, k, v = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 9, 16, device=DEVICE), torch.randn(2, 9, 20,
                                                                                                        device=DEVICE)
    kpm = torch.tensor([[0] * 9, [0] * 6 + [1] * 3], dtype=torch.bool, device=DEVICE)
    call = lambda m, a: m(a[0], a[1], a[2], key_padding_mask=kpm, need_weights=False)[0]  # noqa: E731
    _compare(mha, fast, [q, k, v], call, "mha cross")
    call = lambda m, a: m(a[0][0], a[1][0], a[2][0], need_weights=False)[0]  # noqa: E731
    _compare(mha, fast, [q, k, v], call, "mha unbatched")


@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_runs_the_flash_kernels_and_returns_torch_weights(average):
    """need_weights=True (torch's default): the output on the flash kernels, the weights as
    torch returns them (masks, per head or averaged, unbatched), gradients through both."""
    E, H, N, L, S = 16, 2, 2, 4, 6
    mha = nn.MultiheadAttention(E, H, batch_first=True).to(DEVICE)
    fast = _fast(mha)
    q, kv = torch.randn(N, L, E, device=DEVICE), torch.randn(N, S, E, device=DEVICE)
    kpm = torch.tensor([[0] * S, [0] * 4 + [1] * 2], dtype=torch.bool, device=DEVICE)
    float_mask = torch.randn(L, S, device=DEVICE)
    for kw in (dict(key_padding_mask=kpm), dict(attn_mask=float_mask), {}):
        def call(m, a, kw=kw):
            kw = {k: v.to(a[0].dtype) if v.is_floating_point() else v for k, v in kw.items()}
            return torch.cat([t.flatten() for t in m(a[0], a[1], a[1], average_attn_weights=average, **kw)])
        _compare(mha, fast, [q, kv], call, f"mha need_weights {sorted(kw)}")
    with expect_backend("scaled_dot_product_attention"):
        out, w = fast(q[0], kv[0], kv[0], average_attn_weights=average)
    ref, w_ref = copy.deepcopy(mha).double()(q[0].double(), kv[0].double(), kv[0].double(),
                                             average_attn_weights=average)
    assert w.shape == w_ref.shape
    assert_close(out, ref, torch.float32, "unbatched out")
    assert_close(w, w_ref, torch.float32, "unbatched weights")


def test_mha_need_weights_with_dropout_in_training_falls_back_with_warning():
    """The weights torch returns in training are the dropped-out ones its output used: torch's path."""
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).to(DEVICE)
    fast = _fast(mha)
    x = torch.randn(2, 4, 16, device=DEVICE)
    with pytest.warns(UserWarning, match="need_weights=True and dropout"):
        torch.manual_seed(0)
        out, w = fast(x, x, x)
    torch.manual_seed(0)
    ref, w_ref = mha(x, x, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_encoder_layer(norm_first, activation):
    layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first).to(DEVICE)
    fast = _fast(layer)
    assert type(fast) is fnn.TransformerEncoderLayer and type(fast.self_attn) is fnn.MultiheadAttention
    x = torch.randn(2, 9, 32, device=DEVICE)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    kpm[0, 6:] = True
    _compare(layer, fast, [x], lambda m, a: m(a[0], src_key_padding_mask=kpm), "encoder layer")
    built = fnn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True).to(DEVICE)
    assert list(built.state_dict()) == list(layer.state_dict())


def test_decoder_layer():
    layer = nn.TransformerDecoderLayer(32, 4, 40, dropout=0.0, batch_first=True).to(DEVICE)
    fast = _fast(layer)
    assert type(fast.multihead_attn) is fnn.MultiheadAttention
    tgt, mem = torch.randn(2, 7, 32, device=DEVICE), torch.randn(2, 10, 32, device=DEVICE)
    causal = nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    _compare(layer, fast, [tgt, mem], lambda m, a: m(a[0], a[1], tgt_mask=causal, tgt_is_causal=True),
             "decoder layer")


def test_cross_entropy_loss_module():
    loss = nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1).to(DEVICE)
    fast = _fast(loss)
    assert type(fast) is fnn.CrossEntropyLoss
    x = torch.randn(13, 9, device=DEVICE)
    t = torch.randint(0, 9, (13,), device=DEVICE)
    _compare(loss, fast, [x], lambda m, a: m(a[0], t).reshape(1), "CrossEntropyLoss", op="cross_entropy")
    fz = fnn.CrossEntropyLoss(z_loss=1e-3)
    assert fz(x, t) > fast.__class__()(x, t)
