"""End-to-end: swap fastnets' norms into a model fastnets did not write (torch's
TransformerEncoder with a GroupNorm+SiLU conv stem), check outputs and a short training run
against the untouched model, and time both.

    python examples/swap_transformer.py      # CUDA if present, else the Triton interpreter
"""
import copy
import os
import time

import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnets  # noqa: E402


class TinyModel(nn.Module):
    def __init__(self, d=64, heads=4, layers=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(8, d, 3, padding=1), nn.GroupNorm(8, d), nn.SiLU())
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):                       # x: (B, 8, T)
        h = self.stem(x).transpose(1, 2)        # (B, T, d)
        return self.head(self.encoder(h).mean(1))


def train(model, data, target, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(data), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, steps = (256, 50) if device.type == "cuda" else (16, 8)
    model = TinyModel().to(device)
    fast = copy.deepcopy(model)
    report = fastnets.swap(fast)
    print(report)
    data = torch.randn(batch, 8, 32, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():
        diff = (fast(data) - model(data)).abs().max().item()
    print(f"max |logits(swapped) - logits(torch)| = {diff:.2e}")
    ref_losses, ref_time = train(model, data, target, steps)
    fast_losses, fast_time = train(fast, data, target, steps)
    print(f"loss after {steps} steps: torch {ref_losses[-1]:.4f}, fastnets {fast_losses[-1]:.4f}")
    mode = "" if device.type == "cuda" else " (Triton interpreter on CPU: a functional run, not a speed figure)"
    print(f"train time: torch {ref_time:.2f} s, fastnets {fast_time:.2f} s{mode}")
    if diff > 1e-3 or abs(ref_losses[-1] - fast_losses[-1]) > 1e-2:
        raise SystemExit("swapped model diverged from the torch model")
    fastnets.unswap(fast)   # back to torch.nn: same modules, same (trained) Parameters
    assert not any(type(m).__module__.startswith("fastnets.") for m in fast.modules())
    print("unswapped: the model is plain torch.nn again, with its trained parameters")


if __name__ == "__main__":
    main()
