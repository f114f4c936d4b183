"""Train CLIP (fastnets.models.CLIPModel: transformers' CLIPModel layout on fastnets kernels)
on image-caption pairs made locally: coloured shapes and digits at five positions, captioned
"a red circle on the left" (fastnets.datasets.shape_captions; no download), with a byte-level
BPE tokenizer trained on the captions (fastnets.text; no download). The loss is fastnets'
tiled clip_loss (CLIP's softmax, or SigLIP's sigmoid with --loss sigmoid): the batch x batch
logits are never formed. Every epoch prints the zero-shot accuracy on held-out images, the
class embeddings built open_clip style from caption templates (shape: 14 classes, colour: 6,
position: 5).

    python examples/train_clip.py                        # default device
    python examples/train_clip.py --loss sigmoid         # SigLIP
    python examples/train_clip.py --save clip.pt --epochs 4
    python examples/train_clip.py --resume clip.pt --epochs 8    # continue that run

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set below):
correct but slow, so keep --width, --layers, --train-size and --epochs small there.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnets  # noqa: E402
from fastnets.datasets import CAPTION_COLORS, CAPTION_POSITIONS, CAPTION_SHAPES, caption, shape_captions  # noqa: E402
from fastnets.models import CLIPConfig, CLIPModel, zero_shot_logits  # noqa: E402
from fastnets.models.clip import CLIPTextConfig, CLIPVisionConfig  # noqa: E402
from fastnets.text import ByteBPETokenizer  # noqa: E402

CONTEXT = 16


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--patch", type=int, default=8, help="ViT patch size")
    p.add_argument("--width", type=int, default=128, help="hidden size of both towers")
    p.add_argument("--layers", type=int, default=4, help="blocks per tower")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--embed", type=int, default=64, help="projection (joint embedding) dim")
    p.add_argument("--vocab", type=int, default=320, help="tokenizer vocabulary (bytes + merges + 3 specials)")
    p.add_argument("--loss", choices=["softmax", "sigmoid"], default="softmax", help="CLIP or SigLIP")
    p.add_argument("--train-size", type=int, default=8192, help="image-caption pairs per epoch (fixed set)")
    p.add_argument("--eval-size", type=int, default=1024, help="held-out images for the zero-shot accuracy")
    p.add_argument("--templates", type=int, default=0,
                   help="caption templates per zero-shot class, evenly spread (0: all of them)")
    p.add_argument("--epochs", type=int, default=12, help="epochs in total (including resumed ones)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N steps (0: the whole set)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--save", help="checkpoint path, written after every epoch")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, epoch, config, tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args, tok: ByteBPETokenizer) -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=args.width, intermediate_size=4 * args.width,
                          projection_dim=args.embed, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          max_position_embeddings=CONTEXT, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.sot_token_id, eos_token_id=tok.eot_token_id)
    vision = CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width, projection_dim=args.embed,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads, image_size=args.size,
                              patch_size=args.patch)
    return CLIPConfig(text, vision, projection_dim=args.embed, loss=args.loss)


def zero_shot_tasks(limit: int = 0):
    """{task: (class names, templates, attribute key)}: every class name in every caption the
    other two attributes allow (or `limit` of them, evenly spread), averaged into one class
    embedding (open_clip's ensembling)."""
    colors = list(CAPTION_COLORS)
    tasks = {
        "shape": (CAPTION_SHAPES, [lambda s, c=c, p=p: caption(c, s, p) for c in colors for p in CAPTION_POSITIONS],
                  "shape"),
        "color": (colors, [lambda c, s=s, p=p: caption(c, s, p) for s in CAPTION_SHAPES for p in CAPTION_POSITIONS],
                  "color"),
        "position": (CAPTION_POSITIONS, [lambda p, c=c, s=s: caption(c, s, p) for c in colors for s in CAPTION_SHAPES],
                     "position"),
    }
    if limit:
        tasks = {k: (names, temps[::max(1, len(temps) // limit)][:limit], key) for k, (names, temps, key) in tasks.items()}
    return tasks


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tok: ByteBPETokenizer, images: torch.Tensor, attrs: dict,
                       templates: int = 0) -> dict:
    model.eval()
    feats = torch.cat([model.encode_image(images[i:i + 256], normalize=True) for i in range(0, len(images), 256)])
    acc = {}
    for task, (names, temps, key) in zero_shot_tasks(templates).items():
        classifier = model.zero_shot_classifier(names, temps, lambda texts: tok(texts, CONTEXT))
        _, _, top = zero_shot_logits(feats, classifier, model.logit_scale.exp(), normalize=False)
        acc[task] = (top[:, 0].cpu() == attrs[key]).float().mean().item()
    model.train()
    return acc


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    resume = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    images, captions, _ = shape_captions(args.train_size, args.size, seed=args.seed)
    held_images, _, held_attrs = shape_captions(args.eval_size, args.size, seed=args.seed + 10_000)
    if resume:
        tok = ByteBPETokenizer.from_dict(resume["tokenizer"])
        config = CLIPConfig(**resume["config"])
    else:
        # Trained on every caption the set's grammar can produce (420), whatever --train-size is.
        corpus = [caption(c, s, p) for c in CAPTION_COLORS for s in CAPTION_SHAPES for p in CAPTION_POSITIONS]
        tok = ByteBPETokenizer.train(corpus, vocab_size=args.vocab)
        config = build_config(args, tok)
    longest = max(len(tok.encode(c)) for c in set(captions))
    if longest + 2 > CONTEXT:
        raise SystemExit(f"the longest caption takes {longest} tokens with this tokenizer (vocab {tok.vocab_size}); "
                         f"the context holds {CONTEXT - 2}: raise --vocab")
    ids, mask = tok(captions, CONTEXT)
    model = CLIPModel(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start = resume["epoch"]
    images, ids, mask, held_images = images.to(device), ids.to(device), mask.to(device), held_images.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP ({config.loss} loss) {n_params / 1e6:.2f}M params, {len(images)} pairs {tuple(images.shape[1:])}, "
          f"vocab {tok.vocab_size}, batch {args.batch_size}, device {device}, "
          f"backend {fastnets._dispatch.explain('clip_loss', device)[0]}")
    amp = args.amp and device.type == "cuda"
    steps_per_epoch = len(images) // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    if steps_per_epoch < 1:
        raise SystemExit(f"--train-size {args.train_size} is smaller than one batch ({args.batch_size})")
    history, seen, timed, chance = [], 0, 0.0, {k: 1 / len(v[0]) for k, v in zero_shot_tasks().items()}
    for epoch in range(start, args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(images), generator=gen).to(device)
        bar = None
        if not args.no_progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
            except ImportError:
                pass
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(input_ids=ids[idx], pixel_values=images[idx], attention_mask=mask[idx], return_loss=True,
                            return_logits=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            with torch.no_grad():   # CLIP clamps the learned temperature at 100
                model.logit_scale.clamp_(0, 4.6052)
            losses.append(out.loss.item())
            if epoch > start or step > 0:     # the first step compiles / tunes kernels: not timed
                timed += time.perf_counter() - t0
                seen += len(idx)
            if bar is not None:
                bar.update(1)
                if step % 5 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if bar is not None:
            bar.close()
        acc = zero_shot_accuracy(model, tok, held_images, held_attrs, args.templates)
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), **acc})
        print(f"epoch {epoch + 1}: loss {history[-1]['loss']:.3f}; zero-shot accuracy on {len(held_images)} held-out "
              f"images: " + ", ".join(f"{k} {v:.1%} (chance {chance[k]:.1%})" for k, v in acc.items()))
        if args.save:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "config": dataclasses.asdict(config), "tokenizer": tok.to_dict()}, args.save)
    rate = seen / timed if timed > 0 else 0.0
    print(f"{rate:.1f} image-text pairs/s ({device.type})" + (f"; saved {args.save}" if args.save else ""))
    return {"history": history, "epochs": args.epochs, "pairs_per_s": rate, "chance": chance}


if __name__ == "__main__":
    main()
