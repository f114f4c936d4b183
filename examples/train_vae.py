"""Train a KL autoencoder (fastnets.models.AutoencoderKL, diffusers' AutoencoderKL layout) on
fastnets kernels: GroupNorm + SiLU ResNet blocks, a self-attention mid block, the
reparameterization and its KL term in one kernel, on digits made locally (scikit-learn's
bundled 8x8 digits upsampled; no download). ELBO training with a progress bar, losses logged,
checkpoint save / resume, and PNG grids of reconstructions (originals on the odd rows),
prior samples and latent interpolations.

    python examples/train_vae.py                                  # default device
    python examples/train_vae.py --beta 0.1 --latent 2            # weaker KL, 2 latent channels
    python examples/train_vae.py --save vae.pt --steps 2000
    python examples/train_vae.py --resume vae.pt --steps 4000     # continue that run

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep --size, --channels and --steps small there.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnets  # noqa: E402
from fastnets.datasets import digit_images, save_image_grid  # noqa: E402
from fastnets.models import AutoencoderKL, AutoencoderKLConfig  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="image side (the 8x8 digits are upsampled)")
    p.add_argument("--channels", default="32,64", help="block_out_channels, comma separated")
    p.add_argument("--latent", type=int, default=4, help="latent channels")
    p.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (1: the ELBO, sum-of-squares likelihood)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--sample-every", type=int, default=500, help="write the grids every N steps (0: end only)")
    p.add_argument("--samples", type=int, default=32, help="images per grid")
    p.add_argument("--eval-size", type=int, default=256, help="held-out images for the final ELBO")
    p.add_argument("--out", default="vae-out", help="folder for the PNG grids")
    p.add_argument("--save", help="checkpoint path, written at the end")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, step, config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args) -> AutoencoderKLConfig:
    chans = tuple(int(c) for c in args.channels.split(","))
    return AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=chans,
                               down_block_types=("DownEncoderBlock2D",) * len(chans),
                               up_block_types=("UpDecoderBlock2D",) * len(chans), latent_channels=args.latent,
                               norm_num_groups=args.groups, layers_per_block=args.layers_per_block,
                               sample_size=args.size)


@torch.no_grad()
def draw(model: AutoencoderKL, held_out: torch.Tensor, args, step: int) -> list[Path]:
    """Three grids: originals over their reconstructions, prior samples, interpolations."""
    model.eval()
    out = Path(args.out)
    n = max(2, min(args.samples, len(held_out)))
    x = held_out[:n]
    recon = model.reconstruct(x).clamp(-1, 1)
    k = min(8, n)
    pairs = torch.cat([t for i in range(0, n, k) for t in (x[i:i + k], recon[i:i + k])])
    paths = [save_image_grid(pairs, out / f"reconstructions_{step:06d}.png", nrow=k)]
    g = torch.Generator(device=x.device).manual_seed(args.seed)
    paths.append(save_image_grid(model.sample(n, generator=g).clamp(-1, 1), out / f"samples_{step:06d}.png", nrow=8))
    lines = [model.interpolate(x[2 * i], x[2 * i + 1], steps=min(8, n)) for i in range(min(4, n // 2))]
    paths.append(save_image_grid(torch.cat(lines).clamp(-1, 1), out / f"interpolations_{step:06d}.png",
                                 nrow=min(8, n)))
    model.train()
    return paths


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    config = AutoencoderKLConfig(**resume["config"]) if resume else build_config(args)
    model = AutoencoderKL(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start = resume["step"]
    images, _ = digit_images(config.sample_size, seed=args.seed)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    split = int(0.9 * len(images))
    train, held_out = images[perm[:split]].to(device), images[perm[split:]].to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + start)
    print(f"AutoencoderKL {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, latent "
          f"{config.latent_channels}x{config.sample_size // model.latent_scale}^2, on {len(train)} digits "
          f"{tuple(train.shape[1:])}, beta {args.beta}, device {device}, "
          f"backend {fastnets._dispatch.explain('conv2d', device)[0]}")
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
        except ImportError:
            pass
    amp = args.amp and device.type == "cuda"
    losses, recs, kls, grids, seen, t0 = [], [], [], [], 0, None
    model.train()
    for step in range(start, args.steps):
        x = train[torch.randint(0, len(train), (args.batch_size,), device=device, generator=gen)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, rec, kl = model.elbo(x, beta=args.beta, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        recs.append(rec.item())
        kls.append(kl.item())
        if step == start:   # the first step compiles / tunes kernels: not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            seen += args.batch_size
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", rec=f"{rec.item():.3f}", kl=f"{kl.item():.3f}")
        if args.sample_every and (step + 1) % args.sample_every == 0 and step + 1 < args.steps:
            grids += draw(model, held_out, args, step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    if bar is not None:
        bar.close()
    rate = seen / elapsed if elapsed > 0 and seen else 0.0
    mean = lambda v, sl: sum(v[sl]) / max(1, len(v[sl]))  # noqa: E731
    first, last = slice(0, 10), slice(-10, None)
    with torch.no_grad():
        model.eval()
        held_loss = model.elbo(held_out[:args.eval_size], beta=args.beta, generator=torch.Generator(device).manual_seed(0))[0]
        model.train()
    print(f"loss {mean(losses, first):.3f} (first steps) -> {mean(losses, last):.3f} (last steps: reconstruction "
          f"{mean(recs, last):.3f}, KL {mean(kls, last):.3f}); held-out ELBO loss {held_loss.item():.3f}; "
          f"{rate:.1f} images/s ({device.type})")
    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps,
                    "config": dataclasses.asdict(config)}, args.save)
        print(f"saved {args.save}")
    if args.samples:
        grids += draw(model, held_out, args, args.steps)
        print(f"grids: {', '.join(str(g) for g in grids[-3:])}")
    return {"first_loss": mean(losses, first), "last_loss": mean(losses, last), "held_out_loss": held_loss.item(),
            "steps": args.steps, "images_per_s": rate, "grids": [str(g) for g in grids], "losses": losses}


if __name__ == "__main__":
    main()
