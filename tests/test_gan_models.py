"""DCGAN generator and discriminator against the plain-torch DCGAN of PyTorch's example
(same layout, same weights): forward and every gradient in training mode (batch-statistics
BatchNorm: judged against float64 with torch's own float32 error as the yardstick), the fused
BN / conv activations ran, the spectral-norm discriminator too."""
import copy

import pytest
import torch
from torch import nn

import fastnets
from fastnets.models import DCGANDiscriminator, DCGANGenerator
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32


def torch_generator(nz, ngf, nc, n):
    mult = 2 ** (n - 1)
    layers = [nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * mult), nn.ReLU(True)]
    for _ in range(n - 1):
        layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                   nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
        mult //= 2
    return nn.Sequential(*layers, nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())


def torch_discriminator(nc, ndf, n, sn=False):
    wrap = torch.nn.utils.parametrizations.spectral_norm if sn else (lambda m: m)
    layers = [wrap(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
    mult = 1
    for _ in range(n - 1):
        layers += [wrap(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False))]
        layers += ([nn.LeakyReLU(0.2, inplace=True)] if sn else [nn.BatchNorm2d(ndf * mult * 2),
                                                                 nn.LeakyReLU(0.2, inplace=True)])
        mult *= 2
    return nn.Sequential(*layers, wrap(nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False)))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_dcgan_generator_matches_torch():
    torch.manual_seed(0)
    ours = DCGANGenerator(nz=6, ngf=4, nc=3, image_size=16).to(DEVICE)
    theirs = torch_generator(6, 4, 3, 2).to(DEVICE)
    theirs.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})
    z = torch.randn(3, 6, device=DEVICE)
    with expect_backend("conv_transpose2d"), expect_backend("batch_norm"):
        out = ours(z)
    theirs64 = copy.deepcopy(theirs).double()
    want, torch32 = theirs64(z.double()[:, :, None, None]), theirs(z[:, :, None, None])
    assert out.shape == (3, 3, 16, 16)
    assert_close(out, want, torch.float32, "G(z)", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    torch32.backward(g)
    for (n, p), q, q32 in zip(ours.named_parameters(), theirs64.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"G grad {n}", baseline=q32.grad, tol=MODEL_TRAIN_FLOAT32)


@pytest.mark.parametrize("sn", [False, True], ids=["batchnorm", "spectral_norm"])
def test_dcgan_discriminator_matches_torch(sn):
    torch.manual_seed(0)
    ours = DCGANDiscriminator(nc=3, ndf=4, image_size=16, spectral_norm=sn).to(DEVICE)
    theirs = torch_discriminator(3, 4, 2, sn).to(DEVICE)
    # Our Sequential keeps an nn.Identity where torch has the LeakyReLU after a fused conv.
    ours_params = [v for k, v in ours.state_dict().items()]
    theirs.load_state_dict(dict(zip(theirs.state_dict().keys(), ours_params)))
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    with expect_backend("conv2d"):
        out = ours(x)
    theirs64 = copy.deepcopy(theirs).double()
    want, torch32 = theirs64(x.double()).view(-1), theirs(x).view(-1)
    assert out.shape == (4,)
    assert_close(out, want, torch.float32, "D(x)", baseline=torch32, tol=MODEL_TRAIN_FLOAT32)
    out.sum().backward()
    want.sum().backward()
    torch32.sum().backward()
    for (n, p), q, q32 in zip(ours.named_parameters(), theirs64.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"D grad {n}", baseline=q32.grad, tol=MODEL_TRAIN_FLOAT32)


def test_dcgan_bad_image_size():
    with pytest.raises(ValueError, match="power of two"):
        DCGANGenerator(image_size=48)
    assert fastnets.models.DCGANDiscriminator(image_size=8, ndf=2, nc=1)(torch.randn(2, 1, 8, 8)).shape == (2,)
