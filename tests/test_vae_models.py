"""AutoencoderKL: diffusers' AutoencoderKL with the same weights (state dicts load both ways;
reconstruction through a posterior sample drawn from the same generator, the ELBO terms and
every parameter's gradient match), the fused kernels ran, the ELBO goes down in a short CPU
run, sampling and interpolation, bad configs."""
import pytest
import torch

from fastnets.models import AutoencoderKL
from helpers import DEVICE, assert_close, expect_backend
from tolerances import MODEL_TRAIN_FLOAT32

try:
    import diffusers
except ImportError:   # the GPU image has no diffusers
    diffusers = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed (pip install diffusers)")

CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
              norm_num_groups=4, sample_size=8, layers_per_block=1)


@needs_diffusers
def test_autoencoder_kl_matches_diffusers_forward_and_every_gradient():
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**CONFIG).to(DEVICE)
    ours = AutoencoderKL(theirs.config).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())          # and back: the same names and shapes
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with expect_backend("conv2d"), expect_backend("group_norm"), expect_backend("gaussian_sample_kl"):
        out = ours(x, sample_posterior=True, generator=torch.Generator(DEVICE).manual_seed(3)).sample
        dist = ours.encode(x).latent_dist
        kl = dist.kl()
    want = theirs(x, sample_posterior=True, generator=torch.Generator(DEVICE).manual_seed(3)).sample
    assert_close(out, want.double(), torch.float32, "reconstruction", tol=MODEL_TRAIN_FLOAT32)
    assert_close(kl, theirs.encode(x).latent_dist.kl().double(), torch.float32, "KL", tol=MODEL_TRAIN_FLOAT32)
    # Gradients of a loss through the deterministic path (the posterior mean) and the KL.
    g = torch.randn_like(out)
    ((ours(x).sample * g).sum() + ours.encode(x).latent_dist.kl().sum()).backward()
    ((theirs(x).sample * g).sum() + theirs.encode(x).latent_dist.kl().sum()).backward()
    theirs_p = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs_p[name].grad.double(), torch.float32, f"grad {name}", tol=MODEL_TRAIN_FLOAT32)


def test_elbo_goes_down_and_sampling_shapes():
    torch.manual_seed(0)
    # One block (no resampling): every interpreted launch costs, and this is a training loop.
    model = AutoencoderKL(**{**CONFIG, "down_block_types": ("DownEncoderBlock2D",),
                             "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (8,)}).to(DEVICE)
    x = torch.rand(2, 3, 8, 8, device=DEVICE) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(3):
        loss, rec, kl = model.elbo(x, beta=0.1, generator=torch.Generator(DEVICE).manual_seed(step))
        assert torch.isfinite(loss) and rec >= 0 and kl >= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3, generator=torch.Generator(DEVICE).manual_seed(0)).shape == (3, 3, 8, 8)
    line = model.interpolate(x[0], x[1], steps=3)
    assert line.shape == (3, 3, 8, 8)
    assert_close(line[0], model.reconstruct(x[:1])[0].double(), torch.float32, "interpolation start",
                 tol=MODEL_TRAIN_FLOAT32)


def test_autoencoder_kl_bad_config_raises():
    with pytest.raises(NotImplementedError, match="down_block_types"):
        AutoencoderKL(**{**CONFIG, "down_block_types": ("DownEncoderBlock2D",)})
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(**{**CONFIG, "norm_num_groups": 3})
    with pytest.raises(NotImplementedError, match="act_fn"):
        AutoencoderKL(**{**CONFIG, "act_fn": "relu"})
