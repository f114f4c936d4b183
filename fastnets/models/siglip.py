"""SigLIP on fastnets kernels with transformers' SiglipModel module tree and parameter names, so
``load_state_dict(hf_siglip.state_dict())`` works both ways.

    model = fastnets.models.SiglipModel(transformers.SiglipConfig(...))   # or fastnets' SiglipConfig
    out = model(input_ids=ids, pixel_values=px, return_loss=True)       # the sigmoid loss, tiled

Differences from CLIP, as transformers has them: no class token (the patch embedding has a bias
and every patch a position), a bidirectional text encoder pooled at its last position through a
``head`` Linear, the image pooled by multihead attention from a learned probe (MAP head, on
fastnets' MultiheadAttention), and a learned ``logit_bias``. The loss is fastnets' tiled
``clip_loss(kind="sigmoid")``. (``CLIPModel(config, loss="sigmoid")`` is the other SigLIP: CLIP's
towers trained with SigLIP's loss.)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops
from .clip import CLIPEncoder, CLIPMLP, CLIPTextEmbeddings, _hf_outputs, features_output


@dataclasses.dataclass
class SiglipTextConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_size: Optional[int] = None

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size


@dataclasses.dataclass
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True


@dataclasses.dataclass
class SiglipConfig:
    text_config: SiglipTextConfig = dataclasses.field(default_factory=SiglipTextConfig)
    vision_config: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = SiglipTextConfig(**self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**self.vision_config)


def as_siglip_config(config) -> SiglipConfig:
    """A fastnets SiglipConfig from itself, a transformers.SiglipConfig, or a dict of its fields."""
    if isinstance(config, SiglipConfig):
        return config
    if isinstance(config, dict):
        return SiglipConfig(**config)
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise TypeError(f"SiglipModel: config must be a fastnets.models.SiglipConfig, a transformers.SiglipConfig or "
                        f"a dict, got {type(config).__name__}")

    def pick(sub, cls):
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(sub, n) for n in names if getattr(sub, n, None) is not None})

    return SiglipConfig(pick(config.text_config, SiglipTextConfig), pick(config.vision_config, SiglipVisionConfig))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.image_size = c.image_size
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size,
                                         stride=c.patch_size)
        self.num_patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, c.hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_patches).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        H, W = pixel_values.shape[-2:]
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"SigLIP vision: input image size ({H}*{W}) doesn't match the model "
                             f"({self.image_size}*{self.image_size})")
        conv = self.patch_embedding
        return ops.patch_embed(pixel_values.to(conv.weight.dtype), conv.weight, None, self.position_embedding.weight,
                               bias=conv.bias)


# The text embeddings are CLIP's, parameter names included.
SiglipTextEmbeddings = CLIPTextEmbeddings


class SiglipTextModel(nn.Module):
    def __init__(self, c: SiglipTextConfig):
        super().__init__()
        self.config = c
        self.embeddings = SiglipTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.projection_size)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(last_hidden_state, pooled: head(the last position's state), as transformers, padding or not)."""
        if input_ids is None:
            raise ValueError("SigLIP text: input_ids is required")
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        keep = attention_mask.reshape(input_ids.shape).bool() if attention_mask is not None else None
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids, position_ids), keep))
        return h, self.head(h[:, -1, :])


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """MAP: a learned probe attends over the patch states, then LayerNorm + MLP with a residual."""

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, c.hidden_size))
        self.attention = fnn.MultiheadAttention(c.hidden_size, c.num_attention_heads, batch_first=True)
        self.layernorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, h: Tensor) -> Tensor:
        probe = self.probe.expand(h.shape[0], -1, -1)
        x = self.attention(probe, h, h, need_weights=False)[0]
        return (x + self.mlp(self.layernorm(x)))[:, 0]


class SiglipVisionModel(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = SiglipVisionEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(c) if c.vision_use_head else None

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        h = self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
        return h, (self.head(h) if self.head is not None else None)


def _init_siglip_weights(model: "SiglipModel") -> None:
    """Training from scratch: normal embeddings (std 1/sqrt(width)), Xavier-uniform projections,
    tiny-normal MLP biases, zero other biases (the shape of transformers' SigLIP init)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.embedding_dim ** -0.5)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, CLIPMLP):
            nn.init.normal_(m.fc1.bias, std=1e-6)
            nn.init.normal_(m.fc2.bias, std=1e-6)
        elif isinstance(m, SiglipMultiheadAttentionPoolingHead):
            nn.init.normal_(m.probe, std=m.probe.shape[-1] ** -0.5)


class SiglipModel(nn.Module):
    """transformers' SiglipModel on fastnets kernels (same parameter names; see the module doc)."""

    def __init__(self, config=None):
        super().__init__()
        c = as_siglip_config(config if config is not None else SiglipConfig())
        self.config = c
        self.text_model = SiglipTextModel(c.text_config)
        self.vision_model = SiglipVisionModel(c.vision_config)
        self.logit_scale = nn.Parameter(torch.tensor([torch.log(torch.tensor(10.0)).item()]))
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))
        _init_siglip_weights(self)

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                          position_ids: Optional[Tensor] = None):
        return features_output(*self.text_model(input_ids, attention_mask, position_ids))

    def get_image_features(self, pixel_values: Tensor):
        return features_output(*self.vision_model(pixel_values))

    def forward(self, input_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                return_loss: Optional[bool] = None, *, return_logits: bool = True, distributed: bool = False,
                exchange: str = "gather"):
        """transformers' SiglipModel.forward (logits = scale · text · imageᵀ + bias); the loss is
        fastnets' tiled sigmoid clip_loss (exchange="neighbour": SigLIP's ring across ranks)."""
        Pooled, Out, _ = _hf_outputs()
        try:
            from transformers.models.siglip.modeling_siglip import SiglipOutput as Out
        except ImportError:
            pass
        th, tp = self.text_model(input_ids, attention_mask, position_ids)
        vh, vp = self.vision_model(pixel_values)
        if vp is None:
            raise ValueError("SiglipModel: the vision tower has no head (vision_use_head=False): no image embedding")
        image_embeds, text_embeds = F.normalize(vp, dim=-1), F.normalize(tp, dim=-1)
        scale = self.logit_scale.exp()
        logits_per_text = logits_per_image = None
        if return_logits:
            logits_per_text = text_embeds @ image_embeds.t() * scale + self.logit_bias
            logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:
            loss = ops.clip_loss(image_embeds, text_embeds, scale, self.logit_bias, kind="sigmoid",
                                 distributed=distributed, exchange=exchange)
        return Out(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                   text_embeds=text_embeds, image_embeds=image_embeds,
                   text_model_output=Pooled(last_hidden_state=th, pooler_output=tp),
                   vision_model_output=Pooled(last_hidden_state=vh, pooler_output=vp))
