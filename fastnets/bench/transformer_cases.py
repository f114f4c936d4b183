"""Transformer benchmark cases: flash attention forward / backward against SDPA's best backend
and FlashAttention-2 (flash_attn, when importable), the split-key decode path against SDPA
on a KV cache (bandwidth), rotary embedding, cross-entropy, the fused linear +
cross-entropy (time and peak memory against the unfused torch step) and a GPT-2 124M
training step (tokens/s) against transformers' GPT-2 eager and torch.compile'd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops, reference
from .harness import Case, dtype_size, peers


def _flash_attn():
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
        return flash_attn_func, flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch
        return None


def attention_cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16, head dim 128, 16 heads, 16k tokens per batch (batch = 16384 / seq), seq 1k-16k.
    FLOPs: 4 * B * H * S^2 * D forward (halved when causal), 2.5x that backward (the
    standard flash-attention accounting: 5 matmuls, the recomputed QK^T not counted)."""
    cuda = device.type == "cuda"
    if cuda:
        seqs, H, D, dtype, tokens = ([1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]), 16, 128, \
            torch.bfloat16, 16384
    else:
        seqs, H, D, dtype, tokens = [64], 2, 32, torch.float32, 128
    fa = _flash_attn() if cuda else None
    es = dtype_size(dtype)
    cases = []
    for causal in (False, True):
        for S in seqs:
            B = max(1, tokens // S)
            flops = 4 * B * H * S * S * D // (2 if causal else 1)
            io = 4 * B * H * S * D * es

            def inputs(dev, B=B, S=S):
                return tuple(torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))

            impls = {"fastnets": lambda q, k, v, c=causal: ops.flash_attention(q, k, v, causal=c),
                     "torch": lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)}   # SDPA
            if not cuda:
                impls = {"fastnets": impls["fastnets"],
                         "torch": lambda q, k, v, c=causal: reference.attention(q, k, v, causal=c)}
            if fa is not None:
                impls["flash_attn 2"] = lambda q, k, v, c=causal: fa[0](
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
            cases.append(Case("attention", "flash_attention_causal" if causal else "flash_attention",
                              f"B{B} H{H} S{S} D{D}", S, dtype, inputs, impls, io, 2 * io,
                              flops_fwd=flops, flops_bwd=int(2.5 * flops)))
    return cases


# Published FlashAttention-3 forward throughput, bf16, head dim 128, 16 heads, batch x seq =
# 16k, not causal, H100 SXM5 (pytorch/benchmark PR #2391, the FA3 paper's sizing), TFLOP/s.
# The stretch goal's denominator: fastnets' ratio to these is reported, not claimed equal.
FA3_PUBLISHED_FWD_TFLOPS = {1024: 517.1, 2048: 565.5, 4096: 590.2, 8192: 614.2, 16384: 620.7}


def published_ratios(rows: list[dict], device_name: str) -> list[str]:
    """Adds ratio_vs_published_fa3 to fastnets' non-causal forward attention rows; returns
    printable lines. The figures were published for an H100 SXM5 (80 GB HBM3): on any other
    device (H100 PCIe / NVL, H200, ...) there is nothing to compare with, and nothing is added."""
    if "H100" not in device_name or "HBM3" not in device_name:
        return []
    lines = []
    for r in rows:
        ref = FA3_PUBLISHED_FWD_TFLOPS.get(r["size"])
        if (r["op"] == "flash_attention" and r["mode"] == "fwd" and r["impl"] == "fastnets" and ref
                and r.get("tflops")):
            r["ratio_vs_published_fa3"] = r["tflops"] / ref
            lines.append(f"  {r['label']}: {r['tflops']:.0f} TFLOP/s = {r['tflops'] / ref:.2f}x published FA3 "
                         f"({ref:.0f})")
    return lines


def decode_cases(device: torch.device, quick: bool) -> list[Case]:
    """One query token per sequence against a KV cache (GQA 32:8, head dim 128, bf16): the
    bytes are the cache read once (k and v) plus q and o; the bar is >= 80% of copy bandwidth."""
    cuda = device.type == "cuda"
    if cuda:
        B, Hq, Hk, D, dtype, lens = 8, 32, 8, 128, torch.bfloat16, ([4096, 32768] if quick else [2048, 8192, 32768])
    else:
        B, Hq, Hk, D, dtype, lens = 1, 4, 2, 32, torch.float32, [256]
    fa = _flash_attn() if cuda else None
    es = dtype_size(dtype)
    cases = []
    for Sk in lens:
        nbytes = (2 * B * Hk * Sk * D + 2 * B * Hq * D) * es

        def inputs(dev, Sk=Sk):
            return (torch.randn(B, Hq, 1, D, device=dev, dtype=dtype), torch.randn(B, Hk, Sk, D, device=dev, dtype=dtype),
                    torch.randn(B, Hk, Sk, D, device=dev, dtype=dtype))

        impls = {"fastnets": lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
                 "torch": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}   # SDPA
        if not cuda:
            impls["torch"] = lambda q, k, v: reference.attention(q, k, v)
        if fa is not None:
            impls["flash_attn 2 (kvcache)"] = lambda q, k, v: fa[1](q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2)).transpose(1, 2)
        cases.append(Case("decode", "flash_decode", f"B{B} Hq{Hq} Hk{Hk} Sk{Sk}", Sk, dtype, inputs, impls, nbytes, 0,
                          modes=("fwd",), flops_fwd=4 * B * Hq * Sk * D))
    return cases


