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
vae:
- gaussian_sample_kl (reparameterized sample and per-sample KL) at SD-VAE latent shapes vs
  diffusers' DiagonalGaussianDistribution's formulas in torch. Bytes: moments and noise
  read, sample written (backward: moments, noise, dsample read; dmoments written).
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


def r1_step_cases(device: torch.device, quick: bool) -> list[Case]:
    """forward + input gradient (create_graph) + R1 penalty + backward through a DCGAN
    discriminator, fastnets vs plain torch with the same weights."""
    from ..models import DCGANDiscriminator
    from torch import nn
    cuda = device.type == "cuda"
    B, size, ndf = (32 if quick else 64, 64, 64) if cuda else (2, 16, 4)
    torch.manual_seed(0)
    ours = DCGANDiscriminator(nc=3, ndf=ndf, image_size=size).to(device)
    layers, ch, n = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)], ndf, 1
    while size // 2 ** (n + 1) >= 4:
        layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2)]
        ch, n = 2 * ch, n + 1
    theirs = nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, 1, 0, bias=False)).to(device)
    theirs.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})

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


def gan_cases(device: torch.device, quick: bool) -> list[Case]:
    return upfirdn_cases(device, quick) + loss_cases(device, quick) + r1_step_cases(device, quick)


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
    return cases
