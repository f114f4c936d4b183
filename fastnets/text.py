"""A byte-level BPE tokenizer that needs no download: trained in a second on whatever text
you give it (the examples train it on their own captions), saved as JSON beside a checkpoint.

    tok = ByteBPETokenizer.train(captions, vocab_size=320)
    ids, mask = tok(["a red circle on the left"], context_length=16)   # <sot> ... <eot> <pad>...
    tok.decode(ids[0])                                                  # 'a red circle on the left'

Ids: the 256 bytes, then one id per learned merge, then <pad>, <sot>, <eot> (so <eot> is the
highest id, and CLIP's end-of-text pooling finds it under either of transformers' rules).
Words are split GPT-2 style (a word carries its leading space), lower-cased like CLIP's.
"""
from __future__ import annotations

import collections
import json
import os
import re

import torch

_WORD = re.compile(r"\s?[^\s]+")


class ByteBPETokenizer:
    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        # id -> bytes, for decoding
        self.pieces = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self.pad_token_id = len(self.pieces)
        self.sot_token_id = self.pad_token_id + 1
        self.eot_token_id = self.pad_token_id + 2
        self.vocab_size = self.pad_token_id + 3
        self._cache: dict = {}

    # --- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, corpus, vocab_size: int = 512) -> "ByteBPETokenizer":
        """Learn merges (most frequent adjacent pair first, ties by first occurrence) until
        the vocabulary, specials included, has vocab_size entries or no pair repeats."""
        if vocab_size < 259:
            raise ValueError(f"ByteBPETokenizer.train: vocab_size must be >= 259 (256 bytes + 3 specials), got "
                             f"{vocab_size}")
        words = collections.Counter(w for text in corpus for w in _WORD.findall(text.lower()))
        seqs = {w: list(w.encode("utf-8")) for w in words}
        merges: list[tuple[int, int]] = []
        while 256 + len(merges) + 3 < vocab_size:
            counts: collections.Counter = collections.Counter()
            for w, n in words.items():
                s = seqs[w]
                for pair in zip(s, s[1:]):
                    counts[pair] += n
            if not counts:
                break
            pair, n = max(counts.items(), key=lambda kv: kv[1])
            if n < 2:
                break
            new = 256 + len(merges)
            merges.append(pair)
            for w in words:
                seqs[w] = _merge(seqs[w], pair, new)
        return cls(merges)

    # --- encoding -----------------------------------------------------------------------------
    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        s = list(word.encode("utf-8"))
        while len(s) > 1:
            pair = min(zip(s, s[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            s = _merge(s, pair, 256 + self.ranks[pair])
        self._cache[word] = s
        return s

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the specials."""
        return [t for w in _WORD.findall(text.lower()) for t in self._encode_word(w)]

    def decode(self, ids) -> str:
        """Text of ids (a list or tensor); specials are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return b"".join(self.pieces[i] for i in ids if i < self.pad_token_id).decode("utf-8", "replace").strip()

    def __call__(self, texts, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, context_length) int64, attention mask (B, context_length) int64):
        <sot> tokens <eot>, padded with <pad>; longer texts are cut and keep their <eot>."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (<sot> and <eot>), got {context_length}")
        ids = torch.full((len(texts), context_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), context_length), dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [self.sot_token_id] + self.encode(text)[:context_length - 2] + [self.eot_token_id]
            ids[i, :len(toks)] = torch.tensor(toks)
            mask[i, :len(toks)] = 1
        return ids, mask

    # --- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "byte_bpe", "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> "ByteBPETokenizer":
        if d.get("type") != "byte_bpe":
            raise ValueError(f"not a ByteBPETokenizer dict (type {d.get('type')!r})")
        return cls([tuple(m) for m in d["merges"]])

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ByteBPETokenizer":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _merge(seq: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out
