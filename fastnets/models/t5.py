"""T5: encoder-decoder with relative position bias on fastnets kernels, Hugging Face's module
layout (encoder.block.N.layer.0.SelfAttention.q ...), so state_dict keys match
transformers' T5ForConditionalGeneration.

Attention scores are unscaled (T5 folds the scale into the init) and carry a learned
relative position bias shared by all layers of a stack; the bias enters the flash kernels
as an additive attn_mask, whose gradient the backward kernels produce.
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
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"       # or "gated-gelu" (T5 v1.1)
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @classmethod
    def from_name(cls, name: str, **overrides) -> "T5Config":
        configs = {"t5-small": cls(), "t5-base": cls(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
                   "t5-tiny": cls(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)}
        if name not in configs:
            raise ValueError(f"T5Config.from_name: unknown config {name!r}; known: {', '.join(configs)}")
        return dataclasses.replace(configs[name], **overrides)


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucketing of key - query offsets: exact for small offsets, log-spaced up to
    max_distance; separate halves for the two directions when bidirectional."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float().clamp_min(1) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool, bidirectional: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.h, self.d = c.num_heads, c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.dropout = c.dropout_rate
        if has_bias:
            self.relative_attention_bias = nn.Embedding(self.buckets, self.h)

    def position_bias(self, q_start: int, q_len: int, k_len: int, device) -> Tensor:
        """(1, H, q_len, k_len) learned bias for queries at q_start.. and keys at 0.."""
        ctx = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        mem = torch.arange(k_len, device=device)[None, :]
        b = relative_position_bucket(mem - ctx, self.bidirectional, self.buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, kv: Optional[Tensor], bias: Optional[Tensor], causal,
                cache: Optional[dict] = None, static_kv: bool = False) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)                    # (B, H, T, D)
        if static_kv and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]                                           # encoder output, projected once
        else:
            src = x if kv is None else kv
            S = src.shape[1]
            k = self.k(src).view(B, S, self.h, self.d).transpose(1, 2)
            v = self.v(src).view(B, S, self.h, self.d).transpose(1, 2)
            if cache is not None:
                if not static_kv and "k" in cache:
                    k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
                cache["k"], cache["v"] = k, v
        y = ops.flash_attention(q, k, v, causal=causal, scale=1.0, attn_mask=bias,
                                dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.h * self.d))


class _Sub(nn.Module):
    """Pre-norm residual sub-layer: x + dropout(f(layer_norm(x)))."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.layer_norm = fnn.RMSNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)


class T5LayerSelfAttention(_Sub):
    def __init__(self, c: T5Config, has_bias: bool, bidirectional: bool):
        super().__init__(c)
        self.SelfAttention = T5Attention(c, has_bias, bidirectional)

    def forward(self, x, bias, causal, cache=None):
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), None, bias, causal, cache))


class T5LayerCrossAttention(_Sub):
    def __init__(self, c: T5Config):
        super().__init__(c)
        self.EncDecAttention = T5Attention(c, False, True)

    def forward(self, x, memory, mask, cache=None):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), memory, mask, False, cache, static_kv=True))


class T5DenseActDense(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.gated = c.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            # [gate | up] in one tensor so bias_act's geglu applies gelu_tanh(gate) * up in one pass.
            h = ops.bias_act(torch.cat((self.wi_0(x), self.wi_1(x)), -1), None, "geglu_tanh")
        else:
            h = ops.bias_act(self.wi(x), None, "relu")
        return self.wo(self.dropout(h))


class T5LayerFF(_Sub):
    def __init__(self, c: T5Config):
        super().__init__(c)
        self.DenseReluDense = T5DenseActDense(c)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers = [T5LayerSelfAttention(c, has_bias, not is_decoder)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(c))
        layers.append(T5LayerFF(c))
        self.layer = nn.ModuleList(layers)

    def forward(self, x, bias, causal, memory=None, memory_mask=None, cache=None):
        x = self.layer[0](x, bias, causal, cache["self"] if cache else None)
        if self.is_decoder:
            x = self.layer[1](x, memory, memory_mask, cache["cross"] if cache else None)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    def __init__(self, c: T5Config, embed: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.embed_tokens = embed
        self.is_decoder = is_decoder
        n = (c.num_decoder_layers or c.num_layers) if is_decoder else c.num_layers
        self.block = nn.ModuleList([T5Block(c, i == 0, is_decoder) for i in range(n)])
        self.final_layer_norm = fnn.RMSNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, ids: Tensor, keep: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                memory_keep: Optional[Tensor] = None, cache: Optional[list] = None, start: int = 0) -> Tensor:
        """keep / memory_keep: (B, S) bool, True = real token."""
        B, T = ids.shape
        x = self.dropout(self.embed_tokens(ids))
        k_len = start + T
        bias = self.block[0].layer[0].SelfAttention.position_bias(start, T, k_len, ids.device)   # (1, H, T, k_len)
        if keep is not None:
            bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
        mem_mask = memory_keep[:, None, None, :] if memory_keep is not None else None
        causal = "bottom_right" if self.is_decoder else False
        for i, blk in enumerate(self.block):
            x = blk(x, bias, causal, memory, mem_mask, cache[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(x))


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, False)
        self.decoder = T5Stack(config, self.shared, True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self._init()

    def _init(self):
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        for name, m in self.named_modules():
            if isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
                for lin in (m.k, m.v):
                    nn.init.normal_(lin.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    nn.init.normal_(m.relative_attention_bias.weight, std=c.d_model ** -0.5)
            elif isinstance(m, T5DenseActDense):
                for lin in ([m.wi_0, m.wi_1] if m.gated else [m.wi]):
                    nn.init.normal_(lin.weight, std=c.d_model ** -0.5)
                nn.init.normal_(m.wo.weight, std=c.d_ff ** -0.5)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=1.0)

    def _head_input(self, h: Tensor) -> Tensor:
        # Tied embeddings: T5 rescales the decoder output before the shared projection.
        return h * self.config.d_model ** -0.5 if self.config.tie_word_embeddings else h

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat((start, labels[:, :-1]), 1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """(logits (B, T, vocab) or None when labels are given, loss or None). labels (B, T)
        with -100 = ignore; decoder_input_ids default to labels shifted right."""
        keep = attention_mask.bool() if attention_mask is not None else None
        memory = self.encoder(input_ids, keep)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5: pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        h = self._head_input(self.decoder(decoder_input_ids, None, memory, keep))
        if labels is not None:
            return None, ops.linear_cross_entropy(h, self.lm_head.weight, labels)
        return self.lm_head(h), None

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 20,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Decode up to max_new_tokens after decoder_start_token_id (greedy by default);
        rows stop at eos_token_id. Returns (B, 1 + generated) decoder ids."""
        keep = attention_mask.bool() if attention_mask is not None else None
        memory = self.encoder(input_ids, keep)
        B = input_ids.shape[0]
        out = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        cache = [{"self": {}, "cross": {}} for _ in self.decoder.block] if use_cache else None
        done = torch.zeros(B, 1, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            ids = out[:, -1:] if use_cache else out
            h = self.decoder(ids, None, memory, keep, cache, start=step if use_cache else 0)
            logits = self.lm_head(self._head_input(h[:, -1]))
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, self.config.pad_token_id), nxt)
            done |= nxt == self.config.eos_token_id
            out = torch.cat((out, nxt), 1)
            if bool(done.all()):
                break
        return out
