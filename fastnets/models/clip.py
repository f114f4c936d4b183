"""CLIP (and a SigLIP-loss variant) on fastnets kernels, with Hugging Face's module tree and
parameter names, so ``load_state_dict(hf_clip.state_dict())`` works both ways.

    config = transformers.CLIPConfig(...)            # or fastnets.models.CLIPConfig (no transformers)
    model = fastnets.models.CLIPModel(config)
    out = model(input_ids=ids, pixel_values=images, return_loss=True)   # out.loss, out.logits_per_image
    feats = model.encode_image(images, normalize=True)                   # open_clip style

Image tower: patch embedding (a stride = kernel = patch convolution on fastnets' conv
kernel) + class token + positions, pre-LayerNorm, pre-norm blocks (fastnets flash attention,
LayerNorm, bias + quick-GELU / GELU fused after the fc1 GEMM), the class token's final
state. Text tower: token + position embeddings, causal blocks, final LayerNorm, pooled at the
end-of-text token. Projections without bias; ``logit_scale`` = log(1 / 0.07) = 2.6592 at
init. The loss is fastnets' tiled ``clip_loss``: forward(return_loss=True, return_logits=False)
never forms the batch x batch logits.

SigLIP: ``CLIPConfig(loss="sigmoid")`` (or ``CLIPModel(config, loss="sigmoid")``) trains the
same towers with SigLIP's sigmoid loss and a learned ``logit_bias`` (init scale log 10, bias
-10, as the SigLIP paper).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fnn
from .. import ops


@dataclasses.dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclasses.dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0


@dataclasses.dataclass
class CLIPConfig:
    """transformers.CLIPConfig's fields (text_config / vision_config as dataclasses or dicts),
    plus ``loss``: "softmax" (CLIP) or "sigmoid" (SigLIP)."""
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    loss: str = "softmax"

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = CLIPTextConfig(**self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig(**self.vision_config)
        if self.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"CLIPConfig: loss must be 'softmax' (CLIP) or 'sigmoid' (SigLIP), got {self.loss!r}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CLIPConfig":
        """"ViT-B/32", "ViT-B/16", "ViT-L/14" (OpenAI's), or "tiny" (tests and the example)."""
        text_b = CLIPTextConfig()
        configs = {
            "ViT-B/32": cls(text_b, CLIPVisionConfig(patch_size=32)),
            "ViT-B/16": cls(text_b, CLIPVisionConfig(patch_size=16)),
            "ViT-L/14": cls(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                           projection_dim=768),
                            CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, patch_size=14, projection_dim=768),
                            projection_dim=768),
            "tiny": cls(CLIPTextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, projection_dim=32,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
                        CLIPVisionConfig(hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=32),
        }
        if name not in configs:
            raise ValueError(f"CLIPConfig.from_name: unknown config {name!r}; known: {', '.join(configs)}")
        return dataclasses.replace(configs[name], **overrides)


_TEXT_FIELDS = [f.name for f in dataclasses.fields(CLIPTextConfig)]
_VISION_FIELDS = [f.name for f in dataclasses.fields(CLIPVisionConfig)]


def as_clip_config(config) -> CLIPConfig:
    """A fastnets CLIPConfig from itself, a transformers.CLIPConfig, or a dict of its fields."""
    if isinstance(config, CLIPConfig):
        return config
    if isinstance(config, dict):
        return CLIPConfig(**config)
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise TypeError(f"CLIPModel: config must be a fastnets.models.CLIPConfig, a transformers.CLIPConfig or a "
                        f"dict, got {type(config).__name__}")

    def pick(sub, names, cls):
        return cls(**{n: getattr(sub, n) for n in names if getattr(sub, n, None) is not None})

    return CLIPConfig(text_config=pick(config.text_config, _TEXT_FIELDS, CLIPTextConfig),
                      vision_config=pick(config.vision_config, _VISION_FIELDS, CLIPVisionConfig),
                      projection_dim=config.projection_dim, logit_scale_init_value=config.logit_scale_init_value,
                      initializer_factor=getattr(config, "initializer_factor", 1.0))


# --- output types: transformers' own when it is installed -------------------------------------

@dataclasses.dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: Tensor = None
    pooler_output: Tensor = None


@dataclasses.dataclass
class CLIPOutput:
    loss: Optional[Tensor] = None
    logits_per_image: Optional[Tensor] = None
    logits_per_text: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None
    image_embeds: Optional[Tensor] = None
    text_model_output: Optional[BaseModelOutputWithPooling] = None
    vision_model_output: Optional[BaseModelOutputWithPooling] = None


@functools.lru_cache(maxsize=None)
def _hf_outputs():
    """(pooled-output class, CLIP output class, features as output objects?) following the
    installed transformers: v5's get_*_features return an output with .pooler_output, older
    versions (and no transformers) a tensor."""
    try:
        import transformers
        from transformers.modeling_outputs import BaseModelOutputWithPooling as Pooled
        from transformers.models.clip.modeling_clip import CLIPOutput as Out
    except ImportError:
        return BaseModelOutputWithPooling, CLIPOutput, False
    return Pooled, Out, int(transformers.__version__.split(".")[0]) >= 5


