"""Train a DCGAN on fastnets kernels: generator (transposed convolutions with BatchNorm + ReLU
fused, tanh in the last epilogue) and discriminator (convolutions with LeakyReLU fused, with
BatchNorm, spectral norm or neither) on digits made locally (scikit-learn's bundled 8x8
digits upsampled; no download), fused GAN losses, an optional lazy R1 penalty through the
discriminator's double backward, a progress bar, losses logged, checkpoint save / resume, and
a PNG grid of samples from fixed noise every N steps.

    python examples/train_gan.py                                  # default device
    python examples/train_gan.py --loss hinge --d-norm spectral   # SN-GAN with the hinge loss
    python examples/train_gan.py --r1 1.0 --d-norm none           # R1-regularised discriminator
    python examples/train_gan.py --save gan.pt --steps 2000
    python examples/train_gan.py --resume gan.pt --steps 4000     # continue that run

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep --size, the widths and --steps small there.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnets  # noqa: E402
from fastnets import ops  # noqa: E402
from fastnets.datasets import digit_images, save_image_grid  # noqa: E402
from fastnets.models import DCGANDiscriminator, DCGANGenerator  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="image side, a power of two >= 8 (digits are upsampled)")
    p.add_argument("--nz", type=int, default=32, help="latent size")
    p.add_argument("--ngf", type=int, default=32, help="generator width")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width")
    p.add_argument("--d-norm", choices=("batch", "spectral", "none"), default="batch")
    p.add_argument("--loss", choices=("nonsaturating", "hinge", "bce", "wasserstein"), default="nonsaturating")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="one-sided, for --loss bce")
    p.add_argument("--r1", type=float, default=0.0, help="R1 gamma (0: off)")
    p.add_argument("--r1-every", type=int, default=4, help="lazy R1: penalise every N steps, scaled by N")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--sample-every", type=int, default=500, help="write a sample grid every N steps (0: end only)")
    p.add_argument("--samples", type=int, default=64, help="images per grid")
    p.add_argument("--out", default="gan-out", help="folder for the PNG grids")
    p.add_argument("--save", help="checkpoint path, written at the end")
    p.add_argument("--resume", help="checkpoint to continue from (both models, both optimizers, step, config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


CONFIG_KEYS = ("size", "nz", "ngf", "ndf", "d_norm", "loss", "label_smoothing", "r1", "r1_every")


def build(cfg: dict, device):
    G = DCGANGenerator(nz=cfg["nz"], ngf=cfg["ngf"], nc=1, image_size=cfg["size"]).to(device)
    D = DCGANDiscriminator(nc=1, ndf=cfg["ndf"], image_size=cfg["size"], batch_norm=cfg["d_norm"] == "batch",
                           spectral_norm=cfg["d_norm"] == "spectral").to(device)
    return G, D


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    cfg = resume["config"] if resume else {k: getattr(args, k) for k in CONFIG_KEYS}
    G, D = build(cfg, device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    start = 0
    if resume:
        G.load_state_dict(resume["G"])
        D.load_state_dict(resume["D"])
        opt_g.load_state_dict(resume["opt_g"])
        opt_d.load_state_dict(resume["opt_d"])
        start = resume["step"]
    images, _ = digit_images(cfg["size"], seed=args.seed)
    images = images.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + start)
    fixed_z = torch.randn(args.samples, cfg["nz"], device=device, generator=torch.Generator(device).manual_seed(1))
    print(f"DCGAN G {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M / D "
          f"{sum(p.numel() for p in D.parameters()) / 1e6:.2f}M params on {len(images)} digits "
          f"{tuple(images.shape[1:])}, loss {cfg['loss']}, D norm {cfg['d_norm']}, R1 {cfg['r1']}, device {device}, "
          f"backend {fastnets._dispatch.explain('conv2d', device)[0]}")
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
        except ImportError:
            pass
    smoothing = cfg["label_smoothing"] if cfg["loss"] == "bce" else 0.0
    d_losses, g_losses, penalties, grids, seen, t0 = [], [], [], [], 0, None

    def grid(step):
        G.eval()
        with torch.no_grad():
            path = save_image_grid(G(fixed_z), Path(args.out) / f"samples_{step:06d}.png", nrow=8)
        G.train()
        return path

    for step in range(start, args.steps):
        real = images[torch.randint(0, len(images), (args.batch_size,), device=device, generator=gen)]
        z = torch.randn(args.batch_size, cfg["nz"], device=device, generator=gen)
        fake = G(z)
        # Discriminator: real vs fake, plus the lazy R1 penalty on real data (a second
        # derivative through every discriminator op).
        d_loss = (ops.gan_loss(D(real), True, cfg["loss"], label_smoothing=smoothing)
                  + ops.gan_loss(D(fake.detach()), False, cfg["loss"]))
        if cfg["r1"] > 0 and step % cfg["r1_every"] == 0:
            x = real.detach().requires_grad_()
            (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            penalty = ops.gradient_penalty(grad, "r1", gamma=cfg["r1"]) * cfg["r1_every"]
            d_loss = d_loss + penalty
            penalties.append(penalty.item())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # Generator.
        g_loss = ops.gan_loss(D(fake), True, cfg["loss"], for_generator=True)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d_losses.append(d_loss.item())
        g_losses.append(g_loss.item())
        if step == start:   # the first step compiles / tunes kernels: not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            seen += args.batch_size
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_loss.item():.3f}")
        if args.sample_every and (step + 1) % args.sample_every == 0 and step + 1 < args.steps:
            grids.append(grid(step + 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    if bar is not None:
        bar.close()
    rate = seen / elapsed if elapsed > 0 and seen else 0.0
    mean = lambda v: sum(v[-10:]) / max(1, len(v[-10:]))  # noqa: E731
    print(f"last steps: D loss {mean(d_losses):.4f}, G loss {mean(g_losses):.4f}"
          + (f", R1 {mean(penalties):.4f}" if penalties else "") + f"; {rate:.1f} images/s ({device.type})")
    if args.save:
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "step": args.steps, "config": cfg}, args.save)
        print(f"saved {args.save}")
    if args.samples:
        grids.append(grid(args.steps))
        print(f"samples: {grids[-1]}")
    return {"d_losses": d_losses, "g_losses": g_losses, "penalties": penalties, "steps": args.steps,
            "images_per_s": rate, "grids": [str(g) for g in grids]}


if __name__ == "__main__":
    main()
