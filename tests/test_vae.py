"""The VAE's fused reparameterization + KL (fastnets.ops.gaussian_sample_kl) and
DiagonalGaussian: against the float64 formula and torch eager, gradients through the clamp,
float64 gradcheck, diffusers' DiagonalGaussianDistribution with the same generator, the
in-kernel Philox noise regenerated exactly in the backward, bad input."""
import pytest
import torch

import fastnets
from fastnets import ops, reference
from fastnets.models import DiagonalGaussian
from helpers import DEVICE, assert_close, expect_backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _moments(shape=(3, 10, 7, 9), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g) * 1.5
    C = shape[1] // 2
    # Above and below the clamp, and on its edge (the upper edge's exp(20) and its gradient
    # overflow float16: the lower edge there).
    wide = dtype in (torch.float32, torch.float64)
    m[0, C, 0, 0], m[1, C + 1, 2, 3], m[2, C, 1, 1] = 25.0, -40.0, 20.0 if wide else -30.0
    return m.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("want", ["both", "sample", "kl"])
def test_gaussian_sample_kl_matches_float64_and_torch(want, dtype):
    m = _moments(dtype=dtype).requires_grad_()
    noise = torch.randn((3, 5, 7, 9), generator=torch.Generator().manual_seed(1))
    noise[0, 0, 0, 0] = 0.1          # std exp(10) there: keep the sample within float16's range
    noise = noise.to(DEVICE, dtype)
    kw = dict(sample=want != "kl", kl=want != "sample")
    with expect_backend("gaussian_sample_kl"):
        s, k = ops.gaussian_sample_kl(m, noise=noise, **kw)
    m64 = m.detach().double().requires_grad_()
    rs, rk = reference.vae.gaussian_sample_kl(m64, noise.double())
    mb = m.detach().clone().requires_grad_()
    bs, bk = reference.vae.gaussian_sample_kl(mb, noise)       # torch eager in the dtype: the bar
    gs = torch.randn((3, 5, 7, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    gk = torch.randn(3, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    loss, ref, base = 0, 0, 0
    if kw["sample"]:
        assert k is None or kw["kl"]
        assert_close(s, rs, dtype, "sample", baseline=bs)
        loss, ref, base = loss + (s * gs).sum(), ref + (rs * gs.double()).sum(), base + (bs * gs).sum()
    if kw["kl"]:
        assert k.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(k, rk, torch.float32 if dtype != torch.float64 else dtype, "kl", tensor_scale=True)
        loss, ref, base = loss + (k * gk).sum(), ref + (rk * gk.double()).sum(), base + (bk * gk).sum()
    loss.backward()
    ref.backward()
    base.backward()
    assert_close(m.grad, m64.grad, dtype, "d moments", baseline=mb.grad, tensor_scale=True)
    C = 5
    assert m.grad[0, C, 0, 0] == 0 and m.grad[1, C + 1, 2, 3] == 0       # clamped: no gradient, as torch.clamp


def test_gaussian_sample_kl_gradcheck_float64():
    m = (torch.randn(2, 6, 3, 4, dtype=torch.float64) * 2).to(DEVICE).requires_grad_()
    noise = torch.randn(2, 3, 3, 4, dtype=torch.float64).to(DEVICE)
    assert torch.autograd.gradcheck(lambda mm: ops.gaussian_sample_kl(mm, noise=noise), (m,))


def test_diagonal_gaussian_matches_diffusers_with_the_same_generator():
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    m = _moments(dtype=torch.float32)
    theirs, ours = vae.DiagonalGaussianDistribution(m), DiagonalGaussian(m)
    with expect_backend("gaussian_sample_kl"):
        s = ours.sample(torch.Generator().manual_seed(7))
        k = ours.kl()
        s2, k2 = ours.sample_and_kl(torch.Generator().manual_seed(7))
    want_s = theirs.sample(torch.Generator().manual_seed(7))
    assert_close(s, want_s.double(), torch.float32, "sample vs diffusers", tensor_scale=True)
    assert torch.equal(s, s2) and torch.equal(k, k2)
    assert_close(k, theirs.kl().double(), torch.float32, "kl vs diffusers", tensor_scale=True)
    assert torch.equal(ours.mode(), theirs.mode())
    other = DiagonalGaussian(_moments(seed=5))
    assert_close(ours.kl(other), theirs.kl(vae.DiagonalGaussianDistribution(other.parameters)).double(),
                 torch.float32, "kl(other)", tensor_scale=True)
    assert_close(ours.nll(s), theirs.nll(s).double(), torch.float32, "nll", tensor_scale=True)
    assert_close(ours.std, theirs.std.double(), torch.float32, "std")
    det = DiagonalGaussian(m, deterministic=True)
    assert torch.equal(det.sample(torch.Generator().manual_seed(1)),
                       vae.DiagonalGaussianDistribution(m, deterministic=True).sample(torch.Generator().manual_seed(1)))


def test_in_kernel_noise_is_standard_normal_and_regenerated_in_backward():
    torch.manual_seed(0)
    m = torch.zeros(2, 8, 32, 32, device=DEVICE)
    m[:, 4:] = 0.7                                            # logvar: std = exp(0.35)
    m.requires_grad_()
    with expect_backend("gaussian_sample_kl"):
        s, _ = ops.gaussian_sample_kl(m, kl=False)
    eps = s.detach() / torch.exp(torch.tensor(0.35))
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    g = torch.randn_like(s)
    (s * g).sum().backward()
    # d sample / d logvar = 0.5 * std * eps = 0.5 * (sample - mean): the backward's regenerated
    # noise must be the forward's, element for element.
    assert_close(m.grad[:, 4:], (g * 0.5 * s.detach()).double(), torch.float32, "d logvar (regenerated eps)")
    assert_close(m.grad[:, :4], g.double(), torch.float32, "d mean")
    torch.manual_seed(0)
    again, _ = ops.gaussian_sample_kl(m.detach(), kl=False)
    assert torch.equal(again, s.detach()), "the seed comes from torch's generator: manual_seed reproduces it"


def test_gaussian_sample_kl_bad_input():
    with pytest.raises(ValueError, match="even channel count"):
        ops.gaussian_sample_kl(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="noise must have shape"):
        ops.gaussian_sample_kl(torch.randn(2, 6, 3, 3), noise=torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="not both"):
        ops.gaussian_sample_kl(torch.randn(2, 6, 3, 3), noise=torch.randn(2, 3, 3, 3), generator=torch.Generator())
    with pytest.raises(ValueError, match="nothing to compute"):
        ops.gaussian_sample_kl(torch.randn(2, 6, 3, 3), sample=False, kl=False)
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.randn(2, 3, 4, 4))


def test_torch_backend_agrees():
    m, n = _moments(), torch.randn(3, 5, 7, 9, device=DEVICE)
    s, k = ops.gaussian_sample_kl(m, noise=n)
    with fastnets.backend("torch"):
        rs, rk = ops.gaussian_sample_kl(m, noise=n)
    assert_close(s, rs.double(), torch.float32, "sample", tensor_scale=True)
    assert_close(k, rk.double(), torch.float32, "kl", tensor_scale=True)
