"""swap(model) / unswap(model): one engine and one table of rules for every rewrite of a
model someone else wrote.

A rule says what it matches (`find`: a module class, or a pattern such as a Conv2d ->
BatchNorm2d -> ReLU chain or a Hugging Face MLP), how it converts and how it reverts.
Every conversion happens in place on the same module objects: a module's class is changed
to a fastnets subclass (same attributes, Parameter objects, buffers, hooks and state_dict
keys; only `forward` changes), and anything else a rule changes is saved on the module
with it. unswap() walks the model and undoes each record, newest first, so the module
tree, the state_dict, the parameter objects and the outputs are what they were.

RULES is ordered: patterns first (they need the original modules), then classes. Later
layers add rules with `register_rule` (fastnets.integrations.transformers adds the Hugging
Face set), never a second engine.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

from torch import nn

from . import fusion
from . import nn as fnn

_RECORDS = "_fastnets_swap"   # module.__dict__ key: the list of SwapRecord, oldest first
_PREFIX = "_fastnets_"        # every per-module entry a rule or a fastnets module keeps


@dataclasses.dataclass(frozen=True)
class SwapRecord:
    rule: str           # Rule.name
    cls: type           # the module's class before the rule ran
    saved: dict         # what the rule's revert needs


@dataclasses.dataclass(frozen=True)
class Match:
    """One place a rule applies: the qualified names of the modules it rewrites (the first
    names the match in the report) and whatever the rule found out about them."""
    names: tuple
    info: object = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """name: shown in the report and usable in include= / exclude=.
    find(model) -> Matches; convert(model, match) -> {qualified name: saved dict} for every
    module it changed (the engine records the original classes); revert(module, saved)
    undoes what convert did to one module beyond its class (None: nothing beyond it).
    target: what a match turns into, for the report. note: said in the report per match.
    changes_class: False for rules that only set state on a module (a model's attention
    implementation, its loss function), so they stack with a class rule on the same module."""
    name: str
    find: Callable[[nn.Module], Iterable[Match]]
    convert: Callable[[nn.Module, Match], dict]
    revert: Optional[Callable[[nn.Module, dict], None]] = None
    target: str = ""
    note: str = ""
    changes_class: bool = True
    fusion: bool = False
    source: Optional[type] = None   # class rules: the torch class they convert


_PATCHED: dict = {}


def patched_class(base: type, forward, home, **attrs) -> type:
    """A subclass of another library's module class with fastnets' forward (the integrations'
    rules): swapping is a class change like every other rule, and unswap() restores `base`.
    The class is named in `home` (the integration's module), so a swapped model pickles
    (torch.save(model)) like any other; the suffix keeps two bases of one name apart."""
    key = (base, forward, tuple(sorted(attrs.items())))
    if key not in _PATCHED:
        name = f"Fastnets{base.__name__}_{len(_PATCHED)}"
        cls = type(name, (base,), {"forward": forward, "__module__": home.__name__, "__qualname__": name,
                                   "__doc__": forward.__doc__, **attrs})
        setattr(home, name, cls)
        _PATCHED[key] = cls
    return _PATCHED[key]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_rule(torch_cls: type, fast_cls: type, note: str = "") -> Rule:
    """torch_cls -> fast_cls, for modules whose type is exactly torch_cls (a subclass may
    have its own forward: it is left alone and listed)."""

    def find(model):
        return [Match((name,)) for name, m in model.named_modules() if type(m) is torch_cls]

    def convert(model, match):
        model.get_submodule(match.names[0]).__class__ = fast_cls
        return {match.names[0]: {}}

    return Rule(_qualname(torch_cls), find, convert, target=_qualname(fast_cls), note=note, source=torch_cls)


def _conv_bn_chains(model: nn.Module) -> list[Match]:
    out = []
    for chain in fusion.find_conv_bn_chains(model):
        conv, bn = model.get_submodule(chain.conv), model.get_submodule(chain.bn)
        if isinstance(conv, fnn.FusedConv2d) or isinstance(bn, fnn.FoldedBatchNorm2d):
            continue
        relu = chain.relu if chain.relu and chain.relu_exclusive else None
        if relu is not None and type(model.get_submodule(relu)) not in (nn.ReLU,):
            relu = None
        names = (chain.conv, chain.bn) + ((relu,) if relu else ())
        out.append(Match(names, ("relu" if (chain.relu or chain.relu_function) else "identity", chain.relu)))
    return out


def _fuse_conv_bn(model: nn.Module, match: Match) -> dict:
    activation, _ = match.info
    modules = [model.get_submodule(n) for n in match.names]
    # The conv and BN run on fastnets' kernels in training too: FusedConv2d / FoldedBatchNorm2d
    # subclass fastnets.nn.Conv2d / BatchNorm2d. A ReLU shared with other call sites stays as
    # it is: relu(relu(z)) = relu(z).
    fnn.FusedConv2d.fuse(modules[0], modules[1], activation, modules[2] if len(modules) > 2 else None)
    return {n: {} for n in match.names}


CONV_BN_RULE = Rule("fusion.conv_bn_relu", _conv_bn_chains, _fuse_conv_bn,
                    target="fastnets.nn.FusedConv2d + FoldedBatchNorm2d (+ FoldedReLU)",
                    note="eval mode: one conv with the BN folded in and the ReLU in its epilogue", fusion=True)

RULES: list[Rule] = [
    CONV_BN_RULE,
    class_rule(nn.LayerNorm, fnn.LayerNorm),
    class_rule(nn.GroupNorm, fnn.GroupNorm),
    class_rule(nn.RMSNorm, fnn.RMSNorm),
    class_rule(nn.Conv1d, fnn.Conv1d),
    class_rule(nn.Conv2d, fnn.Conv2d),
    class_rule(nn.ConvTranspose2d, fnn.ConvTranspose2d),
    class_rule(nn.BatchNorm2d, fnn.BatchNorm2d),
    class_rule(nn.MaxPool2d, fnn.MaxPool2d),
    class_rule(nn.AvgPool2d, fnn.AvgPool2d),
    class_rule(nn.AdaptiveAvgPool2d, fnn.AdaptiveAvgPool2d),
    class_rule(nn.AdaptiveMaxPool2d, fnn.AdaptiveMaxPool2d),
    class_rule(nn.MultiheadAttention, fnn.MultiheadAttention),
    class_rule(nn.TransformerEncoder, fnn.TransformerEncoder,
               note="nested-tensor path off: fastnets attention takes the padding mask (padded outputs zeroed "
                    "where torch would have nested)"),
    class_rule(nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
    class_rule(nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer),
    class_rule(nn.CrossEntropyLoss, fnn.CrossEntropyLoss),
    class_rule(nn.LSTM, fnn.LSTM),
    class_rule(nn.GRU, fnn.GRU),
    class_rule(nn.RNN, fnn.RNN),
    class_rule(nn.LSTMCell, fnn.LSTMCell),
    class_rule(nn.GRUCell, fnn.GRUCell),
    class_rule(nn.RNNCell, fnn.RNNCell),
]


def register_rule(rule: Rule, *, before: Optional[str] = None) -> None:
    """Add a rule (replacing one of the same name), before the rule named `before` or last."""
    RULES[:] = [r for r in RULES if r.name != rule.name]
    at = next((i for i, r in enumerate(RULES) if r.name == before), len(RULES)) if before else len(RULES)
    RULES.insert(at, rule)


def _rule(name: str) -> Rule:
    for r in RULES:
        if r.name == name:
            return r
    raise KeyError(f"unswap: a module was swapped by rule {name!r}, which is not registered in this process")


@dataclasses.dataclass
class SwapReport:
    """What swap()/unswap() did. `model` is the model itself (every rewrite is in place)."""

    model: nn.Module
    replaced: list = dataclasses.field(default_factory=list)  # (qualified name, from, to, rule name)
    skipped: list = dataclasses.field(default_factory=list)   # (qualified name, class, reason)
    fused: list = dataclasses.field(default_factory=list)     # (conv, bn, relu or None): one kernel in eval
    notes: list = dataclasses.field(default_factory=list)     # (qualified name, rule, note)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.skipped)}"]
        lines += [f"  swapped {name or '<root>'}: {a} -> {b}" for name, a, b, _ in self.replaced]
        lines += [f"  left    {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        lines += [f"  fused   {c} -> {b}" + (f" -> {r}" if r else "") + " (eval mode)" for c, b, r in self.fused]
        lines += [f"  note    {name or '<root>'} [{rule}]: {note}" for name, rule, note in self.notes]
        return "\n".join(lines)


def _matches(selector, name: str, module: nn.Module, rule: Rule) -> bool:
    if isinstance(selector, type):
        return type(module) is selector
    if isinstance(selector, str):
        return selector in (name, type(module).__name__, rule.name)
    raise TypeError(f"include/exclude entries must be module classes, class names, qualified module names or rule "
                    f"names, got {type(selector).__name__}")


def _selected(rule: Rule, match: Match, modules: list, include, exclude) -> Optional[str]:
    """None when the match may be converted, else why not."""
    pairs = list(zip(match.names, modules))
    if include is not None and not all(any(_matches(s, n, m, rule) for s in include) for n, m in pairs):
        return "not in include"
    if exclude is not None and any(_matches(s, n, m, rule) for s in exclude for n, m in pairs):
        return "excluded"
    return None


def _records(module: nn.Module) -> list:
    return module.__dict__.get(_RECORDS, [])


def swap(model: nn.Module, *, include=None, exclude=None, fuse: bool = True) -> SwapReport:
    """Put fastnets modules into `model`, in place, by the rules in RULES.

    include / exclude: module classes (``nn.GroupNorm``), class names (``"GroupNorm"``),
    qualified module names (``"encoder.layers.0.norm1"``) or rule names
    (``"fusion.conv_bn_relu"``, ``"transformers.attention"``). With include, a match is
    converted only when every module it rewrites is selected; exclude keeps a match on torch
    when any of its modules is selected. Parameters are shared, not copied: optimizers built
    before the swap keep working, and unswap() restores the model exactly.

    fuse: also apply fusion rules (Conv2d -> BatchNorm2d (-> ReLU) chains run as one conv
    with the BN folded in, in eval mode; training mode is unaffected). Listed in `fused`.
    A Hugging Face transformers model also gets the transformers rules (attention
    implementation, norms, MLPs, loss): see fastnets.integrations.transformers.
    """
    for sel in list(include or ()) + list(exclude or ()):
        _matches(sel, "", model, RULES[0])   # validates the selector types up front
    report = SwapReport(model)
    for rule in RULES:
        if rule.fusion and not fuse:
            continue
        for match in rule.find(model):
            modules = [model.get_submodule(n) for n in match.names]
            if any(r.rule == rule.name or (rule.changes_class and _rule_changes_class(r))
                   for m in modules for r in _records(m)):
                continue   # already converted by this rule (or its class by another): a second swap() is a no-op
            why = _selected(rule, match, modules, include, exclude)
            if why is not None:
                report.skipped.append((match.names[0], type(modules[0]).__name__, why))
                continue
            before = {n: type(m) for n, m in zip(match.names, modules)}
            saved = rule.convert(model, match)
            for name, state in saved.items():
                module = model.get_submodule(name)
                module.__dict__.setdefault(_RECORDS, []).append(SwapRecord(rule.name, before[name], state))
            report.replaced.append((match.names[0], _qualname(before[match.names[0]]), rule.target or rule.name,
                                    rule.name))
            if rule.fusion:
                report.fused.append(tuple(match.names[:2]) + ((match.info[1] if match.info else None),))
            if rule.note:
                report.notes.append((match.names[0], rule.name, rule.note))
    _list_subclasses(model, report)
    return report


def _rule_changes_class(record: SwapRecord) -> bool:
    try:
        return _rule(record.rule).changes_class
    except KeyError:
        return True


def _list_subclasses(model: nn.Module, report: SwapReport) -> None:
    """Subclasses of a class some rule converts are left alone (their forward may differ)."""
    sources = [rule.source for rule in RULES if rule.source is not None]
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("fastnets.") or _records(module):
            continue
        base = next((b for b in sources if issubclass(cls, b) and cls is not b), None)
        if base is not None:
            report.skipped.append((name, cls.__name__, f"subclass of {base.__name__}; its forward may differ"))


def unswap(model: nn.Module) -> SwapReport:
    """Undo swap(): every module a rule changed gets back its class and whatever else the
    rule saved, newest change first; fastnets' per-module entries (fold caches, fusion
    links) are dropped. Modules fastnets built itself (not swapped) are left as they are."""
    report = SwapReport(model)
    for name, module in list(model.named_modules()):
        records = module.__dict__.pop(_RECORDS, None)
        if not records:
            continue
        now = type(module)
        for record in reversed(records):
            rule = _rule(record.rule)
            if rule.revert is not None:
                rule.revert(module, record.saved)
            module.__class__ = record.cls
        for key in [k for k in module.__dict__ if k.startswith(_PREFIX)]:
            del module.__dict__[key]
        report.replaced.append((name, _qualname(now), _qualname(type(module)), ", ".join(r.rule for r in records)))
    return report
