"""Transfer learning from torchvision-format checkpoints, with no downloads.

Fine-tuning recipe (see also examples/train_cnn.py)::

    model = fastnets.models.resnet18()
    transfer.load_checkpoint(model, "resnet18.pth")          # a local torchvision checkpoint
    transfer.replace_head(model, num_classes=10)              # new, trainable classifier
    transfer.freeze(model, trainable=["fc"])                  # 1. train the head only ...
    opt = torch.optim.AdamW(transfer.trainable_parameters(model), lr=1e-3)
    ...
    transfer.unfreeze(model, ["layer4"])                      # 2. ... then the last stage too,
    opt = torch.optim.AdamW(transfer.trainable_parameters(model), lr=1e-4)   # at a lower rate

Frozen stages keep their BatchNorm statistics (their BNs stay in eval mode while the rest
of the model trains), which is what fine-tuning on small datasets wants.

The same functions serve every fastnets model:

- ``load_checkpoint(model, path_or_state_dict, layout=...)`` reads torchvision, Hugging Face
  ("hf": GPT-2's Conv1D weights transposed, a missing / extra model prefix such as "bert."
  fixed) and open_clip ("open_clip": OpenAI CLIP's names and packed q/k/v, into CLIPModel)
  layouts, or applies your own mapping (a dict of prefix renames or a function);
- ``freeze`` / ``unfreeze`` take module names, stage names or glob patterns over parameter
  names ("text_model.encoder.layers.1*", "*.bias");
- ``replace_head`` finds the classifier (ResNet's fc, VGG's classifier.6, BERT's
  classifier, the last Linear);
- ``feature_extractor`` gives pooled features (CNNs' forward_features, CLIP's normalised
  image embedding, BERT's pooled output);
- ``param_groups`` builds optimizer groups with discriminative learning rates (per pattern,
  or decaying stage by stage towards the input).

Recipes (tests/test_transfer.py runs each):

    # BERT sequence classification: embeddings and the lower half frozen, lower rates below
    model = fastnets.models.BertForSequenceClassification(cfg)
    transfer.load_checkpoint(model, "bert.safetensors", layout="hf")       # BertModel or ...ForSeq...
    transfer.freeze(model, trainable=["bert.encoder.layer.1*", "bert.pooler", "classifier"])
    opt = torch.optim.AdamW(transfer.param_groups(model, lr=5e-5, decay=0.8))

    # CLIP linear probe: frozen image tower, one Linear on its embeddings
    clip = fastnets.models.CLIPModel(cfg)
    transfer.load_checkpoint(clip, "open_clip_vit_b32.pt", layout="open_clip")
    probe = transfer.linear_probe(clip, num_classes=10)                    # only probe.head trains
"""
from __future__ import annotations

import fnmatch
import os
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn


