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
from fastnets.models import transfer  # noqa: E402


# Seven-segment strokes (row0, col0, row1, col1 on an 8x8 grid) and the segments of each digit:
# the fallback dataset when scikit-learn is not installed.
_SEGMENTS = {"a": (1, 2, 1, 5), "b": (1, 5, 3, 5), "c": (4, 5, 6, 5), "d": (6, 2, 6, 5), "e": (4, 2, 6, 2),
             "f": (1, 2, 3, 2), "g": (3, 2, 4, 5)}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def synthetic_digits(n: int = 1800, seed: int = 0):
    """Seven-segment digits, randomly shifted, thickened and noised: 8x8, values 0..16."""
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.zeros(n, 8, 8), torch.arange(n) % 10
    for i in range(n):
        for seg in _DIGITS[int(labels[i])]:
            r0, c0, r1, c1 = _SEGMENTS[seg]
            images[i, r0:r1 + 1, c0:c1 + 1] = 16.0
        dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
        images[i] = torch.roll(images[i], (dy, dx), (0, 1))
    images = (images + 3 * torch.randn(n, 8, 8, generator=g)).clamp(0, 16)
    return images.numpy(), labels.numpy()


def load_digits(size: int, channels: int, seed: int = 0):
    """(x_train, y_train, x_test, y_test): scikit-learn's bundled digits (or, without it,
    generated seven-segment digits) scaled, normalized and upsampled to size x size."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        data = sk_digits()
        images, target = data.images, data.target
    except ImportError:
        print("scikit-learn not installed: using generated seven-segment digits instead")
        images, target = synthetic_digits(seed=seed)
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, channels, 1, 1)
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


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
