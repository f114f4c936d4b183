"""Train fastnets' GPT on a byte-level corpus that ships with Python itself (the source of
standard-library modules: no download), with AdamW, a warmup + cosine schedule, bf16
autocast, gradient accumulation, checkpoint save / resume, a progress bar, and DDP or FSDP
under torchrun.

    python examples/train_gpt.py --config tiny --steps 200                  # one process
    torchrun --nproc_per_node 8 examples/train_gpt.py --config gpt2 --amp   # DDP
    torchrun --nproc_per_node 8 examples/train_gpt.py --config gpt2 --fsdp  # FSDP2 (fully_shard)
    python examples/train_gpt.py --resume ckpt.pt --steps 400               # continue a run

Each step draws one global batch of --batch-size * world_size sequences from a generator
seeded by (seed, step); rank r takes rows [r * batch_size, (r + 1) * batch_size), so any
world size sees the same data, and the DDP-averaged gradient equals a single process's
gradient on the whole global batch (tests/test_train_gpt.py checks this with gloo on CPU).
On a CPU the kernels run in Triton's interpreter: correct but slow; keep models tiny there.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import sys
import sysconfig
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

from fastnets.models import GPT, GPTConfig  # noqa: E402


def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the Python standard library's own source files, sorted by name (the same on
    every machine with the same Python), as a uint8 tensor."""
    root = sysconfig.get_paths()["stdlib"]
    data, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            chunk = f.read()
        data.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(data)[:max_bytes]), dtype=torch.uint8).clone()


def global_batch(corpus: torch.Tensor, step: int, batch: int, seq_len: int, seed: int, split: str = "train"):
    """(inputs, targets) of shape (batch, seq_len) for this step: 90% of the corpus trains, 10% evaluates."""
    cut = int(len(corpus) * 0.9)
    lo, hi = (0, cut) if split == "train" else (cut, len(corpus))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
    starts = torch.randint(lo, hi - seq_len - 1, (batch,), generator=g)
    rows = torch.stack([corpus[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or embeddings of size 1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", help="GPTConfig name (tiny, gpt2, gpt2-medium, llama-tiny)")
    p.add_argument("--n-layer", type=int, help="override the config's depth")
    p.add_argument("--n-embd", type=int, help="override the config's width")
    p.add_argument("--n-head", type=int, help="override the config's head count")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per micro-step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save", help="checkpoint path, written every --save-every steps and at the end")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, step, config)")
    p.add_argument("--sample", type=int, default=0, help="generate this many bytes at the end")
    p.add_argument("--dump-grads", help="after the first step's backward, save the gradients here and stop (tests)")
    p.add_argument("--log-json", help="write the loss curve and throughput here (rank 0)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)

    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    if resume is not None:
        config = GPTConfig(**resume["config"])
    else:
        overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head))
                     if v is not None}
        config = GPTConfig.from_name(args.config, vocab_size=256, block_size=max(args.seq_len, 64), **overrides)
    model = GPT(config).to(device)
    if resume is not None:
        model.load_state_dict(resume["model"])
    raw_model = model
    if distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if args.compile:
        model = torch.compile(model)
    opt = make_optimizer(model, args)
    start = 0
    if resume is not None:
        if args.fsdp and distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(raw_model, opt, resume["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(resume["optimizer"])
        start = resume["step"]

    corpus = stdlib_corpus()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    bar = None
    if rank == 0 and not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
        except ImportError:
            bar = None
    log = {"config": dataclasses.asdict(config), "world_size": world, "losses": [], "eval": []}
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    t0, timed_steps = None, 0
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        total = 0.0
        for micro in range(args.grad_accum):
            x, y = global_batch(corpus, step * args.grad_accum + micro, args.batch_size * world, args.seq_len,
                                args.seed)
            x = x[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
            y = y[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
            # DDP all-reduces only on the last micro-step.
            sync = (contextlib.nullcontext() if not isinstance(model, torch.nn.parallel.DistributedDataParallel)
                    or micro == args.grad_accum - 1 else model.no_sync())
            with sync, amp:
                _, loss = model(x, y)
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        if args.dump_grads:
            # FSDP gradients are sharded DTensors: gather each into the full tensor.
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu()
                     for n, p in raw_model.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save({"grads": grads, "loss": total}, args.dump_grads)
            break
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if distributed:
            t = torch.tensor([total], device=device)
            dist.all_reduce(t)
            total = t.item() / world
        log["losses"].append(total)
        if t0 is None:
            t0 = time.perf_counter()   # the first step compiles; time the rest
        else:
            timed_steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr_at(step, args):.2e}")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            raw_model.eval()
            with torch.no_grad(), amp:
                xe, ye = global_batch(corpus, step, args.batch_size, args.seq_len, args.seed, "eval")
                _, eval_loss = raw_model(xe.to(device), ye.to(device))
            raw_model.train()
            log["eval"].append((step + 1, eval_loss.item()))
            if rank == 0:
                print(f"\nstep {step + 1}: train loss {total:.4f}, eval loss {eval_loss.item():.4f}", flush=True)
        if args.save and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
            save_checkpoint(args.save, raw_model, opt, step + 1, config, args.fsdp and distributed, rank)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if timed_steps:
        log["tokens_per_s"] = tokens_per_step * timed_steps / (time.perf_counter() - t0)
        if rank == 0:
            print(f"{log['tokens_per_s']:.0f} tokens/s over {timed_steps} steps ({world} process(es), {device.type})")
    if args.sample and rank == 0:
        prompt = torch.tensor([list(b"def ")], device=device)
        out = raw_model.generate(prompt, min(args.sample, config.block_size - 4), temperature=0.8, top_k=40)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print("sample:\n" + text)
        log["sample"] = text
    if args.log_json and rank == 0:
        with open(args.log_json, "w") as f:
            json.dump(log, f, indent=1)
    if distributed:
        dist.barrier()   # every rank leaves together (a torn-down gloo peer aborts the other)
        dist.destroy_process_group()
    return log


def save_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, config: GPTConfig,
                    sharded: bool = False, rank: int = 0):
    """A plain (unsharded) checkpoint any world size can resume from. Under FSDP every rank
    takes part in gathering the full state; rank 0 writes it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, opt_state = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    else:
        model_state, opt_state = model.state_dict(), opt.state_dict()
    if rank != 0:
        return
    tmp = path + ".tmp"
    torch.save({"model": model_state, "optimizer": opt_state, "step": step, "config": dataclasses.asdict(config)}, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1:])
