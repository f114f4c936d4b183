"""An image-text fusion model on fastnets kernels: CLIP's two towers, then fusion blocks in
which the text tokens attend to the image tokens (cross-attention: queries and keys of
different lengths on fastnets' flash attention), and a classification head. For image-text
matching (num_labels=2: does the caption describe the image?) and VQA-style answer
classification (num_labels = the answer vocabulary).

    model = ImageTextFusionModel(FusionConfig(clip=CLIPConfig.from_name("tiny"), num_labels=2))
    model = ImageTextFusionModel.from_clip(trained_clip, num_labels=2)    # towers from a CLIP
    logits, loss = model(input_ids, pixel_values, attention_mask, labels)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops
from .clip import CLIPConfig, CLIPMLP, CLIPModel, CLIPTextModel, CLIPVisionModel, as_clip_config


@dataclasses.dataclass
class FusionConfig:
    clip: CLIPConfig = dataclasses.field(default_factory=lambda: CLIPConfig.from_name("tiny"))
    num_labels: int = 2
    num_fusion_layers: int = 2
    num_attention_heads: int = 4
    dropout: float = 0.1

    def __post_init__(self):
        self.clip = as_clip_config(self.clip)
        if self.num_labels < 1 or self.num_fusion_layers < 1:
            raise ValueError(f"FusionConfig: num_labels and num_fusion_layers must be >= 1, got {self.num_labels} "
                             f"and {self.num_fusion_layers}")


class CrossAttention(nn.Module):
    """Queries from x (B, Lq, E), keys and values from context (B, Lk, Ec); context positions
    with keep False (padding) are not attended to."""

    def __init__(self, hidden: int, context: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"CrossAttention: hidden size {hidden} must be divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(context, hidden)
        self.v_proj = nn.Linear(context, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, context: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        B, Lq, E = x.shape
        Lk, H = context.shape[1], self.heads
        q = self.q_proj(x).view(B, Lq, H, E // H)
        k = self.k_proj(context).view(B, Lk, H, E // H)
        v = self.v_proj(context).view(B, Lk, H, E // H)
        mask = keep[:, None, None, :].bool() if keep is not None else None
        y = ops.flash_attention(q, k, v, attn_mask=mask, layout="bshd")
        return self.out_proj(y.reshape(B, Lq, E))


class FusionLayer(nn.Module):
    """Pre-norm: text self-attention (padding masked), cross-attention to the image, MLP."""

    def __init__(self, hidden: int, context: int, heads: int, eps: float, act: str, dropout: float):
        super().__init__()
        self.norm_self = fnn.LayerNorm(hidden, eps=eps)
        self.self_attn = CrossAttention(hidden, hidden, heads)
        self.norm_cross = fnn.LayerNorm(hidden, eps=eps)
        self.cross_attn = CrossAttention(hidden, context, heads)
        self.norm_mlp = fnn.LayerNorm(hidden, eps=eps)
        self.mlp = CLIPMLP(hidden, 4 * hidden, act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, image: Tensor, keep: Optional[Tensor]) -> Tensor:
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, keep))
        x = x + self.dropout(self.cross_attn(self.norm_cross(x), image))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class ImageTextFusionModel(nn.Module):
    def __init__(self, config: Optional[FusionConfig] = None):
        super().__init__()
        c = config or FusionConfig()
        self.config = c
        tc, vc = c.clip.text_config, c.clip.vision_config
        self.text_model = CLIPTextModel(tc)
        self.vision_model = CLIPVisionModel(vc)
        self.fusion = nn.ModuleList(FusionLayer(tc.hidden_size, vc.hidden_size, c.num_attention_heads,
                                                tc.layer_norm_eps, tc.hidden_act, c.dropout)
                                    for _ in range(c.num_fusion_layers))
        self.norm = fnn.LayerNorm(tc.hidden_size, eps=tc.layer_norm_eps)
        self.classifier = nn.Linear(tc.hidden_size, c.num_labels)
        for m in self.fusion.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_clip(cls, clip: CLIPModel, num_labels: int, **overrides) -> "ImageTextFusionModel":
        """A fusion model whose towers start from a (trained) CLIPModel's."""
        model = cls(FusionConfig(clip=clip.config, num_labels=num_labels, **overrides))
        model.text_model.load_state_dict(clip.text_model.state_dict())
        model.vision_model.load_state_dict(clip.vision_model.state_dict())
        return model.to(next(clip.parameters()).device)

    def forward(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """(logits (B, num_labels), cross-entropy loss or None). The text's fused state at its
        end-of-text token (the CLIP text tower's pooling position) feeds the head."""
        text, _ = self.text_model(input_ids, attention_mask)
        image, _ = self.vision_model(pixel_values)
        keep = attention_mask.bool() if attention_mask is not None else None
        x = text
        for layer in self.fusion:
            x = layer(x, image, keep)
        x = self.norm(x)
        eos = self.text_model.config.eos_token_id
        at = (input_ids.to(torch.int).argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1))
        pooled = x[torch.arange(x.shape[0], device=x.device), at]
        logits = self.classifier(pooled)
        loss = ops.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss


def matching_batch(input_ids: Tensor, attention_mask: Tensor, generator: Optional[torch.Generator] = None):
    """Image-text matching pairs from a batch of matched ones: each image keeps its caption
    (label 1) or gets another image's (label 0), half and half. Returns (ids, mask, labels)."""
    B = input_ids.shape[0]
    labels = (torch.rand(B, generator=generator) < 0.5).long().to(input_ids.device)
    shift = torch.randint(1, max(2, B), (1,), generator=generator).item()
    other = (torch.arange(B, device=input_ids.device) + shift) % B
    pick = torch.where(labels.bool(), torch.arange(B, device=input_ids.device), other)
    return input_ids[pick], attention_mask[pick], labels


__all__ = ["CrossAttention", "FusionConfig", "FusionLayer", "ImageTextFusionModel", "matching_batch"]
