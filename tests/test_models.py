"""fastnets.models: ResNet against a torchvision-style plain-torch ResNet with the same
state_dict (keys, eval logits, train-mode logits and gradients), VGG / SimpleCNN, swap and
fuse_conv_bn on a foreign model, and the transfer-learning helpers."""
import copy

import pytest
import torch
from torch import nn

import fastnets
import torchvision_style as tv
from fastnets import fusion, models
from fastnets.models import transfer
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32


def _x(n=2, size=32):
    return torch.randn(n, 3, size, size, device=DEVICE)


def _pair(num_classes=10):
    ref = tv.randomize_bn(tv.resnet18(num_classes=num_classes)).to(DEVICE)
    ours = models.resnet18(num_classes=num_classes).to(DEVICE)
    ours.load_state_dict(ref.state_dict())   # strict: every key and shape matches
    return ours, ref


def test_resnet_state_dict_layout_matches_torchvision():
    for ours, ref in ((models.resnet18(), tv.resnet18()), (models.resnet50(), tv.resnet50())):
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)


def test_resnet18_eval_logits_match_reference():
    """Eval mode runs each conv-BN(-add)-ReLU as one folded conv kernel."""
    ours, ref = _pair()
    ours.eval(), ref.eval()
    x = _x()
    with torch.no_grad(), expect_backend("conv2d"):
        got = ours(x)
    want = copy.deepcopy(ref).double()(x.double())
    assert_close(got, want, torch.float32, "resnet18 eval logits", baseline=ref(x))


def test_resnet18_train_step_matches_reference():
    """Training mode: batch statistics through 17 BatchNorms at batch 2 (layer4 normalizes 1x1
    maps over 2 values), so in float32 the logits and every gradient are partly amplified
    rounding, which moves with the CPU's kernels. So float32 is judged against float64 with torch's
    own float32 model on the same inputs as the yardstick (MODEL_TRAIN_FLOAT32), and float64
    through the same kernels checks the math itself."""
    ours, ref = _pair()
    ours.train(), ref.train()
    x = _x()
    ref64 = copy.deepcopy(ref).double()
    with expect_backend("batch_norm"), expect_backend("conv2d"):
        got = ours(x)
    want, torch32 = ref64(x.double()), ref(x)
    assert_close(got, want, torch.float32, "resnet18 train logits", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    g = torch.randn_like(want)
    got.backward(g.float())
    want.backward(g)
    torch32.backward(g.float())
    ours_p, torch32_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name, p in ref64.named_parameters():
        assert_close(ours_p[name].grad, p.grad, torch.float32, f"grad {name}", baseline=torch32_p[name].grad,
                     tol=MODEL_TRAIN_FLOAT32)
    # running statistics updated as torch updates them (one step each)
    ours_b, torch32_b = dict(ours.named_buffers()), dict(ref.named_buffers())
    for name, b in ref64.named_buffers():
        if b.is_floating_point():
            assert_close(ours_b[name], b, torch.float32, name, baseline=torch32_b[name], tol=MODEL_TRAIN_FLOAT32)
    ours64, ref64b = _pair()
    ours64.double().train(), ref64b.double().train()
    with expect_backend("conv2d"), expect_backend("batch_norm"):
        out64 = ours64(x.double())
    out64.backward(g)
    ref64b(x.double()).backward(g)
    named64 = dict(ref64b.named_parameters())
    for name, p in ours64.named_parameters():
        assert_close(p.grad, named64[name].grad, torch.float64, f"float64 grad {name}", tensor_scale=True)


def test_resnet50_forward_channels_last():
    ref = tv.randomize_bn(tv.resnet50(num_classes=5)).to(DEVICE).eval()
    ours = models.resnet50(num_classes=5).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = _x(1, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), expect_backend("conv2d"), expect_backend("max_pool2d"):
        assert_close(ours(x), copy.deepcopy(ref).double()(x.double()), torch.float32, "resnet50 logits",
                     baseline=ref(x))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_layout_and_forward(batch_norm):
    model = models.VGG("A", batch_norm=batch_norm, num_classes=7, pool_size=1, hidden=64).to(DEVICE)
    # torchvision's vgg11 keys: features.0.weight, ..., classifier.0/3/6
    keys = [k for k in model.state_dict() if k.endswith("weight")]
    first_convs = ["features.0.weight", "features.4.weight"] if batch_norm else ["features.0.weight", "features.3.weight"]
    assert keys[0] == first_convs[0] and first_convs[1] in keys and "classifier.6.weight" in keys
    x = _x(2, 32)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad(), expect_backend("conv2d"), expect_backend("max_pool2d"):
        out = model(x)
    with torch.no_grad(), fastnets.backend("torch"):
        torch_out = model(x)     # torch's float32 (TF32 convolutions on CUDA, as ours)
        assert_close(out, model.double()(x.double()), torch.float32, "vgg eval", baseline=torch_out)


def test_simple_cnn_trains():
    model = models.SimpleCNN(num_classes=3, in_channels=1, width=8).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(12, 1, 8, 8, device=DEVICE)
    y = torch.arange(12, device=DEVICE) % 3
    x[y == 1, :, :4] += 2.0
    x[y == 2, :, 4:] += 2.0
    losses = []
    for _ in range(6):
        with expect_backend("conv2d"), expect_backend("batch_norm"):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- swap and fusion on a model someone else wrote ---------------------------------------------

def test_swap_fuses_conv_bn_relu_in_torchvision_style_resnet():
    ref = tv.randomize_bn(tv.resnet18(num_classes=4)).to(DEVICE).eval()
    model = copy.deepcopy(ref)
    report = fastnets.swap(model)
    fused = {(c, b) for c, b, _ in report.fused}
    assert ("conv1", "bn1") in fused and ("layer1.0.conv1", "layer1.0.bn1") in fused
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in fused
    assert len(report.fused) == 20   # every conv in resnet18 is followed by its BN
    x = _x(2, 32)
    with torch.no_grad(), expect_backend("conv2d"):
        assert_close(model(x), copy.deepcopy(ref).double()(x.double()), torch.float32, "swapped eval",
                     baseline=ref(x))
    model.train(), ref.train()
    with expect_backend("batch_norm"):
        got = model(x)
    assert_close(got, copy.deepcopy(ref).double()(x.double()), torch.float32, "swapped train",
                 baseline=ref(x), tol=MODEL_TRAIN_FLOAT32)
    fastnets.unswap(model)
    assert type(model.layer1[0].conv1) is nn.Conv2d and type(model.relu) is nn.ReLU


def test_fusion_chain_detection_requires_data_flow():
    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y        # conv output used twice: folding would be wrong

    assert fusion.find_conv_bn_chains(Tricky()) == []
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert fusion.find_conv_bn_chains(seq) == [fusion.Chain("0", "1", "2", True)]


def test_fuse_conv_bn_permanent():
    ref = tv.randomize_bn(tv.resnet18(num_classes=4)).to(DEVICE).eval()
    ours = models.resnet18(num_classes=4).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    fastnets.fuse_conv_bn(ours)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    x = _x(1, 32)
    with torch.no_grad(), expect_backend("conv2d"):
        assert_close(ours(x), copy.deepcopy(ref).double()(x.double()), torch.float32, "folded logits",
                     baseline=ref(x))


# --- transfer learning ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_transfer_learning_from_local_checkpoint(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="safetensors is a test extra; the GPU image may lack it")
    ref = tv.randomize_bn(tv.resnet18(num_classes=1000))
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)  # DDP-wrapped
    else:
        transfer.save_checkpoint(ref, path)
    model = models.resnet18(num_classes=1000)
    transfer.load_checkpoint(model, path)
    assert torch.equal(model.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)

    head = transfer.replace_head(model, 6)
    assert head is model.fc and model.fc.out_features == 6
    transfer.freeze(model, trainable=["fc"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    transfer.unfreeze(model, ["layer4"])
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert not model.layer3[0].conv1.weight.requires_grad
    model.to(DEVICE).train()
    assert not model.layer1[0].bn1.training and model.layer4[0].bn1.training   # frozen BNs keep their stats

    with expect_backend("conv2d"):
        feats = transfer.feature_extractor(model)(_x(2, 32))
    assert feats.shape == (2, 512)

    # a 1000-class checkpoint into the 6-class model: skip the mismatched head
    fresh = models.resnet18(num_classes=6)
    result = transfer.load_checkpoint(fresh, path, skip_mismatched_head=True)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}


def test_transfer_errors(tmp_path):
    model = models.resnet18(num_classes=3)
    with pytest.raises(FileNotFoundError):
        transfer.load_checkpoint(model, tmp_path / "missing.pth")
    torch.save({"not": "tensors"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="state_dict"):
        transfer.load_checkpoint(model, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unknown module"):
        transfer.freeze(model, trainable=["layer9"])
    with pytest.raises(ValueError, match="num_classes"):
        transfer.replace_head(model, 0)


def test_eval_fold_is_cached_until_a_weight_changes():
    """Inference folds each BN into its conv once, and refolds after an in-place update."""
    conv, bn = fastnets.nn.Conv2d(3, 4, 3, padding=1, bias=False), fastnets.nn.BatchNorm2d(4)
    tv.randomize_bn(nn.Sequential(bn))
    conv.to(DEVICE).eval(), bn.to(DEVICE).eval()
    x = _x(1, 6)
    with torch.no_grad():
        first = fastnets.nn.conv_bn_act(conv, bn, x)
        w_cached = conv.__dict__["_fastnets_fold_cache"][1][0]
        assert fastnets.nn.conv_bn_act(conv, bn, x).equal(first) and conv.__dict__["_fastnets_fold_cache"][1][0] is w_cached
        bn.running_mean.add_(1.0)
        after = fastnets.nn.conv_bn_act(conv, bn, x)
    assert conv.__dict__["_fastnets_fold_cache"][1][0] is not w_cached
    def torch_block(x, conv, bn):
        return torch.relu(torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, conv.weight, None, 1, 1),
                                                         bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
    want = torch_block(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double())
    assert_close(after, want, torch.float32, "conv+bn+relu after a refold", baseline=torch_block(x, conv, bn))
