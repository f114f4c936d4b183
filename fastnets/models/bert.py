"""BERT: a bidirectional encoder on fastnets kernels, with the Hugging Face module layout
(bert.embeddings / bert.encoder.layer.N.attention.self.query ...), so state_dict keys match
transformers' BertModel / BertForMaskedLM / BertForSequenceClassification."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    num_labels: int = 2
    pad_token_id: int = 0

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BertConfig":
        configs = {"bert-base": cls(), "bert-large": cls(hidden_size=1024, num_hidden_layers=24,
                                                         num_attention_heads=16, intermediate_size=4096),
                   "bert-tiny": cls(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=512)}
        if name not in configs:
            raise ValueError(f"BertConfig.from_name: unknown config {name!r}; known: {', '.join(configs)}")
        return dataclasses.replace(configs[name], **overrides)


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        S = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(torch.arange(S, device=input_ids.device))
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings(tt)))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_probs_dropout_prob

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        B, S, E = x.shape
        split = lambda t: t.view(B, S, self.heads, E // self.heads)  # noqa: E731  (B, S, H, D): bshd views
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        mask = keep[:, None, None, :] if keep is not None else None            # (B, 1, 1, S) True = attend
        y = ops.flash_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
                                layout="bshd")
        return y.reshape(B, S, E)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig, inner: int):
        super().__init__()
        self.dense = nn.Linear(inner, c.hidden_size)
        self.LayerNorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return ops.bias_act(F.linear(x, self.dense.weight), self.dense.bias, "gelu")


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        for layer in self.layer:
            x = layer(x, keep)
        return x


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(_init_weights)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """input_ids (B, S); attention_mask (B, S), 1 = real token, 0 = padding.
        Returns (sequence output (B, S, hidden), pooled [CLS] output (B, hidden) or None)."""
        keep = attention_mask.bool() if attention_mask is not None else None
        x = self.encoder(self.embeddings(input_ids, token_type_ids), keep)
        return x, (self.pooler(x) if self.pooler is not None else None)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class BertLMPredictionHead(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.transform.LayerNorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)

    def transformed(self, x: Tensor) -> Tensor:
        d = self.transform.dense
        return self.transform.LayerNorm(ops.bias_act(F.linear(x, d.weight), d.bias, "gelu"))


class BertForMaskedLM(nn.Module):
    """Masked-LM head tied to the word embeddings. With labels (B, S) (-100 = not masked),
    the loss comes from the fused linear + cross-entropy over the masked positions only."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        _init_weights(self.cls.predictions.transform.dense)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """(logits (B, S, vocab) or None when labels are given, loss or None)."""
        x, _ = self.bert(input_ids, attention_mask, token_type_ids)
        head = self.cls.predictions
        if labels is not None:
            picked = labels != -100                      # only masked positions reach the vocab GEMM
            h = head.transformed(x[picked])
            loss = ops.linear_cross_entropy(h, head.decoder.weight, labels[picked], head.decoder.bias)
            return None, loss
        return head.decoder(head.transformed(x)), None


class BertForSequenceClassification(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """(logits (B, num_labels), loss or None)."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(pooled))
        loss = ops.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss
