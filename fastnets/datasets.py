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


# --- an image-caption set for contrastive (CLIP) training, rendered locally -------------------

CAPTION_COLORS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
                  "yellow": (0.95, 0.9, 0.15), "purple": (0.65, 0.2, 0.85), "white": (0.95, 0.95, 0.95)}
CAPTION_SHAPES = ("circle", "square", "triangle", "cross", "zero", "one", "two", "three", "four", "five", "six",
                  "seven", "eight", "nine")
CAPTION_POSITIONS = ("left", "right", "top", "bottom", "center")


def caption(color: str, shape: str, position: str) -> str:
    """The caption of one rendered image: "a red circle on the left", "a blue seven in the center"."""
    where = "in the center" if position == "center" else f"on the {position}"
    return f"a {color} {shape} {where}"


def _digit_glyphs() -> torch.Tensor:
    """(10, 8, 8) one clean-ish glyph per digit in [0, 1]: the first scikit-learn digit of each
    class (generated seven-segment digits without scikit-learn)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        data = sk_digits()
        images, target = data.images, data.target
    except ImportError:
        images, target = synthetic_digits(n=10)
    target = torch.as_tensor(target)
    first = [int(torch.nonzero(target == d)[0]) for d in range(10)]
    return torch.as_tensor(images[first], dtype=torch.float32) / 16.0


def shape_captions(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[str], dict]:
    """n images (n, 3, size, size) in [-1, 1] of one coloured shape or digit at one of five
    positions on a noisy dark background, their captions, and the attributes as index
    tensors {"color", "shape", "position"} (into CAPTION_COLORS / CAPTION_SHAPES /
    CAPTION_POSITIONS) for zero-shot evaluation. Deterministic in seed; no download."""
    if size < 16:
        raise ValueError(f"shape_captions: size must be >= 16, got {size}")
    g = torch.Generator().manual_seed(seed)
    colors = list(CAPTION_COLORS)
    attrs = {"color": torch.randint(len(colors), (n,), generator=g),
             "shape": torch.randint(len(CAPTION_SHAPES), (n,), generator=g),
             "position": torch.randint(len(CAPTION_POSITIONS), (n,), generator=g)}
    glyphs = _digit_glyphs()
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    centers = {"left": (0.5, 0.25), "right": (0.5, 0.75), "top": (0.25, 0.5), "bottom": (0.75, 0.5),
               "center": (0.5, 0.5)}
    images = 0.1 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    captions = []
    for i in range(n):
        color, shape, pos = colors[attrs["color"][i]], CAPTION_SHAPES[attrs["shape"][i]], \
            CAPTION_POSITIONS[attrs["position"][i]]
        jitter = (torch.rand(3, generator=g) - 0.5).tolist()
        cy, cx = (centers[pos][0] + 0.06 * jitter[0]) * size, (centers[pos][1] + 0.06 * jitter[1]) * size
        r = size * (0.16 + 0.04 * jitter[2])
        dy, dx = yy - cy, xx - cx
        if shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif shape == "square":
            mask = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
        elif shape == "triangle":
            mask = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
        elif shape == "cross":
            mask = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
        else:
            side = max(4, int(round(2 * r)))
            glyph = F.interpolate(glyphs[CAPTION_SHAPES.index(shape) - 4][None, None], size=(side, side),
                                  mode="bilinear", align_corners=False)[0, 0]
            mask = torch.zeros(size, size, dtype=torch.bool)
            top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
            t0, l0 = max(top, 0), max(left, 0)
            t1, l1 = min(top + side, size), min(left + side, size)
            mask[t0:t1, l0:l1] = glyph[t0 - top:t1 - top, l0 - left:l1 - left] > 0.35
        rgb = torch.tensor(CAPTION_COLORS[color]).view(3, 1, 1)
        images[i] = torch.where(mask, rgb.expand(3, size, size), images[i])
        captions.append(caption(color, shape, pos))
    return (images.clamp(0, 1) * 2 - 1), captions, attrs
