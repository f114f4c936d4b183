"""GAN and VAE benchmark cases (`python -m fastnets bench --ops gan vae`).

gan:
- upfirdn2d at StyleGAN2 256x256 layer shapes (4-tap [1, 3, 3, 1] filter: up 2 after a
  64x64 layer, down 2 of a 128x128 one, the filter-only blur) vs the same math as torch ops
  (StyleGAN2's reference pipeline: zero insertion by reshape + pad, depthwise conv, strided
  slice), eager and torch.compile. Bytes: x read, y written (the backward: dy, dx).
- filtered_lrelu, StyleGAN3's 12-tap up 2 / down 2 at 64x64 with 256 channels, against the
  same chain of torch ops. Bytes are the fused ideal (x read, y written; the backward dy
  read, dx written): fastnets makes two passes and keeps the upsampled activation, so its
  GB/s is a fraction of what a one-pass kernel would post, on purpose.
- gan_loss and the gradient penalty's squared norm vs their torch formulas.
- The R1-regularised DCGAN discriminator step at 64x64, batch 64: forward on real images,
  the input gradient with create_graph, the penalty, backward; fastnets' DCGAN
  discriminator vs the same network in plain torch with the same weights (eager and
  torch.compile of the loss function). Size = images.
- A DCGAN training step (D on real and fake, G through D; 64x64, batch 128) vs the same
  networks in plain torch, eager and compiled (GPU only).
vae:
- gaussian_sample_kl (reparameterized sample and per-sample KL) at SD-VAE latent shapes vs
  diffusers' DiagonalGaussianDistribution's formulas in torch. Bytes: moments and noise
  read, sample written (backward: moments, noise, dsample read; dmoments written).
- The AutoencoderKL ELBO step (64x64, bf16 autocast) vs diffusers' AutoencoderKL, eager and
  compiled (GPU with diffusers installed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Case, dtype_size, peers


def _torch_upfirdn2d(x, f, up, down, pad):
    """StyleGAN2's reference upfirdn2d in the input's dtype (2-D filter, square factors)."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H, 1, W, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(N, C, H * up, W * up)
    x = F.pad(x, [pad[0], pad[1], pad[2], pad[3]])
    w = f.flip(0, 1).to(x.dtype)[None, None].expand(C, 1, *f.shape)
    return F.conv2d(x, w, groups=C)[:, :, ::down, ::down]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def upfirdn_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    f1 = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    f2 = torch.outer(f1, f1) / 64
    # (label, input shape, up, down, padding, output shape)
    if cuda:
        shapes = [("up2", (16, 256, 64, 64), 2, 1, (2, 1, 2, 1), (16, 256, 128, 128)),
                  ("down2", (16, 128, 128, 128), 1, 2, (1, 1, 1, 1), (16, 128, 64, 64)),
                  ("blur", (16, 128, 128, 128), 1, 1, (2, 1, 2, 1), (16, 128, 128, 128))]
        if quick:
            shapes = shapes[:1]
    else:
        shapes = [("up2", (2, 4, 8, 8), 2, 1, (2, 1, 2, 1), (2, 4, 16, 16))]
    dtype = torch.float32
    es = dtype_size(dtype)
    cases = []
    for label, shape, up, down, pad, out in shapes:
        gain = float(up * up)

        def inputs(dev, shape=shape):
            return (torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True),)

        impls = {"fastnets": lambda x, up=up, down=down, pad=pad, gain=gain: ops.upfirdn2d(
                     x, f2, up, down, pad, gain=gain),
                 **peers(lambda x, up=up, down=down, pad=pad, gain=gain: _torch_upfirdn2d(x, f2 * gain, up, down, pad),
                         device)}
        io = (_numel(shape) + _numel(out)) * es
        cases.append(Case("gan", f"upfirdn2d_{label}", "x".join(map(str, shape)), _numel(out), dtype, inputs, impls,
                          io, io))
    # filtered_lrelu: StyleGAN3's up 2 / down 2 with 12-tap filters (a windowed sinc; the values
    # do not change the work).
    # (4 taps in the CPU functional run: the interpreter walks every tap in Python.)
    shape, n_taps = ((16, 256, 64, 64), 12) if cuda else ((2, 4, 8, 8), 4)
    taps = torch.hann_window(n_taps + 2, periodic=False, device=device)[1:-1]
    fu = fd = taps / taps.sum()
    # Up 2 then down 2 keep the input's size when the padding totals 2 * taps - 3.
    pad = (n_taps - 1, n_taps - 2, n_taps - 1, n_taps - 2)

    def fl_inputs(dev):
        return (torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True),
                torch.randn(shape[1], device=dev, dtype=dtype, requires_grad=True))

    def torch_flrelu(x, b):
        z = _torch_upfirdn2d(x + b.view(1, -1, 1, 1), torch.outer(fu, fu) * 4, 2, 1, pad)
        z = F.leaky_relu(z, 0.2) * 2 ** 0.5
        return _torch_upfirdn2d(z, torch.outer(fd, fd), 1, 2, (0, 0, 0, 0))

    impls = {"fastnets": lambda x, b: ops.filtered_lrelu(x, fu, fd, b, up=2, down=2, padding=pad),
             **peers(torch_flrelu, device)}
    io = 2 * _numel(shape) * es
    cases.append(Case("gan", "filtered_lrelu_up2_down2", "x".join(map(str, shape)) + f" {n_taps}-tap", _numel(shape), dtype, fl_inputs,
                      impls, io, io))
    return cases


def loss_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    n = 64 * 30 * 30 if cuda else 64                     # PatchGAN logits, batch 64
    img = (64, 3, 256, 256) if cuda else (2, 3, 8, 8)
    dtype = torch.float32

    def logit_inputs(dev):
        return (torch.randn(n, device=dev, dtype=dtype, requires_grad=True),)

    cases = [Case("gan", "gan_loss_nonsaturating", f"{n} logits", n, dtype, logit_inputs,
                  {"fastnets": lambda x: ops.gan_loss(x, True, "nonsaturating"),
                   **peers(lambda x: F.softplus(-x).mean(), device)}, n * 4, 2 * n * 4)]

    def grad_inputs(dev):
        return (torch.randn(*img, device=dev, dtype=dtype, requires_grad=True),)

    m = _numel(img)
    cases.append(Case("gan", "gradient_penalty_r1", "x".join(map(str, img)), m, dtype, grad_inputs,
                      {"fastnets": lambda g: ops.gradient_penalty(g, "r1", 10.0),
                       **peers(lambda g: 5.0 * g.square().flatten(1).sum(1).mean(), device)}, m * 4, 2 * m * 4))
    return cases


def _torch_dcgan(nz: int, ngf: int, ndf: int, size: int, device):
    """PyTorch's DCGAN example, in plain torch (the layout fastnets.models.DCGAN* keep)."""
    from torch import nn
    n = size.bit_length() - 3                      # 4x4 after the first layer, doubling up to size
    mult = 2 ** (n - 1)
    g = [nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * mult), nn.ReLU(True)]
    for _ in range(n - 1):
        g += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * mult // 2),
              nn.ReLU(True)]
        mult //= 2
    G = nn.Sequential(*g, nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())
    d, mult = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)], 1
    for _ in range(n - 1):
        d += [nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult * 2),
              nn.LeakyReLU(0.2)]
        mult *= 2
    D = nn.Sequential(*d, nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False))
    return G.to(device), D.to(device)


def _dcgan_pair(device, nz, ngf, ndf, size):
    """(fastnets G, D), (torch G, D) with the same weights."""
    from ..models import DCGANDiscriminator, DCGANGenerator
    torch.manual_seed(0)
    G = DCGANGenerator(nz=nz, ngf=ngf, nc=3, image_size=size).to(device)
    D = DCGANDiscriminator(nc=3, ndf=ndf, image_size=size).to(device)
    tG, tD = _torch_dcgan(nz, ngf, ndf, size, device)
    for ours, theirs in ((G, tG), (D, tD)):
        theirs.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})
    return (G, D), (tG, tD)


