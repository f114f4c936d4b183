"""Train a fastnets CNN end to end on scikit-learn's bundled digits (1,797 8x8 images, no
download; generated seven-segment digits when scikit-learn is absent), upsampled to 32x32:
SimpleCNN or resnet18 (torchvision layout), optionally fine-tuned from a local checkpoint.
Reports held-out accuracy and images/s.

    python examples/train_cnn.py                       # SimpleCNN, 3 epochs, default device
    python examples/train_cnn.py --model resnet18 --channels-last --amp
    python examples/train_cnn.py --model resnet18 --finetune-from resnet18.pth --freeze-until layer4

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep --max-steps small there.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fastnets  # noqa: E402
from fastnets.datasets import load_digits, synthetic_digits  # noqa: E402,F401  (synthetic_digits: re-exported)
from fastnets.models import transfer  # noqa: E402


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    except ImportError:
        return iterable


def build(args) -> torch.nn.Module:
    if args.model == "simple":
        return fastnets.models.SimpleCNN(num_classes=10, in_channels=1, width=args.width)
    model = fastnets.models.resnet18(num_classes=1000 if args.finetune_from else 10)
    if args.finetune_from:
        transfer.load_checkpoint(model, args.finetune_from, skip_mismatched_head=True)
        transfer.replace_head(model, 10)
        trainable = ["fc"] + ([args.freeze_until] if args.freeze_until else [])
        transfer.freeze(model, trainable=trainable)
    return model


@torch.no_grad()
def evaluate(model, x, y, args, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), 256):
        xb = x[i:i + 256].to(device)
        if args.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            correct += (model(xb).argmax(1).cpu() == y[i:i + 256]).sum().item()
    return correct / len(y)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("simple", "resnet18"), default="simple")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="SimpleCNN width")
    p.add_argument("--size", type=int, default=32, help="image side after upsampling")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many test images")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--finetune-from", default=None, help="local torchvision-format resnet18 checkpoint")
    p.add_argument("--freeze-until", default=None, help="also train this stage (e.g. layer4) when fine-tuning")
    p.add_argument("--save", default=None, help="write the trained weights (.pth or .safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    channels = 1 if args.model == "simple" else 3
    x_tr, y_tr, x_te, y_te = load_digits(args.size, channels)
    if args.max_eval is not None:
        x_te, y_te = x_te[:args.max_eval], y_te[:args.max_eval]
    model = build(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(transfer.trainable_parameters(model), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    print(f"{args.model} on digits {tuple(x_tr.shape[1:])}: {len(y_tr)} train / {len(y_te)} test images, "
          f"device {device}, backend {fastnets._dispatch.explain('conv2d', device)[0]}")
    step, seen, train_time, loss = 0, 0, 0.0, float("nan")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr))
        for i in progress(range(steps_per_epoch), steps_per_epoch, f"epoch {epoch + 1}"):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:  # the first step compiles kernels; leave it out of the rate
                train_time += time.perf_counter() - t0
                seen += len(idx)
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        acc = evaluate(model, x_te, y_te, args, device)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {acc:.3f}")
        if args.max_steps is not None and step >= args.max_steps:
            break
    rate = seen / train_time if train_time else float("nan")
    print(f"trained {step} steps; {rate:.0f} images/s (training, excluding the first step)")
    if args.save:
        transfer.save_checkpoint(model, args.save)
        print(f"saved {args.save}")
    return {"accuracy": acc, "images_per_s": rate, "loss": loss.item(), "steps": step}


if __name__ == "__main__":
    main()
