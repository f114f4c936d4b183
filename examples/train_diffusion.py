"""Train a DDPM on fastnets kernels: a UNet2D (diffusers' UNet2DModel layout) on digits made
locally (scikit-learn's bundled 8x8 digits upsampled; no download), the forward process and
training target as one fused kernel (fastnets.ops.q_sample), EMA weights, bf16 autocast, a
progress bar, checkpoint save / resume, and a PNG grid of samples every N steps drawn with
a fused-step scheduler (the whole loop one CUDA graph on a GPU).

    python examples/train_diffusion.py                                   # default device
    python examples/train_diffusion.py --class-cond --guidance-scale 3   # class-conditional + CFG
    python examples/train_diffusion.py --save ddpm.pt --steps 2000
    python examples/train_diffusion.py --resume ddpm.pt --steps 4000     # continue that run

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep the model, --size and --steps small there.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fastnets  # noqa: E402
from fastnets import diffusion, ops  # noqa: E402
from fastnets.datasets import digit_images, save_image_grid  # noqa: E402
from fastnets.models import UNet2D, UNet2DConfig  # noqa: E402

SAMPLERS = {"ddim": diffusion.DDIMScheduler, "dpm": diffusion.DPMSolverMultistepScheduler,
            "euler": diffusion.EulerDiscreteScheduler, "euler_a": diffusion.EulerAncestralDiscreteScheduler,
            "ddpm": diffusion.DDPMScheduler}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="image side (the 8x8 digits are upsampled)")
    p.add_argument("--channels", default="64,128", help="block_out_channels, comma separated")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--groups", type=int, default=16, help="GroupNorm groups")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), default="epsilon")
    p.add_argument("--class-cond", action="store_true", help="condition on the digit (10 classes + a null class)")
    p.add_argument("--cond-drop", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling weights")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--sample-every", type=int, default=1000, help="write a sample grid every N steps (0: end only)")
    p.add_argument("--samples", type=int, default=64, help="images per grid")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (with --class-cond)")
    p.add_argument("--out", default="diffusion-out", help="folder for the PNG grids")
    p.add_argument("--save", help="checkpoint path, written at the end")
    p.add_argument("--resume", help="checkpoint to continue from (model, EMA, optimizer, step, config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args) -> UNet2DConfig:
    chans = tuple(int(c) for c in args.channels.split(","))
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(chans) - 1)
    up = ("AttnUpBlock2D",) * (len(chans) - 1) + ("UpBlock2D",)
    return UNet2DConfig(sample_size=args.size, in_channels=1, out_channels=1, block_out_channels=chans,
                        layers_per_block=args.layers_per_block, down_block_types=down, up_block_types=up,
                        norm_num_groups=args.groups, attention_head_dim=min(32, chans[-1]),
                        num_class_embeds=11 if args.class_cond else None)


@torch.no_grad()
def draw(model, args, train_config: dict, step: int, device) -> Path:
    model.eval()
    sched = SAMPLERS[args.sampler].from_config(train_config)
    n = args.samples
    kwargs, scale = {}, None
    if args.class_cond:
        labels = torch.arange(n, device=device) % 10
        if args.guidance_scale is not None:
            scale = args.guidance_scale
            labels = torch.cat([torch.full_like(labels, 10), labels])     # [uncond | cond]
        kwargs["class_labels"] = labels
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
        images = diffusion.sample(model, sched, (n, 1, args.size, args.size), steps=args.sample_steps, generator=g,
                                  guidance_scale=scale, device=device, model_kwargs=kwargs)
    path = save_image_grid(images.clamp(-1, 1), Path(args.out) / f"samples_{step:06d}.png", nrow=8)
    model.train()
    return path


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    config = UNet2DConfig(**resume["config"]) if resume else build_config(args)
    if resume:
        args.class_cond = config.num_class_embeds is not None
    model = UNet2D(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train_sched = diffusion.DDPMScheduler(num_train_timesteps=1000, prediction_type=args.prediction_type,
                                          clip_sample=True)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        train_sched = diffusion.DDPMScheduler.from_config(resume["scheduler"])
        start = resume["step"]
    images, labels = digit_images(args.size, seed=args.seed)
    images, labels = images.to(device), labels.to(device)
    acp = train_sched.alphas_cumprod
    table = ops.diffusion.q_sample_table(acp, images.dtype, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + start)
    print(f"UNet2D {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {len(labels)} digits "
          f"{tuple(images.shape[1:])}, device {device}, backend {fastnets._dispatch.explain('conv2d', device)[0]}")
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
        except ImportError:
            pass
    amp = args.amp and device.type == "cuda"
    losses, grids, seen, t0 = [], [], 0, None
    model.train()
    for step in range(start, args.steps):
        idx = torch.randint(0, len(labels), (args.batch_size,), device=device, generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (len(idx),), device=device, generator=gen)
        # x_t and the target (epsilon, x0 or v) in one fused pass.
        x_t, target = ops.q_sample(x0, noise, t, acp, target=args.prediction_type, table=table)
        kwargs = {}
        if args.class_cond:
            y = labels[idx]
            drop = torch.rand(len(idx), device=device, generator=gen) < args.cond_drop
            kwargs["class_labels"] = torch.where(drop, torch.full_like(y, 10), y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x_t, t, **kwargs).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))   # warm-up: the EMA follows closely at first
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        losses.append(loss.item())
        if step == start:   # the first step compiles / tunes kernels: not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            seen += len(idx)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.sample_every and (step + 1) % args.sample_every == 0 and step + 1 < args.steps:
            grids.append(draw(ema, args, dict(train_sched.config), step + 1, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    if bar is not None:
        bar.close()
    rate = seen / elapsed if elapsed > 0 and seen else 0.0
    first = sum(losses[:10]) / max(1, len(losses[:10]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(f"loss {first:.4f} (first steps) -> {last:.4f} (last steps) over {len(losses)} steps; "
          f"{rate:.1f} images/s ({device.type})")
    if args.save:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "step": args.steps, "config": vars(config), "scheduler": dict(train_sched.config)}, args.save)
        print(f"saved {args.save}")
    if args.samples:
        grids.append(draw(ema, args, dict(train_sched.config), args.steps, device))
        print(f"samples: {grids[-1]}")
    return {"first_loss": first, "last_loss": last, "steps": args.steps, "images_per_s": rate,
            "grids": [str(g) for g in grids], "losses": losses}


if __name__ == "__main__":
    main()
