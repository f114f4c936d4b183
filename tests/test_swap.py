"""swap()/unswap() on models fastnets did not write, and the drop-in modules."""
import copy

import pytest
import torch
from torch import nn

import fastnets
from fastnets import nn as fnn
from helpers import DEVICE, assert_close, expect_backend


def _encoder():
    layer = nn.TransformerEncoderLayer(d_model=24, nhead=4, dim_feedforward=40, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(24), enable_nested_tensor=False).to(DEVICE)


def test_swap_transformer_encoder_matches_and_shares_parameters():
    model = _encoder().eval()
    x = torch.randn(3, 7, 24, device=DEVICE)
    before = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = fastnets.swap(model)
    assert report.model is model
    assert len(report.replaced) == 10  # the encoder, 2 x (layer, self_attn, norm1, norm2), the final norm
    assert all(isinstance(m, fnn.LayerNorm) for n, m in model.named_modules() if "norm" in n.split(".")[-1])
    assert all(type(layer) is fnn.TransformerEncoderLayer for layer in model.layers)
    assert all(type(layer.self_attn) is fnn.MultiheadAttention for layer in model.layers)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same Parameter objects
    with expect_backend("layer_norm"), expect_backend("scaled_dot_product_attention"), expect_backend("bias_act"):
        after = model(x)
    assert_close(after, before.double(), torch.float32, "encoder output after swap")
    fastnets.unswap(model)
    assert not any(isinstance(m, (fnn.LayerNorm, fnn.MultiheadAttention, fnn.TransformerEncoderLayer))
                   for m in model.modules())
    assert all(p is params_before[n] for n, p in model.named_parameters())


def test_swap_trains_like_torch():
    """A few optimizer steps with and without swap() give the same losses (convergence)."""
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16), nn.GroupNorm(4, 16),
                        nn.RMSNorm(16), nn.Linear(16, 1)).to(DEVICE)
    fast = copy.deepcopy(ref)
    fastnets.swap(fast)
    data = torch.randn(24, 12, device=DEVICE)
    target = data.sum(-1, keepdim=True).sin()
    losses = []
    for model in (ref, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        curve = []
        for step in range(10):
            loss = (model(data) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(torch.tensor(curve))
    assert losses[0][-1] < losses[0][0]
    assert torch.allclose(losses[1], losses[0], rtol=1e-4, atol=1e-5), (losses[0], losses[1])


def test_include_exclude_and_report():
    model = nn.Sequential(nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.Sequential(nn.LayerNorm(8)))
    report = fastnets.swap(model, exclude=[nn.GroupNorm, "2.0"])
    assert [name for name, *_ in report.replaced] == ["0"]
    assert {(name, why) for name, _, why in report.skipped} == {("1", "excluded"), ("2.0", "excluded")}
    assert "replaced 1 module(s)" in str(report)
    model = nn.Sequential(nn.LayerNorm(8), nn.GroupNorm(2, 8))
    report = fastnets.swap(model, include=["GroupNorm"])
    assert [name for name, *_ in report.replaced] == ["1"] and report.skipped[0][2] == "not in include"
    with pytest.raises(TypeError, match="include/exclude"):
        fastnets.swap(model, include=[3])


def test_swap_root_module_and_subclass_left_alone():
    report = fastnets.swap(nn.LayerNorm(5))
    assert isinstance(report.model, fnn.LayerNorm)

    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    report = fastnets.swap(nn.Sequential(MyNorm(5)))
    assert not report.replaced and "subclass" in report.skipped[0][2]


def test_modules_are_drop_in():
    for torch_mod, fast_mod in [(nn.LayerNorm(6, eps=1e-3, bias=False), fnn.LayerNorm(6, eps=1e-3, bias=False)),
                                (nn.GroupNorm(3, 6, affine=False), fnn.GroupNorm(3, 6, affine=False)),
                                (nn.RMSNorm([2, 3], eps=1e-4), fnn.RMSNorm([2, 3], eps=1e-4))]:
        assert list(torch_mod.state_dict()) == list(fast_mod.state_dict())
        fast_mod.load_state_dict(torch_mod.state_dict())
        assert repr(torch_mod).split("(", 1)[1] == repr(fast_mod).split("(", 1)[1]
    gn = fnn.GroupNorm(2, 4, activation="silu").to(DEVICE)
    x = torch.randn(2, 4, 5, device=DEVICE)
    assert_close(gn(x), torch.nn.functional.silu(nn.functional.group_norm(x, 2, gn.weight, gn.bias)).double(),
                 torch.float32, "GroupNorm(activation='silu')")
    assert "activation='silu'" in repr(gn)
    with pytest.raises(ValueError, match="activation"):
        fnn.GroupNorm(2, 4, activation="relu")
    rms = fnn.RMSNorm(4, offset=1.0)
    assert torch.equal(rms.weight, torch.zeros(4)) and "offset=1.0" in repr(rms)