def r1_step_cases(device: torch.device, quick: bool) -> list[Case]:
    """forward + input gradient (create_graph) + R1 penalty + backward through a DCGAN
    discriminator, fastnets vs plain torch with the same weights."""
    cuda = device.type == "cuda"
    B, size, ndf = (32 if quick else 64, 64, 64) if cuda else (2, 16, 4)
    (_, ours), (_, theirs) = _dcgan_pair(device, 8, 4, ndf, size)

    def step(model, penalty):
        def fn(x):
            x = x.detach().requires_grad_()
            logits = model(x)
            (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
            return F.softplus(-logits).mean() + penalty(g)
        return fn

    def torch_r1(g):
        return 5.0 * g.square().flatten(1).sum(1).mean()

    def inputs(dev):
        return (torch.randn(B, 3, size, size, device=dev),)

    impls = {"fastnets": step(ours, lambda g: ops.gradient_penalty(g, "r1", 10.0)), "torch": step(theirs, torch_r1)}
    if cuda:
        impls["torch.compile"] = step(torch.compile(theirs), torch_r1)
    return [Case("gan", "r1_discriminator_step", f"DCGAN D {size}x{size} batch {B}", B, torch.float32, inputs, impls,
                 0, 0, modes=("fwd_bwd",), check_rel=1e-2)]


def dcgan_train_cases(device: torch.device, quick: bool) -> list[Case]:
    """One DCGAN training step's forward and backward (D on real and fake, G through D), 64x64,
    batch 128 (64 quick), float32, fastnets vs plain torch with the same weights. Size = images.
    GPU only: interpreted, a 64x64 DCGAN step takes minutes."""
    if device.type != "cuda":
        return []
    B, nz = (64 if quick else 128), 100
    (G, D), (tG, tD) = _dcgan_pair(device, nz, 64, 64, 64)

    def step(gen, disc, loss):
        def fn(real, z):
            fake = gen(z)
            d = loss(disc(real), True) + loss(disc(fake.detach()), False)
            return d + loss(disc(fake), True)
        return fn

    def fast_loss(x, real):
        return ops.gan_loss(x, real)

    def torch_loss(x, real):
        return F.softplus(-x if real else x).mean()

    def inputs(dev):
        return torch.randn(B, 3, 64, 64, device=dev), torch.randn(B, nz, 1, 1, device=dev)

    compiled_G, compiled_D = torch.compile(tG), torch.compile(tD)
    impls = {"fastnets": step(G, D, fast_loss), "torch": step(tG, tD, torch_loss),
             "torch.compile": step(compiled_G, compiled_D, torch_loss)}
    return [Case("gan", "dcgan_train_step", f"DCGAN 64x64 batch {B}", B, torch.float32, inputs, impls, 0, 0,
                 modes=("fwd_bwd",), check_rel=0.05)]


def gan_cases(device: torch.device, quick: bool) -> list[Case]:
    return (upfirdn_cases(device, quick) + loss_cases(device, quick) + r1_step_cases(device, quick)
            + dcgan_train_cases(device, quick))


def vae_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    shapes = ([(16, 8, 64, 64)] if quick else [(16, 8, 64, 64), (64, 8, 128, 128)]) if cuda else [(2, 8, 4, 4)]
    cases = []
    for dtype in ((torch.bfloat16, torch.float32) if cuda else (torch.float32,)):
        es = dtype_size(dtype)
        for shape in shapes:
            half = (shape[0], shape[1] // 2) + shape[2:]

            def inputs(dev, shape=shape, half=half, dtype=dtype):
                return (torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True),
                        torch.randn(*half, device=dev, dtype=dtype))

            def fast_sample(m, eps):
                return ops.gaussian_sample_kl(m, noise=eps, kl=False)[0]

            def fast_kl(m, eps):
                return ops.gaussian_sample_kl(m, kl=True, sample=False)[1]

            def torch_sample(m, eps):
                mean, logvar = m.chunk(2, dim=1)
                return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps

            def torch_kl(m, eps):
                mean, logvar = m.float().chunk(2, dim=1)
                logvar = logvar.clamp(-30.0, 20.0)
                return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)

            n = _numel(half)
            label = "x".join(map(str, shape))
            # sample: moments and eps read, sample written; backward: dsample and eps read
            # (logvar re-read for exp), dmoments written.
            cases.append(Case("vae", "gaussian_sample", label, n, dtype, inputs,
                              {"fastnets": fast_sample, **peers(torch_sample, device)}, 4 * n * es, 5 * n * es))
            # KL: moments read, B floats written; backward: moments read, dmoments written.
            cases.append(Case("vae", "gaussian_kl", label, n, dtype, inputs,
                              {"fastnets": fast_kl, **peers(torch_kl, device)}, 2 * n * es, 4 * n * es))
    return cases + vae_train_cases(device, quick)


def vae_train_cases(device: torch.device, quick: bool) -> list[Case]:
    """The AutoencoderKL ELBO step (encode, reparameterize, decode, reconstruction + KL) at
    64x64 RGB, batch 32 (16 quick), bf16 autocast, vs diffusers' AutoencoderKL with the same
    weights, eager and torch.compile'd. Size = images. GPU and diffusers only."""
    import importlib.util
    if device.type != "cuda" or importlib.util.find_spec("diffusers") is None:
        return []
    import diffusers
    from ..models import AutoencoderKL
    B = 16 if quick else 32
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(64, 128, 256),
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               latent_channels=4, norm_num_groups=32, layers_per_block=1, sample_size=64)
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**cfg).to(device)
    ours = AutoencoderKL(theirs.config).to(device)
    ours.load_state_dict(theirs.state_dict())

    def step(model):
        def fn(x, eps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                dist = model.encode(x).latent_dist
                z = dist.mean + dist.std * eps
                rec = model.decode(z).sample
            return (rec.float() - x).square().flatten(1).sum(1).mean() + dist.kl().float().mean()
        return fn

    def fast(x, eps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            dist = ours.encode(x).latent_dist
            z, kl = ops.gaussian_sample_kl(dist.parameters, noise=eps.to(dist.parameters.dtype))
            rec = ours.decode(z).sample
        return (rec.float() - x).square().flatten(1).sum(1).mean() + kl.mean()

    def inputs(dev):
        return (torch.randn(B, 3, 64, 64, device=dev, requires_grad=True), torch.randn(B, 4, 16, 16, device=dev))

    impls = {"fastnets": fast, "torch": step(theirs), "torch.compile": step(torch.compile(theirs))}
    return [Case("vae", "autoencoder_kl_train_step", f"AutoencoderKL 64x64 batch {B}", B, torch.bfloat16, inputs,
                 impls, 0, 0, modes=("fwd_bwd",), check_rel=0.05)]