def _torch_rope(x, cos, sin):
    """The usual torch implementation (half-split, as in transformers' Llama)."""
    c = torch.cat((cos, cos), -1)[None, None].to(x.dtype)
    s = torch.cat((sin, sin), -1)[None, None].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat((-x2, x1), -1) * s


def rope_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    B, H, S, D, dtype = (8, 32, 2048, 128, torch.bfloat16) if cuda else (1, 2, 16, 32, torch.float32)
    cos, sin = reference.rope_cos_sin(S, D, device=device)
    nbytes = 2 * B * H * S * D * dtype_size(dtype) + 2 * cos.numel() * 4

    def inputs(dev):
        return (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True),)

    impls = {"fastnets": lambda x: ops.apply_rotary_emb(x, cos, sin), **peers(lambda x: _torch_rope(x, cos, sin), device)}
    return [Case("rope", "apply_rotary_emb", f"B{B} H{H} S{S} D{D}", B * H * S * D, dtype, inputs, impls, nbytes,
                 nbytes)]


def _liger_ce():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        return liger_cross_entropy
    except Exception:
        return None


def cross_entropy_cases(device: torch.device, quick: bool) -> list[Case]:
    """Logits (tokens, vocab) bf16 -> mean loss: reads the logits once forward, reads them and
    writes their gradient backward."""
    cuda = device.type == "cuda"
    N, vocabs, dtype = (8192, [50257] if quick else [32000, 50257, 128256], torch.bfloat16) if cuda else \
        (16, [1000], torch.float32)
    liger = _liger_ce() if cuda else None
    cases = []
    for V in vocabs:
        nbytes = N * V * dtype_size(dtype)

        def inputs(dev, V=V):
            return (torch.randn(N, V, device=dev, dtype=dtype, requires_grad=True),
                    torch.randint(0, V, (N,), device=dev))

        impls = {"fastnets": lambda x, t: ops.cross_entropy(x, t), **peers(lambda x, t: F.cross_entropy(x, t), device)}
        if liger is not None:
            impls["liger"] = lambda x, t: liger(x, t)
        cases.append(Case("cross_entropy", "cross_entropy", f"N{N} V{V}", V, dtype, inputs, impls, nbytes, 2 * nbytes))
    return cases


def linear_cross_entropy_cases(device: torch.device, quick: bool) -> list[Case]:
    """An LM-head step: hidden (tokens, H) @ W (V, H)^T -> cross-entropy, forward + backward,
    time and peak memory (the bar: <= 0.4x the unfused torch step's peak at equal speed)."""
    cuda = device.type == "cuda"
    if cuda:
        N, Hd, vocabs, dtype = 8192, 2048, ([50257] if quick else [50257, 128256]), torch.bfloat16
    else:
        N, Hd, vocabs, dtype = 32, 16, [300], torch.float32
    cases = []
    for V in vocabs:
        flops = 2 * N * Hd * V

        def inputs(dev, V=V):
            return (torch.randn(N, Hd, device=dev, dtype=dtype, requires_grad=True),
                    (torch.randn(V, Hd, device=dev, dtype=dtype) / Hd ** 0.5).requires_grad_(),
                    torch.randint(0, V, (N,), device=dev))

        def unfused(x, w, t):
            return F.cross_entropy(F.linear(x, w).float(), t)

        impls = {"fastnets": lambda x, w, t: ops.linear_cross_entropy(x, w, t), **peers(unfused, device)}
        cases.append(Case("lm_head", "linear_cross_entropy", f"N{N} H{Hd} V{V}", V, dtype, inputs, impls,
                          (N * Hd + V * Hd) * dtype_size(dtype), 2 * (N * Hd + V * Hd) * dtype_size(dtype), modes=("fwd_bwd",),
                          flops_fwd=flops, flops_bwd=2 * flops))
    return cases


def gpt2_cases(device: torch.device, quick: bool) -> list[Case]:
    """GPT-2 124M, one training step (forward + backward, no optimizer), bf16 autocast,
    batch 8 x 1024 tokens. Peers: transformers' GPT2LMHeadModel (SDPA attention) eager and
    torch.compile'd, with the same weights. Size = tokens; tokens/s = size / ms * 1000."""
    if device.type != "cuda":
        return []   # minutes per step under the interpreter
    from .. import models
    from ..models.gpt import to_hf_gpt2_state_dict
    B, T = (4, 1024) if quick else (8, 1024)
    ours = models.GPT(models.GPTConfig.from_name("gpt2", vocab_size=50257)).to(device)

    def step(model, hf: bool):
        def fn(idx, targets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if hf:
                    return model(input_ids=idx, labels=targets).loss
                return model(idx, targets)[1]
        return fn

    impls = {"fastnets": step(ours, False)}
    try:
        import transformers
        cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(cfg).to(device)
        hf.load_state_dict(to_hf_gpt2_state_dict(ours.state_dict()), strict=False)
        # "torch" = transformers' GPT2LMHeadModel (SDPA attention) eager; "torch.compile" = the same, compiled.
        impls["torch"] = step(hf, True)
        impls["torch.compile"] = step(torch.compile(hf), True)
    except ImportError:
        pass

    def inputs(dev):
        idx = torch.randint(0, 50257, (B, T), device=dev)
        return idx, idx.roll(-1, 1)

    flops = 6 * 124_000_000 * B * T + 12 * 12 * 768 * B * T * T   # 6 N per token + attention
    return [Case("model", "gpt2_124m_train_step", f"batch {B}x{T}", B * T, torch.bfloat16, inputs, impls,
                 B * T * 8, 0, modes=("fwd_bwd",), flops_fwd=flops // 3, flops_bwd=2 * flops // 3,
                 check_rel=0.05)]
