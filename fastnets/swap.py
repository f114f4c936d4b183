"""swap(model): put fastnets modules into a model someone else wrote, sharing its parameters.

One table drives it: torch class -> fastnets class. Every fastnets module subclasses the
torch class it replaces, so a swapped module keeps the same attributes, Parameter objects,
buffers, hooks and state_dict keys; only `forward` changes. `unswap` is the same walk
with the table reversed. Later kernel families extend SWAP_TABLE.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from . import nn as fnn

SWAP_TABLE: dict[type, type] = {
    nn.LayerNorm: fnn.LayerNorm,
    nn.GroupNorm: fnn.GroupNorm,
    nn.RMSNorm: fnn.RMSNorm,
    nn.Conv1d: fnn.Conv1d,
    nn.Conv2d: fnn.Conv2d,
    nn.ConvTranspose2d: fnn.ConvTranspose2d,
    nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.MaxPool2d: fnn.MaxPool2d,
    nn.AvgPool2d: fnn.AvgPool2d,
    nn.AdaptiveAvgPool2d: fnn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d: fnn.AdaptiveMaxPool2d,
    nn.MultiheadAttention: fnn.MultiheadAttention,
    nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: fnn.TransformerDecoderLayer,
    nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
}
# Swapped only as part of a fused Conv2d -> BatchNorm2d -> ReLU chain (see fastnets.fusion).
_CHAIN_ONLY = {nn.ReLU: fnn.ReLU}


@dataclasses.dataclass
class SwapReport:
    """What swap()/unswap() did. `model` is the (possibly new) root: the model itself unless
    the root module was one of the swapped classes."""

    model: nn.Module
    replaced: list = dataclasses.field(default_factory=list)  # (qualified name, from class, to class)
    skipped: list = dataclasses.field(default_factory=list)   # (qualified name, class, reason)
    fused: list = dataclasses.field(default_factory=list)     # (conv, bn, relu or None): one kernel in eval

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.skipped)}"]
        lines += [f"  swapped {name or '<root>'}: {a} -> {b}" for name, a, b in self.replaced]
        lines += [f"  left    {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        lines += [f"  fused   {c} -> {b}" + (f" -> {r}" if r else "") + " (eval mode)" for c, b, r in self.fused]
        return "\n".join(lines)


def _rebind(module: nn.Module, cls: type) -> nn.Module:
    """A new `cls` instance sharing `module`'s state: the same Parameter and buffer objects
    (the registries are copied shallowly, so later additions to one do not leak to the other)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()
                         if k not in ("_fusion", "_fold_cache")})  # belong to the modules swap() made
    return new


def _matches(selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return type(module) is selector
    if isinstance(selector, str):
        return selector == name or selector == type(module).__name__
    raise TypeError(f"include/exclude entries must be module classes or names, got {type(selector).__name__}")


def _walk(model: nn.Module, table: dict, include, exclude) -> SwapReport:
    for sel in list(include or ()) + list(exclude or ()):
        _matches(sel, "", model)  # validates the selector types up front
    report = SwapReport(model)

    def convert(name: str, module: nn.Module) -> nn.Module:
        cls = type(module)
        if cls in table:
            if include is not None and not any(_matches(s, name, module) for s in include):
                report.skipped.append((name, cls.__name__, "not in include"))
            elif exclude is not None and any(_matches(s, name, module) for s in exclude):
                report.skipped.append((name, cls.__name__, "excluded"))
            else:
                new = _rebind(module, table[cls])
                report.replaced.append((name, f"{cls.__module__}.{cls.__qualname__}",
                                        f"{table[cls].__module__}.{table[cls].__qualname__}"))
                module = new   # and on into its children (a transformer layer's attention and norms)
        elif any(issubclass(cls, base) for base in table) and cls not in table.values():
            report.skipped.append((name, cls.__name__, "subclass of a swappable class; its forward may differ"))
        for child_name, child in list(module.named_children()):
            new_child = convert(f"{name}.{child_name}" if name else child_name, child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    report.model = convert("", model)
    return report


def _attach_fusions(report: SwapReport, chains) -> None:
    """Give each found chain whose conv and BN were swapped a shared _Fusion; a ReLU used
    only after that BN becomes fastnets.nn.ReLU so it can step aside in eval mode."""
    root = report.model
    for chain in chains:
        conv, bn = root.get_submodule(chain.conv), root.get_submodule(chain.bn)
        if type(conv) is not fnn.Conv2d or type(bn) is not fnn.BatchNorm2d:
            continue
        fusion = fnn.conv._Fusion(conv, bn, "relu" if (chain.relu or chain.relu_function) else "identity")
        conv._fusion = bn._fusion = fusion
        relu_name = None
        if chain.relu and chain.relu_exclusive:
            relu = root.get_submodule(chain.relu)
            if type(relu) in _CHAIN_ONLY:
                relu = _rebind(relu, _CHAIN_ONLY[type(relu)])
                parent, _, child = chain.relu.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, child, relu)
            if isinstance(relu, fnn.ReLU):
                relu._fusion, relu_name = fusion, chain.relu
        # A shared ReLU (torchvision's blocks reuse one) still runs; relu(relu(z)) = relu(z).
        report.fused.append((chain.conv, chain.bn, relu_name or (chain.relu if chain.relu else None)))


def swap(model: nn.Module, *, include=None, exclude=None, fuse: bool = True) -> SwapReport:
    """Replace torch.nn modules inside `model` (in place) by their fastnets versions.

    include / exclude: lists of module classes (``nn.GroupNorm``), class names
    (``"GroupNorm"``) or qualified module names (``"encoder.layers.0.norm1"``). With
    include, only matching modules are swapped; exclude keeps matching modules on torch.
    Returns a SwapReport listing what was replaced and what was left, and why. Parameters
    are shared, not copied: optimizers built before the swap keep working.

    fuse: also find Conv2d -> BatchNorm2d (-> ReLU) chains (fastnets.fusion) and, in eval
    mode, run each as one conv with the BN folded in and the ReLU in its epilogue. Training
    mode is unaffected. Listed in the report's `fused`.
    """
    from . import fusion
    chains = fusion.find_conv_bn_chains(model) if fuse else []
    report = _walk(model, SWAP_TABLE, include, exclude)
    _attach_fusions(report, chains)
    return report


def unswap(model: nn.Module) -> SwapReport:
    """Undo swap(): turn fastnets modules back into the torch.nn classes, sharing parameters."""
    table = {fast: torch_cls for torch_cls, fast in {**SWAP_TABLE, **_CHAIN_ONLY}.items()}
    return _walk(model, table, None, None)
