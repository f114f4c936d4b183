"""The examples run end to end (tiny settings: the kernels are interpreted on a CPU)."""
import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_cnn_digits_smoke(tmp_path):
    train_cnn = _load("train_cnn")
    out = tmp_path / "digits.pth"
    result = train_cnn.main(["--max-steps", "3", "--epochs", "1", "--width", "4", "--size", "8", "--batch-size", "16",
                             "--max-eval", "32", "--save", str(out)])
    assert result["steps"] == 3 and 0.0 <= result["accuracy"] <= 1.0 and torch.isfinite(torch.tensor(result["loss"]))
    assert out.exists()


def test_synthetic_digits_fallback_is_learnable_shape():
    images, labels = _load("train_cnn").synthetic_digits(n=20)
    assert images.shape == (20, 8, 8) and set(labels.tolist()) == set(range(10))
    assert images.min() >= 0 and images.max() <= 16


def test_train_char_lm_smoke_save_resume(tmp_path):
    lm = _load("train_char_lm")
    ckpt = tmp_path / "lm.pt"
    small = ["--embed", "8", "--hidden", "16", "--layers", "1", "--seq-len", "12", "--batch-size", "4",
             "--no-progress", "--max-chars", "20000"]
    first = lm.main(small + ["--steps", "2", "--sample", "10", "--save", str(ckpt)])
    assert first["steps"] == 2 and torch.isfinite(torch.tensor(first["loss"])) and len(first["sample"]) > 10
    resumed = lm.main(["--resume", str(ckpt), "--steps", "3", "--sample", "0", "--seq-len", "12", "--batch-size", "4",
                       "--no-progress", "--max-chars", "20000"])
    assert resumed["steps"] == 3 and torch.isfinite(torch.tensor(resumed["loss"]))


def test_train_diffusion_smoke_save_resume(tmp_path):
    ddpm = _load("train_diffusion")
    ckpt, out = tmp_path / "ddpm.pt", tmp_path / "grids"
    small = ["--size", "8", "--channels", "8,16", "--groups", "4", "--batch-size", "2", "--no-progress",
             "--out", str(out)]
    first = ddpm.main(small + ["--steps", "2", "--samples", "2", "--sample-steps", "1", "--save", str(ckpt),
                               "--class-cond", "--guidance-scale", "2.0"])
    assert first["steps"] == 2 and torch.isfinite(torch.tensor(first["losses"])).all()
    grid = Path(first["grids"][-1])
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resumed = ddpm.main(["--resume", str(ckpt), "--steps", "3", "--samples", "0", "--size", "8", "--batch-size", "2",
                         "--no-progress"])
    assert resumed["steps"] == 3 and len(resumed["losses"]) == 1


def test_train_gan_smoke_r1_save_resume(tmp_path):
    gan = _load("train_gan")
    ckpt, out = tmp_path / "gan.pt", tmp_path / "grids"
    small = ["--size", "8", "--nz", "4", "--ngf", "4", "--ndf", "4", "--batch-size", "2", "--no-progress",
             "--out", str(out)]
    first = gan.main(small + ["--steps", "2", "--samples", "2", "--r1", "1.0", "--r1-every", "1", "--d-norm", "none",
                              "--save", str(ckpt)])
    assert first["steps"] == 2 and len(first["penalties"]) == 2
    assert torch.isfinite(torch.tensor(first["d_losses"] + first["g_losses"] + first["penalties"])).all()
    assert Path(first["grids"][-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resumed = gan.main(["--resume", str(ckpt), "--steps", "3", "--samples", "0", "--batch-size", "2",
                        "--no-progress"])
    assert resumed["steps"] == 3 and len(resumed["d_losses"]) == 1


def test_train_vae_smoke_save_resume(tmp_path):
    vae = _load("train_vae")
    ckpt, out = tmp_path / "vae.pt", tmp_path / "grids"
    first = vae.main(["--size", "8", "--channels", "4", "--latent", "2", "--groups", "2", "--batch-size", "2",
                      "--steps", "1", "--samples", "2", "--eval-size", "2", "--no-progress", "--out", str(out),
                      "--save", str(ckpt)])
    assert first["steps"] == 1 and torch.isfinite(torch.tensor(first["losses"])).all()
    assert len(first["grids"]) == 3 and all(Path(g).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for g in first["grids"])
    resumed = vae.main(["--resume", str(ckpt), "--steps", "2", "--samples", "0", "--batch-size", "2", "--eval-size", "2",
                        "--no-progress"])
    assert resumed["steps"] == 2 and len(resumed["losses"]) == 1


def test_train_clip_smoke_save_resume(tmp_path):
    clip = _load("train_clip")
    ckpt = tmp_path / "clip.pt"
    small = ["--width", "16", "--layers", "1", "--heads", "1", "--embed", "8", "--train-size", "16", "--batch-size", "8",
             "--max-steps", "1", "--eval-size", "8", "--templates", "1", "--no-progress"]
    first = clip.main(small + ["--epochs", "1", "--save", str(ckpt), "--loss", "sigmoid"])
    assert first["epochs"] == 1 and len(first["history"]) == 1
    h = first["history"][0]
    assert torch.isfinite(torch.tensor(h["loss"])) and all(0.0 <= h[k] <= 1.0 for k in ("shape", "color", "position"))
    resumed = clip.main(small + ["--resume", str(ckpt), "--epochs", "2"])
    assert [e["epoch"] for e in resumed["history"]] == [2]