def features_output(hidden: Tensor, features: Tensor):
    """get_*_features' result as the installed transformers gives it: v5 an output with
    .pooler_output = the features, older versions (and no transformers) the tensor."""
    Pooled, _, as_output = _hf_outputs()
    return Pooled(last_hidden_state=hidden, pooler_output=features) if as_output else features


# --- the towers ---------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"CLIPAttention: hidden_size {hidden} must be divisible by num_attention_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        B, S, E = x.shape
        split = lambda t: t.view(B, S, self.heads, E // self.heads)  # noqa: E731  (B, S, H, D): no transposes
        mask = keep[:, None, None, :] if keep is not None else None  # (B, 1, 1, S), True = attend
        y = ops.flash_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                causal="top_left" if causal else False, attn_mask=mask,
                                dropout_p=self.dropout if self.training else 0.0, layout="bshd")
        return self.out_proj(y.reshape(B, S, E))


class CLIPMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
        if self.act is None:
            raise ValueError(f"CLIPMLP: hidden_act must be quick_gelu, gelu, gelu_new or gelu_pytorch_tanh, got {act!r}")
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        # fc1's bias and the activation in one pass after the GEMM.
        return self.fc2(ops.bias_act(F.linear(x, self.fc1.weight), self.fc1.bias, self.act))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, c.attention_dropout)
        self.layer_norm1 = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layer_norm2 = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), keep, causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: Tensor, keep: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        for layer in self.layers:
            x = layer(x, keep, causal)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings (CLIP's and SigLIP's text towers share them, names included)."""

    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        S = input_ids.shape[-1]
        if S > self.position_embedding.num_embeddings:
            raise ValueError(f"text: sequence length {S} exceeds max_position_embeddings "
                             f"{self.position_embedding.num_embeddings}")
        pos = position_ids if position_ids is not None else self.position_ids[:, :S]
        return self.token_embedding(input_ids) + self.position_embedding(pos)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (v5 layout: embeddings / encoder / final_layer_norm)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.config = c
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(last_hidden_state (B, S, E), pooled (B, E): the state at the end-of-text token)."""
        if input_ids is None:
            raise ValueError("CLIP text: input_ids is required")
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        keep = attention_mask.reshape(input_ids.shape).bool() if attention_mask is not None else None
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids, position_ids), keep, causal=True))
        rows = torch.arange(h.shape[0], device=h.device)
        if self.config.eos_token_id == 2:
            # transformers' legacy rule (configs from before its PR #24773): the highest token id.
            at = input_ids.to(torch.int).argmax(dim=-1)
        else:
            at = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return h, h[rows, at]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = c.image_size, c.patch_size
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size,
                                         stride=c.patch_size, bias=False)
        self.num_patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + 1, c.hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_patches + 1).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        B, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"CLIP vision: input image size ({H}*{W}) doesn't match the model "
                             f"({self.image_size}*{self.image_size})")
        w = self.patch_embedding.weight
        return ops.patch_embed(pixel_values.to(w.dtype), w, self.class_embedding, self.position_embedding.weight)


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModel: embeddings / pre_layrnorm (sic) / encoder / post_layernorm."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = fnn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(last_hidden_state (B, 1 + patches, E), pooled (B, E): the class token, post-normed)."""
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return h, self.post_layernorm(h[:, 0, :])


def _init_clip_weights(model: "CLIPModel") -> None:
    """transformers' CLIPPreTrainedModel._init_weights (OpenAI CLIP's initialisation)."""
    factor = model.config.initializer_factor
    for tower, c in ((model.text_model, model.config.text_config), (model.vision_model, model.config.vision_config)):
        f = factor * c.initializer_factor
        E, L = c.hidden_size, c.num_hidden_layers
        for m in tower.modules():
            if isinstance(m, CLIPTextEmbeddings):
                nn.init.normal_(m.token_embedding.weight, std=0.02 * f)
                nn.init.normal_(m.position_embedding.weight, std=0.02 * f)
            elif isinstance(m, CLIPVisionEmbeddings):
                nn.init.normal_(m.class_embedding, std=E ** -0.5 * f)
                nn.init.normal_(m.patch_embedding.weight, std=c.initializer_range * f)
                nn.init.normal_(m.position_embedding.weight, std=c.initializer_range * f)
            elif isinstance(m, CLIPAttention):
                in_std = E ** -0.5 * (2 * L) ** -0.5 * f
                for p in (m.q_proj, m.k_proj, m.v_proj):
                    nn.init.normal_(p.weight, std=in_std)
                nn.init.normal_(m.out_proj.weight, std=E ** -0.5 * f)
            elif isinstance(m, CLIPMLP):
                nn.init.normal_(m.fc1.weight, std=(2 * E) ** -0.5 * f)
                nn.init.normal_(m.fc2.weight, std=E ** -0.5 * (2 * L) ** -0.5 * f)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.visual_projection.weight, std=model.config.vision_config.hidden_size ** -0.5 * factor)
    nn.init.normal_(model.text_projection.weight, std=model.config.text_config.hidden_size ** -0.5 * factor)


