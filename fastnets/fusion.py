"""Conv2d -> BatchNorm2d (-> ReLU) chains: finding them in any model, and fusing them.

- `find_conv_bn_chains(model)` traces the model with torch.fx (torch.nn and fastnets.nn
  modules as leaves) and keeps a chain only when the data flow proves it: the conv's
  output goes only to the BN, each module is called exactly once. Models fx cannot trace
  fall back to adjacency inside nn.Sequential (where order is execution order), and to
  the `conv_bn_pairs()` that fastnets' own blocks declare.
- `fuse_conv_bn(model)`: inference folding, permanent. Each BN is folded into its conv's
  weight and bias and replaced by nn.Identity.
- swap() uses the same chains for a reversible, train-aware fusion (fastnets.nn._Fusion).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


@dataclasses.dataclass(frozen=True)
class Chain:
    conv: str                 # qualified module names
    bn: str
    relu: str | None = None   # a ReLU module applied to the BN output only, if any
    relu_exclusive: bool = False  # that ReLU module is called nowhere else
    relu_function: bool = False   # F.relu / torch.relu applied to the BN output only


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("fastnets.nn") or super().is_leaf_module(m, qualname)


def _traced(model: nn.Module):
    """fx graph of model's forward, or None. Tracing runs the forward on proxies, and a forward
    that stores what it computes on its module (nn.LSTM refreshes `_flat_weights` from
    getattr, which returns proxies while tracing) would keep them: every module's attribute
    dict is put back as it was, whether the trace succeeds or not."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        return _LeafTracer().trace(model)
    except Exception:  # dynamic control flow, non-tensor inputs, ...: not traceable
        return None
    finally:
        for m, state in saved:   # compared by identity: a proxy has no truth value
            if m.__dict__.keys() != state.keys() or any(m.__dict__[k] is not v for k, v in state.items()):
                m.__dict__.clear()
                m.__dict__.update(state)


def _fx_chains(model: nn.Module) -> list[Chain] | None:
    kinds = {type(m) for m in model.modules()}
    if not any(issubclass(k, nn.Conv2d) for k in kinds) or not any(issubclass(k, nn.BatchNorm2d) for k in kinds):
        return []   # no chain to find: nothing to trace
    graph = _traced(model)
    if graph is None:
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        if calls[node.target] != 1 or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        bn = modules.get(bn_node.target) if bn_node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or calls[bn_node.target] != 1 or bn_node.args[:1] != (node,):
            continue
        relu, exclusive, function = None, False, False
        if len(bn_node.users) == 1:
            user = next(iter(bn_node.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU):
                relu, exclusive = user.target, calls[user.target] == 1
            elif user.op == "call_function" and user.target in (F.relu, torch.relu) and user.args[:1] == (bn_node,):
                function = True
        chains.append(Chain(node.target, bn_node.target, relu, exclusive, function))
    return chains


def _structural_chains(model: nn.Module) -> list[Chain]:
    chains = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "conv_bn_pairs"):
            chains += [Chain(prefix + c, prefix + b) for c, b in module.conv_bn_pairs()]
        if isinstance(module, nn.Sequential):
            kids = list(module.named_children())
            for i in range(len(kids) - 1):
                (cn, c), (bn_name, b) = kids[i], kids[i + 1]
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    relu = kids[i + 2] if i + 2 < len(kids) and isinstance(kids[i + 2][1], nn.ReLU) else None
                    chains.append(Chain(prefix + cn, prefix + bn_name, prefix + relu[0] if relu else None,
                                        relu is not None))
    return chains


def find_conv_bn_chains(model: nn.Module) -> list[Chain]:
    """Conv2d -> BatchNorm2d (-> ReLU) chains of `model`, as qualified module names."""
    chains = _fx_chains(model)
    if chains is None:
        chains = _structural_chains(model)
    modules = dict(model.named_modules())
    seen, out = set(), []
    for c in chains:
        if (c.conv, c.bn) not in seen and modules[c.conv].out_channels == modules[c.bn].num_features:
            seen.add((c.conv, c.bn))
            out.append(c)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-foldable BatchNorm2d into the Conv2d before it, in place, and return
    the model in eval mode. BNs without running statistics are left alone. The folded
    model computes the same function as the original model in eval mode (up to rounding)."""
    model.eval()
    modules = dict(model.named_modules())
    for chain in find_conv_bn_chains(model):
        conv, bn = modules[chain.conv], modules[chain.bn]
        if bn.running_mean is None:
            continue
        w, b = ops.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b)
        else:
            conv.bias.copy_(b)
        _set_module(model, chain.bn, nn.Identity())
    return model

