"""GPT: a decoder-only transformer on fastnets kernels (nanoGPT's layout and naming).

Learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU MLPs, multi-query /
grouped-query attention, a KV cache for generation, and training through the fused
linear + cross-entropy (the (tokens, vocab) logits are never materialised).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops
from .sampling import sample_next


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50304          # GPT-2's 50257 padded to a multiple of 64
    block_size: int = 1024           # longest sequence (positions)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None = n_head; fewer = GQA, 1 = MQA
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    position: str = "learned"        # "learned" (GPT-2) or "rope"
    rope_base: float = 10000.0
    norm: str = "layernorm"          # or "rmsnorm"
    mlp: str = "gelu"                # "gelu" (tanh approximation, GPT-2) or "swiglu"
    mlp_ratio: float = 4.0
    tie_weights: bool = True

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        if name not in GPT_CONFIGS:
            raise ValueError(f"GPTConfig.from_name: unknown config {name!r}; known: {', '.join(GPT_CONFIGS)}")
        return dataclasses.replace(GPT_CONFIGS[name], **overrides)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({kv})")
        for field, allowed in (("position", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                               ("mlp", ("gelu", "swiglu"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig: {field} must be one of {allowed}, got {getattr(self, field)!r}")


GPT_CONFIGS = {
    "gpt2": GPTConfig(),                                                    # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),           # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),            # 774M
    "llama-tiny": GPTConfig(vocab_size=32000, block_size=2048, n_layer=4, n_head=8, n_kv_head=2, n_embd=512,
                            bias=False, position="rope", norm="rmsnorm", mlp="swiglu", mlp_ratio=8 / 3,
                            tie_weights=False),
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=64),
}


class KVCache:
    """Per-layer key/value buffers (B, n_kv_head, max_len, head_dim), filled left to right."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        kv, hd = config.n_kv_head or config.n_head, config.n_embd // config.n_head
        self.k = [torch.zeros(batch, kv, max_len, hd, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(batch, kv, max_len, hd, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.max_len = max_len


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return fnn.RMSNorm(config.n_embd, eps=1e-5)
    return fnn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]], cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        B, T, C = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)                                                   # (B, T, (H + 2 KV) D)
        q, k, v = qkv.split((H * D, KV * D, KV * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)   # (B, T, heads, D): "bshd"
        start = cache.length if cache is not None else 0
        if rope is not None:
            q, k = ops.rope(q, k, *rope, seqlen_offset=start, layout="bshd")
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k.transpose(1, 2)
            cache.v[layer][:, :, start:start + T] = v.transpose(1, 2)
            k = cache.k[layer][:, :, :start + T]
            v = cache.v[layer][:, :, :start + T]
            # New queries sit at the end of the cache: bottom-right causal alignment; a single
            # query takes the split-key decode kernels.
            y = ops.flash_attention(q.transpose(1, 2), k, v, causal="bottom_right").transpose(1, 2)
        else:
            y = ops.flash_attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0,
                                    layout="bshd")
        y = y.reshape(B, T, C)                                                 # (B, T, H, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.n_embd)
        if config.mlp == "swiglu":
            hidden = 64 * math.ceil(hidden / 64)
        self.kind = config.mlp
        # SwiGLU: one GEMM produces [gate | up]; bias_act splits it and applies silu(gate) * up.
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if config.mlp == "swiglu" else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.linear(x, self.c_fc.weight)
        h = ops.bias_act(h, self.c_fc.bias, "swiglu" if self.kind == "swiglu" else "gelu_tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope=None, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=_norm(config)))
        if config.position == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = ops.rope_cos_sin(config.block_size, config.n_embd // config.n_head, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """idx (B, T) token ids -> final hidden states (B, T, n_embd)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"GPT: sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)                                               # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                ignore_index: int = -100):
        """(logits, loss). With targets (B, T), loss is the mean next-token cross-entropy from
        the fused linear + cross-entropy and logits is None (never materialised); without,
        logits (B, T, vocab) and loss None."""
        x = self.hidden_states(idx, cache)
        if targets is not None:
            loss = ops.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=ignore_index)
            return None, loss
        return self.lm_head(x), None

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue idx (B, T) by max_new_tokens tokens. With use_cache, the prompt is run once
        and each new token attends to a KV cache (the decode kernels); without, the whole
        sequence is re-run each step (the reference behaviour). temperature 0 = greedy.
        Rows that emit eos_token_id keep emitting it."""
        if idx.dim() != 2:
            raise ValueError(f"GPT.generate: idx must be (batch, tokens), got shape {tuple(idx.shape)}")
        total = idx.shape[1] + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"GPT.generate: {total} tokens exceed block_size {self.config.block_size}")
        param = next(self.parameters())
        cache = KVCache(self.config, idx.shape[0], total, idx.device, param.dtype) if use_cache else None
        done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        step_in = idx
        for _ in range(max_new_tokens):
            x = self.hidden_states(step_in if use_cache else idx, cache)
            logits = self.lm_head(x[:, -1])                                     # (B, vocab)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            idx = torch.cat((idx, nxt), dim=1)
            step_in = nxt
        return idx


# Hugging Face's GPT-2 stores these projections as Conv1D, i.e. (in, out) weights.
_HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_hf_gpt2_state_dict(state_dict: dict) -> dict:
    """A transformers GPT2LMHeadModel / GPT2Model state_dict (e.g. read from a local
    checkpoint) in GPT's layout: Conv1D weights transposed, attention mask buffers dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        key = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        out[key] = value.t() if key.endswith(_HF_CONV1D) else value
    return out


def to_hf_gpt2_state_dict(state_dict: dict) -> dict:
    """GPT's state_dict in transformers' GPT2LMHeadModel layout (the inverse of the above)."""
    return {k: (v.t() if k.endswith(_HF_CONV1D) else v) for k, v in state_dict.items()}
