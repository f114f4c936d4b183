"""UNet2D against diffusers' UNet2DModel with the same weights (the plain-torch model it
mirrors): state dicts load both ways, forward and backward match, the kernels ran; it runs
inside diffusers' pipelines; unsupported options fail clearly."""
import pytest
import torch

import fastnets
from fastnets import diffusion
from fastnets.models import UNet2D, UNet2DConfig
from helpers import DEVICE, assert_close, expect_backend
from tolerances import Tol

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
# Gradients summed over a whole UNet: judged at a floor of the largest gradient's scale (some,
# such as to_k's bias, are exactly zero in exact arithmetic: softmax ignores a per-row shift).
GRAD = Tol(atol=2e-4, rtol=2e-4, bench_rel=1e-3)


def _pair(**extra):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**TINY, **extra).to(DEVICE)
    ours = UNet2D(theirs.config).to(DEVICE)
    missing = ours.load_state_dict(theirs.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert set(ours.state_dict()) == set(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("extra", [dict(), dict(num_class_embeds=10, mid_block_scale_factor=1.4, freq_shift=1,
                                                flip_sin_to_cos=False, attention_head_dim=16, downsample_padding=0)],
                         ids=["default", "class-cond"])
def test_unet2d_matches_diffusers_forward_and_backward(extra):
    ours, theirs = _pair(**extra)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE)
    t = torch.tensor([3, 871], device=DEVICE)
    y = torch.tensor([4, 9], device=DEVICE) if extra.get("num_class_embeds") else None
    with expect_backend("conv2d"), expect_backend("group_norm"), expect_backend("scaled_dot_product_attention"), \
            expect_backend("timestep_embedding"):
        out = ours(x, t, y).sample
    ref64 = UNet2D(theirs.config).double().to(DEVICE)
    ref64.load_state_dict(theirs.state_dict())
    with fastnets.backend("torch"):
        want = ref64(x.double(), t, y).sample
    assert_close(out, want, torch.float32, "UNet2D output vs float64")
    assert_close(theirs(x, t, y).sample, want, torch.float32, "diffusers' output vs float64")
    gy = torch.randn(out.shape, generator=g).to(DEVICE)
    (out * gy).sum().backward()
    theirs(x, t, y).sample.mul(gy).sum().backward()
    dparams = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, dparams[name].grad.double(), torch.float32, f"grad {name}", tol=GRAD,
                     min_scale=max(q.grad.abs().max().item() for q in dparams.values()))


def test_unet2d_state_dict_loads_into_diffusers():
    torch.manual_seed(3)
    ours = UNet2D(UNet2DConfig(**TINY))
    theirs = diffusers.UNet2DModel(**TINY)
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(1, 3, 8, 8), torch.tensor(500)
    with torch.no_grad():
        assert_close(ours(x, t).sample, theirs(x, t).sample.double(), torch.float32, "ours -> diffusers")


def test_unet2d_in_diffusers_pipeline_with_fastnets_scheduler():
    """A DDIMPipeline with fastnets' UNet and scheduler gives diffusers' images."""
    ours, theirs = _pair()
    ours.eval()
    want = diffusers.DDIMPipeline(unet=theirs.eval(), scheduler=diffusers.DDIMScheduler())
    want.set_progress_bar_config(disable=True)
    ref = want(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe = diffusers.DDIMPipeline(unet=ours, scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = diffusion.DDIMScheduler.from_config(pipe.scheduler.config)   # __init__ converts to diffusers'
    pipe.set_progress_bar_config(disable=True)
    with expect_backend("sampler_step"), expect_backend("conv2d"):
        got = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert abs(got - ref).max() < 1e-4


def test_unet2d_unsupported_options_fail_clearly():
    with pytest.raises(NotImplementedError, match="time_embedding_type"):
        UNet2D(UNet2DConfig(**TINY, time_embedding_type="fourier"))
    with pytest.raises(NotImplementedError, match="SkipDownBlock2D"):
        UNet2D(UNet2DConfig(**dict(TINY, down_block_types=("SkipDownBlock2D", "AttnDownBlock2D"))))
    with pytest.raises(ValueError, match="same length"):
        UNet2D(UNet2DConfig(**dict(TINY, block_out_channels=(16, 32, 64))))
    model = UNet2D(UNet2DConfig(**TINY))
    with pytest.raises(ValueError, match="no class embedding"):
        model(torch.randn(1, 3, 8, 8), 1, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="one value per sample"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))