class CLIPModel(nn.Module):
    """transformers' CLIPModel on fastnets kernels (same parameter names; see the module doc).

    config: a fastnets.models.CLIPConfig, a transformers.CLIPConfig or a dict. loss:
    "softmax" (CLIP) or "sigmoid" (SigLIP, adds ``logit_bias``); default config.loss."""

    def __init__(self, config=None, *, loss: Optional[str] = None):
        super().__init__()
        c = as_clip_config(config if config is not None else CLIPConfig())
        if loss is not None:
            c = dataclasses.replace(c, loss=loss)
        self.config = c
        self.projection_dim = c.projection_dim
        self.text_model = CLIPTextModel(c.text_config)
        self.vision_model = CLIPVisionModel(c.vision_config)
        self.visual_projection = nn.Linear(c.vision_config.hidden_size, c.projection_dim, bias=False)
        self.text_projection = nn.Linear(c.text_config.hidden_size, c.projection_dim, bias=False)
        if c.loss == "sigmoid":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(c.logit_scale_init_value))
            self.logit_bias = None
        _init_clip_weights(self)

    # transformers' API ----------------------------------------------------------------------------
    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                          position_ids: Optional[Tensor] = None):
        """The projected text features: as the installed transformers returns them (v5: an
        output whose .pooler_output is the projection; older / none: the tensor)."""
        h, pooled = self.text_model(input_ids, attention_mask, position_ids)
        return features_output(h, self.text_projection(pooled))

    def get_image_features(self, pixel_values: Tensor):
        h, pooled = self.vision_model(pixel_values)
        return features_output(h, self.visual_projection(pooled))

    def forward(self, input_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                return_loss: Optional[bool] = None, *, return_logits: bool = True, distributed: bool = False,
                exchange: str = "gather"):
        """transformers' CLIPModel.forward: normalised embeddings, logits_per_image / _per_text
        (scaled cosine similarities) and, with return_loss, the contrastive loss on fastnets'
        tiled kernel. return_logits=False skips the (B x B) logits (training: the loss never
        forms them). distributed / exchange: the loss across torch.distributed ranks (clip_loss;
        exchange="neighbour" is SigLIP's ring, sigmoid loss only)."""
        Pooled, Out, v5 = _hf_outputs()
        th, tp = self.text_model(input_ids, attention_mask, position_ids)
        vh, vp = self.vision_model(pixel_values)
        image_feats, text_feats = self.visual_projection(vp), self.text_projection(tp)
        image_embeds, text_embeds = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
        scale = self.logit_scale.exp()
        logits_per_text = logits_per_image = None
        if return_logits:
            logits_per_text = text_embeds @ image_embeds.t() * scale
            if self.logit_bias is not None:
                logits_per_text = logits_per_text + self.logit_bias
            logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:
            loss = ops.clip_loss(image_embeds, text_embeds, scale, self.logit_bias, kind=self.config.loss,
                                 distributed=distributed, exchange=exchange)
        return Out(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                   text_embeds=text_embeds, image_embeds=image_embeds,
                   # transformers v5 reports the projected features as the towers' pooler_output.
                   text_model_output=Pooled(last_hidden_state=th, pooler_output=text_feats if v5 else tp),
                   vision_model_output=Pooled(last_hidden_state=vh, pooler_output=image_feats if v5 else vp))

    # open_clip's API -----------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        feats = self.visual_projection(self.vision_model(images)[1])
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: Tensor, normalize: bool = False, attention_mask: Optional[Tensor] = None) -> Tensor:
        feats = self.text_projection(self.text_model(input_ids, attention_mask)[1])
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def zero_shot_classifier(self, class_names, templates, tokenizer) -> Tensor:
        """(projection_dim, classes) class embeddings, open_clip's build_zero_shot_classifier:
        each class name in every template, encoded, normalised, averaged and renormalised.
        templates: format strings with one "{}" or callables; tokenizer: texts -> (ids,
        attention mask) or ids (fastnets.models.clip_data.CaptionTokenizer fits)."""
        if not class_names or not templates:
            raise ValueError("zero_shot_classifier: class_names and templates must be non-empty")
        device = self.logit_scale.device
        columns = []
        for name in class_names:
            texts = [t(name) if callable(t) else t.format(name) for t in templates]
            tok = tokenizer(texts)
            ids, mask = tok if isinstance(tok, tuple) else (tok, None)
            emb = self.encode_text(ids.to(device), normalize=True,
                                   attention_mask=mask.to(device) if mask is not None else None)
            columns.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(columns, dim=1)


# The zero-shot head is an op (one fused kernel); models re-export it beside CLIPModel.
zero_shot_logits = ops.zero_shot_logits