def _unwrap(obj) -> dict:
    """The state_dict inside common checkpoint wrappers, with DDP's "module." stripped."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint does not hold a state_dict (a dict of tensors), nor one under "
                         "'state_dict' / 'model' / 'model_state_dict'")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state_dict from a local .pth / .pt (torch.load, weights_only) or .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError("reading .safetensors needs the safetensors package: pip install safetensors") from err
        return load_file(path)
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True))


def _fix_prefix(state: dict, own: Iterable[str]) -> dict:
    """Add or strip one leading module name ("bert.", "model.") so the keys meet the model's:
    a BertModel checkpoint into BertForSequenceClassification and the other way."""
    own = set(own)
    if not state or any(k in own for k in state):
        return state
    prefixes = {k.split(".", 1)[0] + "." for k in own if "." in k}
    for p in prefixes:                              # the model has a prefix the checkpoint lacks
        if sum((p + k) in own for k in state) >= len(state) // 2:
            return {p + k: v for k, v in state.items()}
    for p in {k.split(".", 1)[0] + "." for k in state if "." in k}:    # ... or the other way
        stripped = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        if sum(k in own for k in stripped) >= len(stripped) // 2 and stripped:
            return stripped
    return state


def _split_qkv(state: dict, src: str, dst: str) -> dict:
    w, b = state[src + "in_proj_weight"], state[src + "in_proj_bias"]
    out = {}
    for name, wp, bp in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3)):
        out[f"{dst}{name}.weight"], out[f"{dst}{name}.bias"] = wp, bp
    return out


def from_open_clip_state_dict(state: dict) -> dict:
    """An open_clip / OpenAI CLIP (ViT) state dict in CLIPModel's (transformers') names:
    packed attention in_proj split into q / k / v, ``x @ proj`` projections as Linear weights
    (transposed), position embeddings as Embedding weights."""
    out = {}
    towers = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
              ("transformer.resblocks.", "text_model.encoder.layers."))
    simple = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "logit_scale": "logit_scale", "logit_bias": "logit_bias"}
    norms = {"visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm.",
             "ln_final.": "text_model.final_layer_norm."}
    block = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
             "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.t()
        elif any(key.startswith(n) for n in norms):
            n = next(n for n in norms if key.startswith(n))
            out[norms[n] + key[len(n):]] = value
        elif any(key.startswith(t) for t, _ in towers):
            src, dst = next((t, d) for t, d in towers if key.startswith(t))
            i, rest = key[len(src):].split(".", 1)
            if rest == "attn.in_proj_weight":
                out.update(_split_qkv(state, f"{src}{i}.attn.", f"{dst}{i}.self_attn."))
            elif rest == "attn.in_proj_bias":
                continue
            else:
                b = next((b for b in block if rest.startswith(b)), None)
                if b is None:
                    raise KeyError(f"open_clip layout: unexpected key {key!r}")
                out[f"{dst}{i}.{block[b]}{rest[len(b):]}"] = value
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        else:
            raise KeyError(f"open_clip layout: unexpected key {key!r} (only ViT CLIP towers are mapped)")
    return out


def to_open_clip_state_dict(state: dict) -> dict:
    """CLIPModel's state dict in open_clip's names (the inverse of from_open_clip_state_dict)."""
    inverse = {}
    out = {}
    for key, value in state.items():
        for tower_dst, tower_src in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                                     ("text_model.encoder.layers.", "transformer.resblocks.")):
            if key.startswith(tower_dst):
                i, rest = key[len(tower_dst):].split(".", 1)
                if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                    kind = rest.rsplit(".", 1)[1]
                    inverse.setdefault((f"{tower_src}{i}.attn.in_proj_{kind}", kind), {})[rest[10]] = value
                    break
                ren = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                       "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
                b = next(b for b in ren if rest.startswith(b))
                out[f"{tower_src}{i}.{ren[b]}{rest[len(b):]}"] = value
                break
        else:
            fwd = {v: k for k, v in {"visual.class_embedding": "vision_model.embeddings.class_embedding",
                                     "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                                     "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                                     "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                                     "positional_embedding": "text_model.embeddings.position_embedding.weight",
                                     "logit_scale": "logit_scale", "logit_bias": "logit_bias"}.items()}
            norms = {"vision_model.pre_layrnorm.": "visual.ln_pre.", "vision_model.post_layernorm.": "visual.ln_post.",
                     "text_model.final_layer_norm.": "ln_final."}
            if key in fwd:
                out[fwd[key]] = value
            elif key == "visual_projection.weight":
                out["visual.proj"] = value.t()
            elif key == "text_projection.weight":
                out["text_projection"] = value.t()
            elif any(key.startswith(n) for n in norms):
                n = next(n for n in norms if key.startswith(n))
                out[norms[n] + key[len(n):]] = value
            else:
                raise KeyError(f"to_open_clip_state_dict: unexpected key {key!r}")
    for (name, _), parts in inverse.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


LAYOUTS = ("fastnets", "torchvision", "hf", "open_clip")


def convert_state_dict(model: nn.Module, state: dict, layout: str = "fastnets",
                       key_map: Optional[Union[dict, Callable[[dict], dict]]] = None) -> dict:
    """`state` in `model`'s names. layout: "fastnets" / "torchvision" (fastnets' CNNs share
    torchvision's keys): as is; "hf": transformers' names (fastnets' BERT, T5, CLIP use them;
    GPT-2's Conv1D weights are transposed), a missing or extra model prefix fixed; "open_clip":
    OpenAI / open_clip CLIP into CLIPModel. key_map, applied first: {old prefix: new prefix}
    or a function state_dict -> state_dict."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if key_map is not None:
        if callable(key_map):
            state = key_map(state)
        elif isinstance(key_map, dict):
            renamed = {}
            for k, v in state.items():
                old = next((o for o in sorted(key_map, key=len, reverse=True) if k.startswith(o)), None)
                renamed[key_map[old] + k[len(old):] if old is not None else k] = v
            state = renamed
        else:
            raise TypeError(f"key_map must be a dict of prefix renames or a function, got {type(key_map).__name__}")
    if layout == "open_clip":
        state = from_open_clip_state_dict(state)
    elif layout == "hf":
        from .gpt import GPT, from_hf_gpt2_state_dict
        if isinstance(model, GPT):
            state = from_hf_gpt2_state_dict(state)
        state = _fix_prefix(state, model.state_dict())
    return state


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike, dict], *, layout: str = "fastnets",
                    key_map=None, strict: bool = True, skip_mismatched_head: bool = False):
    """Load a checkpoint (a local .pth / .pt / .safetensors path, or a state dict) into
    `model`, converted from `layout` (see convert_state_dict). skip_mismatched_head: drop
    tensors whose shape differs from the model's (a 1000-class fc into a 10-class model)
    instead of failing; they are reported as missing."""
    state = dict(path) if isinstance(path, dict) else read_state_dict(path)
    state = convert_state_dict(model, state, layout, key_map)
    if skip_mismatched_head:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
        strict = False
    return model.load_state_dict(state, strict=strict)


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the state_dict as .safetensors (by extension) or with torch.save."""
    path = os.fspath(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier layer: ResNet's fc, VGG's classifier.6, or the last Linear."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return "fc" if "fc" in linears else linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace the classifier with a freshly initialised Linear(in_features, num_classes)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"replace_head: num_classes must be a positive int, got {num_classes!r}")
    name = head_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def stages(model: nn.Module) -> list[str]:
    """The model's top-level children in order: the units freeze / unfreeze work in."""
    return [name for name, _ in model.named_children()]


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _check_stages(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Module names, or glob patterns over parameter names that match at least one."""
    names = list(names)
    known = set(dict(model.named_modules()))
    params = [n for n, _ in model.named_parameters()]
    bad = [n for n in names if (not any(fnmatch.fnmatchcase(p, n) for p in params) if _is_pattern(n)
                                else n not in known)]
    if bad:
        raise ValueError(f"unknown module name(s) or patterns matching no parameter {bad}; top-level stages are "
                         f"{stages(model)}")
    return names


def _selected(name: str, selectors: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, t) if _is_pattern(t) else (name == t or name.startswith(t + "."))
               for t in selectors)


def _frozen_bn_eval(model: nn.Module) -> None:
    """BatchNorms whose parameters are all frozen keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = [p for p in m.parameters(recurse=False)]
            m._fastnets_frozen = bool(params) and not any(p.requires_grad for p in params)


def freeze(model: nn.Module, trainable: Iterable[str] = ()) -> nn.Module:
    """requires_grad=False for every parameter except those under the `trainable` module
    names or matching its glob patterns over parameter names (default: the head). Frozen BatchNorms stay in eval mode through model.train()."""
    trainable = _check_stages(model, list(trainable) or [head_name(model)])
    for name, p in model.named_parameters():
        p.requires_grad_(_selected(name, trainable))
    _frozen_bn_eval(model)
    _install_train_hook(model)
    return model


def unfreeze(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Make the parameters under `names` (e.g. ["layer4"], or patterns such as
    "bert.encoder.layer.1[01].*") trainable again."""
    names = _check_stages(model, names)
    for name, p in model.named_parameters():
        if _selected(name, names):
            p.requires_grad_(True)
    _frozen_bn_eval(model)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _install_train_hook(model: nn.Module) -> None:
    if getattr(model, "_fastnets_train_hooked", False):
        return
    original = model.train

    def train(mode: bool = True):
        original(mode)
        if mode:
            for m in model.modules():
                if getattr(m, "_fastnets_frozen", False):
                    m.eval()
        return model

    model.train = train
    model._fastnets_train_hooked = True


def features(model: nn.Module, x, **kwargs):
    """Pooled features of any fastnets model: CNNs' forward_features, CLIP's normalised image
    embedding, BERT's pooled output (kwargs: attention_mask, token_type_ids)."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    if hasattr(model, "encode_image"):
        return model.encode_image(x, normalize=True)
    bert = getattr(model, "bert", model)
    if type(bert).__name__ == "BertModel":
        return bert(x, kwargs.get("attention_mask"), kwargs.get("token_type_ids"))[1]
    raise TypeError(f"{type(model).__name__} has no pooled features: fastnets.models' ResNet, VGG, SimpleCNN, "
                    "CLIPModel and BERT do")


def feature_dim(model: nn.Module) -> int:
    if hasattr(model, "encode_image") and hasattr(model, "projection_dim"):
        return model.projection_dim
    bert = getattr(model, "bert", None) or model
    if type(bert).__name__ == "BertModel":
        return bert.config.hidden_size if hasattr(bert, "config") else model.config.hidden_size
    return model.get_submodule(head_name(model)).in_features


class FeatureExtractor(nn.Module):
    """inputs -> pooled features (N, D): the model without its classifier head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not (hasattr(model, "forward_features") or hasattr(model, "encode_image")
                or type(getattr(model, "bert", model)).__name__ == "BertModel"):
            raise TypeError(f"{type(model).__name__} has no forward_features(); fastnets.models' ResNet, VGG and "
                            "SimpleCNN do (and CLIPModel / BERT give their embeddings)")
        self.model = model

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return features(self.model, x, **kwargs)


def feature_extractor(model: nn.Module) -> FeatureExtractor:
    """Pooled features of `model` (shares its parameters)."""
    return FeatureExtractor(model)


class LinearProbe(nn.Module):
    """A frozen model's pooled features (no gradient, eval mode) into one trainable Linear."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"linear_probe: num_classes must be a positive int, got {num_classes!r}")
        self.backbone = FeatureExtractor(model)
        for p in model.parameters():
            p.requires_grad_(False)
        ref = next(model.parameters())
        self.head = nn.Linear(feature_dim(model), num_classes).to(ref.device)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()          # frozen: dropout off, BatchNorm statistics kept
        return self

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            f = self.backbone(x, **kwargs)
        return self.head(f.to(self.head.weight.dtype))


def linear_probe(model: nn.Module, num_classes: int) -> LinearProbe:
    """The linear-probe recipe (CLIP's evaluation protocol): `model` frozen, a new Linear on
    its pooled features; only ``probe.head`` trains."""
    return LinearProbe(model, num_classes)


_DEPTH = __import__("re").compile(r"(?:^|\.)(?:layer|layers|blocks|resblocks|h)\.?(\d+)(?:\.|$)")


def depth(name: str) -> Optional[int]:
    """The block index in a parameter name (ResNet's layer3, BERT's encoder.layer.7, CLIP's
    encoder.layers.2, GPT's h.5), or None outside the numbered blocks."""
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


def param_groups(model: nn.Module, lr: float, *, decay: Optional[float] = None, lrs: Optional[dict] = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with discriminative learning rates, trainable parameters only.

    lrs: {module name or glob pattern: lr}; the first match sets a parameter's rate, the rest
    get `lr`. decay: layer-wise decay: the numbered blocks get lr * decay^(distance from the
    top), what sits before them (stem, embeddings: anything named *embed*) the smallest rate
    and what follows them (final norm, pooler, head) `lr`. weight_decay: on matrices and kernels only, not on
    biases, norms, embeddings' 1-d params. Pass the result to any torch.optim optimizer."""
    if decay is not None and not 0 < decay <= 1:
        raise ValueError(f"param_groups: decay must be in (0, 1], got {decay}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("param_groups: the model has no trainable parameters (all frozen?)")
    if lrs:
        _check_stages(model, list(lrs))
    # Depths from the whole model, frozen blocks included: rates follow the architecture.
    # Levels: 0 before the blocks, d + 1 for block d, top after them (the head one step above the last block).
    top = max((d for d in map(depth, (n for n, _ in model.named_parameters())) if d is not None), default=-1) + 2
    first_block = next((i for i, (n, _) in enumerate(model.named_parameters()) if depth(n) is not None), None)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    groups: dict = {}
    for name, p in named:
        d = depth(name)
        seen_block = first_block is not None and order[name] > first_block
        rate = lr
        if lrs:
            rate = next((v for k, v in lrs.items() if _selected(name, [k])), lr)
        elif decay is not None:
            before = not seen_block or any(t in name for t in ("embed", "wte.", "wpe."))
            level = d + 1 if d is not None else (0 if before else top)
            rate = lr * decay ** (top - level)
        wd = weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((rate, wd), []).append(p)
    return [{"params": ps, "lr": rate, "weight_decay": wd} for (rate, wd), ps in groups.items()]
