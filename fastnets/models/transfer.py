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
"""
from __future__ import annotations

import os
from typing import Iterable

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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    skip_mismatched_head: bool = False):
    """Load a torchvision-format checkpoint into `model` (fastnets.models share torchvision's
    keys). skip_mismatched_head: drop tensors whose shape differs from the model's (a
    1000-class fc into a 10-class model) instead of failing; they are reported as missing."""
    state = read_state_dict(path)
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


def _check_stages(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(names)
    known = set(dict(model.named_modules()))
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown module name(s) {bad}; top-level stages are {stages(model)}")
    return names


def _frozen_bn_eval(model: nn.Module) -> None:
    """BatchNorms whose parameters are all frozen keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = [p for p in m.parameters(recurse=False)]
            m._fastnets_frozen = bool(params) and not any(p.requires_grad for p in params)


def freeze(model: nn.Module, trainable: Iterable[str] = ()) -> nn.Module:
    """requires_grad=False for every parameter except those under the `trainable` module
    names (default: the head). Frozen BatchNorms stay in eval mode through model.train()."""
    trainable = _check_stages(model, list(trainable) or [head_name(model)])
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == t or name.startswith(t + ".") for t in trainable))
    _frozen_bn_eval(model)
    _install_train_hook(model)
    return model


def unfreeze(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Make the parameters under `names` (e.g. ["layer4"]) trainable again."""
    names = _check_stages(model, names)
    for name, p in model.named_parameters():
        if any(name == t or name.startswith(t + ".") for t in names):
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


class FeatureExtractor(nn.Module):
    """images -> pooled features (N, D): the model without its classifier head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_features"):
            raise TypeError(f"{type(model).__name__} has no forward_features(); fastnets.models' ResNet, VGG and "
                            "SimpleCNN do")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def feature_extractor(model: nn.Module) -> FeatureExtractor:
    """Pooled features of `model` (shares its parameters)."""
    return FeatureExtractor(model)
