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
}


@dataclasses.dataclass
class SwapReport:
    """What swap()/unswap() did. `model` is the (possibly new) root: the model itself unless
    the root module was one of the swapped classes."""

    model: nn.Module
    replaced: list = dataclasses.field(default_factory=list)  # (qualified name, from class, to class)
    skipped: list = dataclasses.field(default_factory=list)   # (qualified name, class, reason)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.skipped)}"]
        lines += [f"  swapped {name or '<root>'}: {a} -> {b}" for name, a, b in self.replaced]
        lines += [f"  left    {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _rebind(module: nn.Module, cls: type) -> nn.Module:
    """A new `cls` instance sharing `module`'s state: the same Parameter and buffer objects
    (the registries are copied shallowly, so later additions to one do not leak to the other)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
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
                return new
        elif any(issubclass(cls, base) for base in table) and cls not in table.values():
            report.skipped.append((name, cls.__name__, "subclass of a swappable class; its forward may differ"))
        for child_name, child in list(module.named_children()):
            new_child = convert(f"{name}.{child_name}" if name else child_name, child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    report.model = convert("", model)
    return report


def swap(model: nn.Module, *, include=None, exclude=None) -> SwapReport:
    """Replace torch.nn modules inside `model` (in place) by their fastnets versions.

    include / exclude: lists of module classes (``nn.GroupNorm``), class names
    (``"GroupNorm"``) or qualified module names (``"encoder.layers.0.norm1"``). With
    include, only matching modules are swapped; exclude keeps matching modules on torch.
    Returns a SwapReport listing what was replaced and what was left, and why. Parameters
    are shared, not copied: optimizers built before the swap keep working.
    """
    return _walk(model, SWAP_TABLE, include, exclude)


def unswap(model: nn.Module) -> SwapReport:
    """Undo swap(): turn fastnets modules back into the torch.nn classes, sharing parameters."""
    return _walk(model, {fast: torch_cls for torch_cls, fast in SWAP_TABLE.items()}, None, None)
