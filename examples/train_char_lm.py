"""Train a character-level LSTM (or GRU) language model on fastnets' recurrent kernels, on
text that ships with Python (standard-library sources; no download) or a file you name.
Progress bar, tokens/s, checkpoint save / resume, and samples (temperature, top-k).

    python examples/train_char_lm.py                                  # LSTM, default device
    python examples/train_char_lm.py --cell gru --hidden 512 --amp
    python examples/train_char_lm.py --save lm.pt --steps 500
    python examples/train_char_lm.py --resume lm.pt --steps 1000      # continue that run
    python examples/train_char_lm.py --baseline torch                 # the same model on torch.nn.LSTM

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep the model and --steps small there.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnets  # noqa: E402
from fastnets.models import CharLM, CharLMConfig, CharVocab, python_text  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", help="a UTF-8 text file to train on (default: Python standard-library sources)")
    p.add_argument("--max-chars", type=int, default=1_000_000)
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--proj-size", type=int, default=0, help="LSTM projection size (0: none)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in total (including resumed ones)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--baseline", choices=("fastnets", "torch"), default="fastnets",
                   help="torch: the same model on torch.nn.LSTM / GRU (cuDNN), to compare tokens/s")
    p.add_argument("--save", help="checkpoint path, written at the end")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, step, config, vocabulary)")
    p.add_argument("--sample", type=int, default=200, help="characters to sample at the end (0: none)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def batches(data: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """Random windows of seq_len + 1 characters: inputs and next-character targets."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"the text has {data.numel()} characters; --seq-len {seq_len} needs more")
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()[:args.max_chars]
    else:
        text = python_text(args.max_chars)
    vocab = CharVocab(resume["vocab"]) if resume else CharVocab.from_text(text)
    text = "".join(c for c in text if c in vocab.index)
    data = vocab.encode(text)
    if resume:
        config = CharLMConfig(**resume["config"])
    else:
        config = CharLMConfig(vocab_size=len(vocab), embed=args.embed, hidden=args.hidden, num_layers=args.layers,
                              dropout=args.dropout, cell=args.cell, proj_size=args.proj_size)
    model = CharLM(config, use_torch=args.baseline == "torch").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start = resume["step"]
    step_fn = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed + start)
    stream = batches(data, args.seq_len, args.batch_size, gen)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
        except ImportError:
            pass
    amp = args.amp and device.type == "cuda"
    tokens, timed, t0, loss = 0, 0, None, torch.tensor(float("nan"))
    model.train()
    for step in range(start, args.steps):
        x, y = (t.to(device, non_blocking=True) for t in next(stream))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, _, loss = step_fn(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == start:   # the first step compiles / tunes: not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            tokens += x.numel()
            timed += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    if bar is not None:
        bar.close()
    tokens_per_s = tokens / elapsed if elapsed > 0 and tokens else 0.0
    print(f"{args.baseline} {config.cell.upper()}: loss {loss.item():.3f} after {args.steps} steps; "
          f"{tokens_per_s:.0f} tokens/s over {timed} timed steps ({device.type})")
    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps,
                    "config": vars(config), "vocab": vocab.chars}, args.save)
        print(f"saved {args.save}")
    sample = ""
    if args.sample:
        prompt = "".join(c for c in args.prompt if c in vocab.index) or vocab.chars[0]
        ids = model.generate(vocab.encode(prompt)[None].to(device), args.sample, temperature=args.temperature,
                             top_k=args.top_k, generator=torch.Generator(device).manual_seed(args.seed))
        sample = vocab.decode(ids[0].tolist())
        print("--- sample ---\n" + sample + "\n--------------")
    print("backends:", sorted({f"{op}:{b}" for (op, b) in fastnets._dispatch.calls if op in ("rnn", "cross_entropy")}))
    return {"loss": loss.item(), "tokens_per_s": tokens_per_s, "steps": args.steps, "sample": sample}


if __name__ == "__main__":
    main()
