"""Small image sets made locally (no download) and a dependency-free PNG grid writer, for
the examples and tests: scikit-learn's bundled digits (or generated seven-segment digits
when scikit-learn is absent), upsampled to any size."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F


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


def digit_images(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) in [-1, 1], labels (N,)): the digits for generative models."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        data = sk_digits()
        images, target = data.images, data.target
    except ImportError:
        images, target = synthetic_digits(seed=seed)
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(target, dtype=torch.long)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, value_range: tuple = (-1.0, 1.0)) -> Path:
    """Write (N, C, H, W) images (C = 1 or 3) as one PNG grid with a 1-pixel border; values
    in value_range map to 0..255. Plain zlib + the PNG chunk format: no imaging library."""
    x = images.detach().float().cpu()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"save_image_grid: images need 1 or 3 channels, got {c}")
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + 1) + 1, ncol * (w + 1) + 1) * 0.5
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    color = 0 if c == 1 else 2
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
