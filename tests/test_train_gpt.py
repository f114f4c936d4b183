"""examples/train_gpt.py: training runs and learns, checkpoint resume continues exactly, and
two gloo processes (DDP, FSDP) produce the gradients of one process on the whole batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import expect_backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gpt.py"
# CPU and gloo everywhere (one GPU cannot host two ranks); on a GPU machine the in-process
# run takes the torch reference path, the torchrun ranks the interpreted kernels.
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--no-progress", "--eval-every", "0",
        "--device", "cpu"]


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_gpt
    finally:
        sys.path.pop(0)
    return train_gpt


def test_training_learns_and_resumes_exactly(tmp_path):
    train_gpt = _load()
    with expect_backend("flash_attention"), expect_backend("linear_cross_entropy"):
        log = train_gpt.main(TINY + ["--steps", "10", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2"])
    assert all(torch.isfinite(torch.tensor(log["losses"])))
    assert log["losses"][-1] < log["losses"][0] - 0.3, log["losses"]
    straight = tmp_path / "straight.pt"
    train_gpt.main(TINY + ["--steps", "4", "--batch-size", "4", "--save", str(straight)])
    half = tmp_path / "half.pt"
    train_gpt.main(TINY + ["--steps", "2", "--batch-size", "4", "--save", str(half)])
    resumed = tmp_path / "resumed.pt"
    train_gpt.main(TINY + ["--steps", "4", "--batch-size", "4", "--resume", str(half), "--save", str(resumed)])
    a, b = torch.load(straight, weights_only=False), torch.load(resumed, weights_only=False)
    assert b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)


def _torchrun(args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT)] + args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    """DDP (and FSDP2) on 2 CPU processes with gloo, 2 sequences each, with gradient
    accumulation: the averaged gradients equal one process's gradients on all 4 sequences."""
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    common = TINY + ["--steps", "1", "--grad-accum", "2"]
    _torchrun(common + ["--batch-size", "2", "--dump-grads", str(tmp_path / "two.pt")]
              + (["--fsdp"] if mode == "fsdp" else []), tmp_path)
    _load().main(common + ["--batch-size", "4", "--dump-grads", str(tmp_path / "one.pt")])
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert set(two["grads"]) == set(one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
