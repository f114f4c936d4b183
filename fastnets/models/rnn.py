"""Recurrent models on fastnets.nn's LSTM / GRU: a character-level language model with
sampling (temperature, top-k) and a sequence classifier (embedding -> bidirectional LSTM ->
pooled over each sequence's valid steps -> linear).

`use_torch=True` builds the same models on torch.nn's classes (identical parameters and
state_dict keys): the baseline the benchmarks and the example compare against."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
from torch import nn

from .. import nn as fnn
from .. import ops


def _rnn_class(cell: str, use_torch: bool) -> type:
    cell = cell.lower()
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
    return {("lstm", False): fnn.LSTM, ("gru", False): fnn.GRU, ("lstm", True): nn.LSTM,
            ("gru", True): nn.GRU}[(cell, use_torch)]


class CharVocab:
    """Characters <-> ids, built from a text (sorted, so the same text gives the same ids)."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(text)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"text holds characters outside the vocabulary: {unknown[:10]}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def python_text(max_chars: int = 1_000_000) -> str:
    """Text that ships with every Python: the source of a few standard-library modules
    (prose-heavy docstrings and code). No download."""
    import argparse
    import difflib
    import textwrap
    return "\n".join(inspect.getsource(m) for m in (textwrap, difflib, argparse, inspect))[:max_chars]


@dataclasses.dataclass
class CharLMConfig:
    vocab_size: int
    embed: int = 64
    hidden: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    cell: str = "lstm"
    proj_size: int = 0


class CharLM(nn.Module):
    """Embedding -> multi-layer LSTM / GRU -> linear head over the characters."""

    def __init__(self, config: CharLMConfig, use_torch: bool = False):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed)
        kw = {"proj_size": config.proj_size} if config.proj_size else {}
        if config.proj_size and config.cell.lower() != "lstm":
            raise ValueError("proj_size needs cell='lstm'")
        self.rnn = _rnn_class(config.cell, use_torch)(config.embed, config.hidden, config.num_layers,
                                                     dropout=config.dropout if config.num_layers > 1 else 0.0,
                                                     batch_first=True, **kw)
        self.head = nn.Linear(config.proj_size or config.hidden, config.vocab_size)

    def forward(self, idx: torch.Tensor, state=None, targets: Optional[torch.Tensor] = None):
        """idx: (B, T) ids. Returns (logits (B, T, V), state, loss or None)."""
        out, state = self.rnn(self.embed(idx), state)
        logits = self.head(out)
        loss = None
        if targets is not None:
            loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, state, loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """prompt: (B, T0) ids. Feeds the prompt once, then one step at a time carrying the
        recurrent state (the decode path: T = 1 per call). temperature 0 is greedy."""
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, steps >= 1) ids, got shape {tuple(prompt.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        logits, state, _ = self(prompt)
        out = [prompt]
        nxt = None
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            out.append(nxt)
            logits, state, _ = self(nxt, state)
        self.train(was_training)
        return torch.cat(out, 1)


class SequenceClassifier(nn.Module):
    """Embedding -> bidirectional LSTM -> mean over each sequence's valid steps -> linear.
    lengths (B,) lets padded batches of any length order run without packing."""

    def __init__(self, vocab_size: int, num_classes: int, embed: int = 64, hidden: int = 128, num_layers: int = 1,
                 dropout: float = 0.0, padding_idx: int = 0, use_torch: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=padding_idx)
        self.use_torch = use_torch
        self.rnn = _rnn_class("lstm", use_torch)(embed, hidden, num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                                 batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(tokens)
        B, T = tokens.shape
        if lengths is None:
            out, _ = self.rnn(x)
            pooled = out.mean(1)
        else:
            lengths = torch.as_tensor(lengths)
            if self.use_torch:
                packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                                 enforce_sorted=False)
                out, _ = self.rnn(packed)
                out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
            else:
                out, _ = self.rnn(x, lengths=lengths)
            pooled = out.sum(1) / lengths.to(out.device, out.dtype).unsqueeze(1)
        return self.classifier(pooled)
