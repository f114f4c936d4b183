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
import sys
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import fusion, intercept, ops
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
    target_cls: Optional[type] = None   # class rules: the fastnets class they convert to
    replaces_forward: bool = True   # False: the new forward still runs the old one (report only)
    opt_in: Optional[str] = None    # a swap() keyword that must be True for the rule to run
    # Report only: qualified names (besides match.names) whose work the match puts on
    # fastnets kernels without changing them (the attention modules under a model whose
    # attention implementation a rule set).
    covers: Optional[Callable[[nn.Module, "Match"], Iterable[str]]] = None
    # Report only: (qualified name, class, category, why) for places the rule would convert
    # but cannot (a hook another package provides is missing): listed as uncovered.
    misses: Optional[Callable[[nn.Module], Iterable[tuple]]] = None


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

    return Rule(_qualname(torch_cls), find, convert, target=_qualname(fast_cls), note=note, source=torch_cls,
                target_cls=fast_cls)


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

def mixed_class(sub: type, fast_cls: type) -> type:
    """`sub` (a subclass of torch's class that keeps its forward: torch's parametrized
    modules, plain user subclasses) with fastnets' forward: a class deriving from both,
    so `sub`'s properties (a parametrization's weight) and fastnets' methods both apply."""
    key = (sub, fast_cls)
    if key not in _PATCHED:
        name = f"Fastnets{sub.__name__}_{len(_PATCHED)}"
        cls = type(name, (sub, fast_cls), {"__module__": __name__, "__qualname__": name, "__doc__": fast_cls.__doc__})
        globals()[name] = cls
        _PATCHED[key] = cls
    return _PATCHED[key]


def _class_sources() -> dict:
    return {rule.source: rule for rule in RULES if rule.source is not None}


def _same_forward_subclasses(model: nn.Module) -> list[Match]:
    """Modules whose class derives from a class some rule converts without overriding its
    forward (torch's ParametrizedConv1d under weight norm; a subclass adding attributes)."""
    sources = _class_sources()
    out = []
    for name, m in model.named_modules():
        cls = type(m)
        if cls in sources or cls.__module__.startswith("fastnets.") or _records(m):
            continue
        base = next((b for b in cls.__mro__[1:] if b in sources), None)
        if base is not None and cls.forward is base.forward and not _overrides(cls, base):
            out.append(Match((name,), base))
    return out


def _overrides(cls: type, base: type) -> list:
    """Methods of `base` that cls (or a class between them) redefines, other than the copy /
    pickle hooks torch's parametrizations add: torch's forward may call them (Conv2d.forward
    calls _conv_forward), fastnets' forward would not, so such a subclass is left alone."""
    between = cls.__mro__[:cls.__mro__.index(base)]
    return [name for k in between for name, v in vars(k).items()
            if callable(v) and hasattr(base, name) and name not in ("__init__", "__getstate__", "__setstate__",
                                                                    "__deepcopy__", "__reduce__", "__reduce_ex__",
                                                                    "extra_repr", "reset_parameters")]


def _convert_subclass(model: nn.Module, match: Match) -> dict:
    m = model.get_submodule(match.names[0])
    fast_cls = next(r.target_cls for r in RULES if r.source is match.info)
    m.__class__ = mixed_class(type(m), fast_cls)
    return {match.names[0]: {}}


_EPS = ("eps", "variance_epsilon", "epsilon")


def _norm_shaped(m: nn.Module) -> bool:
    params = dict(m.named_parameters(recurse=False))
    w = params.get("weight")
    return (not list(m.children()) and not list(m.buffers(recurse=False)) and set(params) <= {"weight", "bias"}
            and w is not None and w.dim() == 1 and w.is_floating_point()
            and any(isinstance(getattr(m, e, None), float) for e in _EPS))


def _probe_norm(m: nn.Module) -> Optional[tuple]:
    """What a norm-shaped module computes, found by running it on a probe input: ("rms",
    offset), ("layer",) over the last dim or ("layer2d",) over dim 1 (channels first), or
    None. Behaviour, not class names: T5LayerNorm is an RMSNorm by another name, timm's and
    torchvision's LayerNorm2d a LayerNorm over channels."""
    eps = next(getattr(m, e) for e in _EPS if isinstance(getattr(m, e, None), float))
    C = m.weight.shape[0]
    bias = getattr(m, "bias", None)
    gen = torch.Generator().manual_seed(0)
    w, b = m.weight.detach().cpu().double(), None if bias is None else bias.detach().cpu().double()
    candidates = []
    x = torch.randn(2, 3, C, generator=gen, dtype=torch.float64)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if b is None:
        candidates += [(("rms", 0.0), x, rms * w), (("rms", 1.0), x, rms * (1.0 + w))]
    ln = torch.nn.functional.layer_norm(x, (C,), w, b, eps)
    candidates.append((("layer",), x, ln))
    x2 = torch.randn(2, C, 3, 3, generator=gen, dtype=torch.float64)
    ln2 = torch.nn.functional.layer_norm(x2.permute(0, 2, 3, 1), (C,), w, b, eps).permute(0, 3, 1, 2)
    candidates.append((("layer2d",), x2, ln2))
    device, dtype = m.weight.device, m.weight.dtype
    if device.type == "meta":
        return None   # nothing to run it on
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    for kind, probe, want in candidates:
        try:
            with torch.no_grad():
                got = m(probe.to(device, dtype))
            if (isinstance(got, torch.Tensor) and got.shape == want.shape
                    and torch.allclose(got.double().cpu(), want, rtol=tol, atol=tol)):
                return kind
        except Exception:   # the module does not take this shape or dtype: not this kind
            continue
    return None


def _norms_by_behaviour(model: nn.Module) -> list[Match]:
    out = []
    for name, m in model.named_modules():
        if type(m).__module__.startswith("fastnets.") or _records(m) or type(m) in _class_sources():
            continue
        if _norm_shaped(m):
            kind = _probe_norm(m)
            if kind is not None:
                out.append(Match((name,), kind))
    return out


def _norm_forward(self, hidden_states, *args, **kwargs):
    """A norm found by its behaviour (fastnets.swap._probe_norm), on fastnets' norm kernels."""
    kind = self._fastnets_norm
    eps = next(getattr(self, e) for e in _EPS if isinstance(getattr(self, e, None), float))
    C = self.weight.shape[0]
    if kind[0] == "rms":
        return ops.rms_norm(hidden_states, (C,), self.weight, eps, offset=kind[1])
    bias = getattr(self, "bias", None)
    if kind[0] == "layer":
        return ops.layer_norm(hidden_states, (C,), self.weight, bias, eps)
    # channels first: normalise the channel dim of a channels_last view (no copy for
    # channels_last activations; the kernels take the strided rows otherwise)
    return ops.layer_norm(hidden_states.permute(0, 2, 3, 1), (C,), self.weight, bias, eps).permute(0, 3, 1, 2)


def _convert_norm(model: nn.Module, match: Match) -> dict:
    m = model.get_submodule(match.names[0])
    m.__class__ = patched_class(type(m), _norm_forward, sys.modules[__name__], _fastnets_norm=match.info)
    return {match.names[0]: {}}


def _bn_act_forward(self, x):
    """timm's BatchNormAct2d (BN, then its drop and act) as one fastnets batch_norm pass with
    the activation fused."""
    return fnn.BatchNorm2d.forward(self, x, activation=self._fastnets_act)


def _bn_act_modules(model: nn.Module) -> list[Match]:
    return [Match((name,), fnn.fused_activation_name(m.act)) for name, m in model.named_modules()
            if type(m).__name__ == "BatchNormAct2d" and isinstance(m, nn.BatchNorm2d)
            and isinstance(getattr(m, "drop", None), nn.Identity)
            and fnn.fused_activation_name(getattr(m, "act", None)) in ops.batchnorm.ACTIVATIONS]


def _convert_bn_act(model: nn.Module, match: Match) -> dict:
    m = model.get_submodule(match.names[0])
    m.__class__ = patched_class(type(m), _bn_act_forward, sys.modules[__name__], _fastnets_act=match.info,
                                negative_slope=getattr(m.act, "negative_slope", 0.01))
    return {match.names[0]: {}}


def _activation_forward(self, input):
    """Another library's activation class (transformers' GELUActivation, timm's GELU, ...)
    on fastnets' activation kernel."""
    if not input.is_floating_point():
        return type(self).__bases__[0].forward(self, input)
    return ops.bias_act(input, None, self._fastnets_act)


def _activation_modules(model: nn.Module) -> list[Match]:
    out = []
    for name, m in model.named_modules():
        if type(m).__module__.startswith(("fastnets.", "torch.")) or _records(m) or list(m.children()):
            continue
        act = fnn.fused_activation_name(m)
        if act not in (None, "identity"):
            out.append(Match((name,), act))
    return out


def _convert_activation(model: nn.Module, match: Match) -> dict:
    m = model.get_submodule(match.names[0])
    m.__class__ = patched_class(type(m), _activation_forward, sys.modules[__name__], _fastnets_act=match.info)
    return {match.names[0]: {}}


def _is_conv_weight(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    return isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and name == "weight" and p.dim() == 4


def _to_layout(value, memory_format):
    """4-D floating tensors in `value` (a tensor, or one level of tuple / list / dict, such
    as a transformers or diffusers output) in `memory_format`; everything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 4 and value.is_floating_point():
            return value.contiguous(memory_format=memory_format)
        return value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_to_layout(v, memory_format) for v in value)
    if isinstance(value, dict):
        for k in list(value.keys()):
            value[k] = _to_layout(value[k], memory_format)
    return value


def _channels_last_inputs(module, args, kwargs):
    return _to_layout(tuple(args), torch.channels_last), {k: _to_layout(v, torch.channels_last)
                                                          for k, v in kwargs.items()}


def _contiguous_outputs(module, args, kwargs, output):
    return _to_layout(output, torch.contiguous_format)


def _install_channels_last(model: nn.Module, match: Match) -> dict:
    """The layout policy: every 4-D conv weight becomes channels_last once (same Parameter
    objects, data re-laid), the model's 4-D inputs are made channels_last on the way in and its
    4-D outputs contiguous on the way out. Between, fastnets' convolutions, norms, pools and
    pointwise kernels keep the layout of their input, so an NCHW model pays one conversion at
    each end instead of one around every convolution (weights included)."""
    params = []
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if _is_conv_weight(module, name, p) and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
                    params.append(f"{mod_name}.{name}" if mod_name else name)
    pre = model.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
    post = model.register_forward_hook(_contiguous_outputs, with_kwargs=True)
    return {"": {"params": params, "hooks": (pre.id, post.id)}}


def _revert_channels_last(model: nn.Module, saved: dict) -> None:
    pre, post = saved["hooks"]
    model._forward_pre_hooks.pop(pre, None)
    model._forward_pre_hooks_with_kwargs.pop(pre, None)
    model._forward_hooks.pop(post, None)
    model._forward_hooks_with_kwargs.pop(post, None)
    with torch.no_grad():
        for name in saved["params"]:
            p = model.get_parameter(name)
            p.data = p.data.contiguous()


def _functional_root(model: nn.Module) -> list[Match]:
    return [Match(("",))]


def _install_functional(model: nn.Module, match: Match) -> dict:
    return {"": intercept.install(model)}


RULES: list[Rule] = [
    CONV_BN_RULE,
    class_rule(nn.ReLU, fnn.ReLU),
    class_rule(nn.LeakyReLU, fnn.LeakyReLU),
    class_rule(nn.GELU, fnn.GELU),
    class_rule(nn.SiLU, fnn.SiLU),
    class_rule(nn.Tanh, fnn.Tanh),
    class_rule(nn.Sigmoid, fnn.Sigmoid),
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
    class_rule(nn.MultiheadAttention, fnn.MultiheadAttention,
               note="the output on the flash kernels; with need_weights=True (torch's default) the weights it "
                    "returns are formed beside it by torch's softmax"),
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
    Rule("torch.subclass", _same_forward_subclasses, _convert_subclass,
         target="the fastnets module of its torch base class",
         note="a subclass that keeps its base's forward (weight norm's parametrized conv, ...)"),
    Rule("activation", _activation_modules, _convert_activation, target="fastnets activation kernel",
         note="another library's activation class, recognised by fastnets.nn.fused_activation_name"),
    Rule("bn_act", _bn_act_modules, _convert_bn_act, target="fastnets batch_norm with the activation fused"),
    Rule("norm.by_behaviour", _norms_by_behaviour, _convert_norm, target="fastnets rms_norm / layer_norm",
         note="a norm recognised by what it computes on a probe input (RMSNorm, LayerNorm, channels-first "
              "LayerNorm2d)"),
    Rule("layout.channels_last", _functional_root, _install_channels_last, _revert_channels_last,
         target="channels_last convolution weights and activations", changes_class=False, opt_in="channels_last",
         note="conv weights re-laid channels_last once; 4-D inputs converted on the way in, 4-D outputs back to "
              "contiguous on the way out"),
    Rule("functional", _functional_root, _install_functional, lambda m, saved: intercept.uninstall(m, saved),
         target="FunctionalMode around the forward (inline F.* calls on fastnets ops)", changes_class=False,
         opt_in="functional",
         note="inline calls of F.scaled_dot_product_attention, F.cross_entropy, F.layer_norm, F.group_norm, "
              "F.batch_norm, F.conv2d, pools and activations run on fastnets ops"),
]


# The last rules of the table: they match by structure or behaviour what no named rule did, so
# the libraries' own rules (registered later) come before them.
_FALLBACK_RULES = ("torch.subclass", "activation", "bn_act", "norm.by_behaviour", "layout.channels_last",
                   "functional")


def register_rule(rule: Rule, *, before: Optional[str] = None) -> None:
    """Add a rule (replacing one of the same name), before the rule named `before`, or
    else before the fallback rules (matching by structure or behaviour) at the table's end."""
    RULES[:] = [r for r in RULES if r.name != rule.name]
    anchor = before or _FALLBACK_RULES[0]
    at = next((i for i, r in enumerate(RULES) if r.name == anchor), len(RULES))
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
    # (qualified name, class, category, why): work in a category fastnets has kernels for
    # (convolution, attention, norm, pooling, recurrent, activation, loss) left on torch
    uncovered: list = dataclasses.field(default_factory=list)
    covered: set = dataclasses.field(default_factory=set)     # names covered without a change (rule.covers)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.skipped)}"]
        lines += [f"  swapped {name or '<root>'}: {a} -> {b}" for name, a, b, _ in self.replaced]
        lines += [f"  left    {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        lines += [f"  fused   {c} -> {b}" + (f" -> {r}" if r else "") + " (eval mode)" for c, b, r in self.fused]
        lines += [f"  note    {name or '<root>'} [{rule}]: {note}" for name, rule, note in self.notes]
        if self.uncovered:
            lines.append(f"uncovered: {len(self.uncovered)} module(s) whose work stays on torch")
            lines += [f"  torch   {name or '<root>'} ({cls}, {category}): {why}"
                      for name, cls, category, why in self.uncovered]
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


def swap(model: nn.Module, *, include=None, exclude=None, fuse: bool = True, functional: bool = False,
         memory_format=None, strict: bool = False) -> SwapReport:
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

    functional: also run the model's forward inside fastnets.intercept.FunctionalMode, so
    work done by inline calls (F.scaled_dot_product_attention in timm's Attention, the
    CrossEntropyLoss T5 and Whisper build inside forward, F.gelu in diffusers' GEGLU) runs on
    fastnets ops too. Off by default: the mode sees every torch call of the forward, a few
    microseconds of Python each.

    memory_format: None (default: weights and activations keep their layout) or
    "channels_last" / torch.channels_last: the layout policy for CNNs written in NCHW. Every
    conv weight is re-laid channels_last once and the model's 4-D inputs and outputs are
    converted at its boundary, so fastnets' convolutions never convert a layout inside the
    model (an NCHW model otherwise pays a copy of every activation and weight around every
    convolution). unswap() lays the weights out contiguously again.

    strict: raise ValueError when the report lists uncovered modules (work in a category
    fastnets has kernels for that stays on torch), after undoing the swap.
    """
    for sel in list(include or ()) + list(exclude or ()):
        _matches(sel, "", model, RULES[0])   # validates the selector types up front
    report = SwapReport(model)
    if memory_format not in (None, "channels_last", torch.channels_last):
        raise ValueError(f"swap: memory_format must be None or 'channels_last', got {memory_format!r}")
    options = {"functional": functional, "channels_last": memory_format is not None}
    for rule in RULES:
        if (rule.fusion and not fuse) or (rule.opt_in is not None and not options.get(rule.opt_in)):
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
            if rule.covers is not None:
                report.covered.update(rule.covers(model, match))
        if rule.misses is not None:
            report.uncovered.extend(rule.misses(model))
    _list_subclasses(model, report)
    _list_uncovered(model, report, functional)
    if memory_format is None and any(_is_conv_weight(m, n, p) and not p.is_contiguous(memory_format=torch.channels_last)
                                     for m in model.modules() if type(m).__module__.startswith("fastnets.")
                                     for n, p in m.named_parameters(recurse=False)):
        report.notes.append(("", "layout.channels_last", "NCHW convolution weights: each fastnets convolution "
                             "converts layouts; swap(model, memory_format='channels_last') converts once"))
    if strict and report.uncovered:
        unswap(model)
        raise ValueError("swap(strict=True): work fastnets has kernels for would stay on torch in:\n" + "\n".join(
            f"  {name or '<root>'} ({cls}, {category}): {why}" for name, cls, category, why in report.uncovered))
    return report


# Work categories fastnets has kernels for, by torch base class and, for other libraries'
# modules, by class name. A module of such a class that no rule converted is "uncovered".
_CATEGORY_BASES = (
    (nn.modules.conv._ConvNd, "convolution"),
    (nn.modules.batchnorm._NormBase, "norm"), (nn.LayerNorm, "norm"), (nn.GroupNorm, "norm"), (nn.RMSNorm, "norm"),
    (nn.modules.pooling._MaxPoolNd, "pooling"), (nn.modules.pooling._AvgPoolNd, "pooling"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "pooling"), (nn.modules.pooling._AdaptiveMaxPoolNd, "pooling"),
    (nn.modules.rnn.RNNBase, "recurrent"), (nn.modules.rnn.RNNCellBase, "recurrent"),
    (nn.MultiheadAttention, "attention"), (nn.modules.loss._Loss, "loss"),
    (nn.ReLU, "activation"), (nn.ReLU6, "activation"), (nn.LeakyReLU, "activation"), (nn.GELU, "activation"),
    (nn.SiLU, "activation"), (nn.Tanh, "activation"), (nn.Sigmoid, "activation"), (nn.Hardswish, "activation"),
    (nn.Hardsigmoid, "activation"), (nn.Mish, "activation"), (nn.ELU, "activation"), (nn.Softmax, "attention"),
)
_CATEGORY_NAMES = (("Attention", "attention"), ("RMSNorm", "norm"), ("LayerNorm", "norm"), ("GroupNorm", "norm"),
                   ("BatchNorm", "norm"), ("Norm", "norm"), ("Activation", "activation"), ("GELU", "activation"),
                   ("SiLU", "activation"), ("Swish", "activation"), ("ReLU", "activation"), ("Conv", "convolution"),
                   ("Pool", "pooling"), ("LSTM", "recurrent"), ("GRU", "recurrent"), ("Loss", "loss"))
# Categories with no fastnets kernel for that exact function: said in the report's reason.
_NO_KERNEL = {nn.ReLU6: "ReLU6 (clamped)", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
              nn.Mish: "mish", nn.ELU: "elu", nn.Softmax: "a standalone softmax"}


# Named like a category, but a GEMM: transformers' Conv1D is GPT-2's linear layer.
_NOT_A_CATEGORY = {("transformers.pytorch_utils", "Conv1D")}


def _category(module: nn.Module) -> Optional[str]:
    for base, category in _CATEGORY_BASES:
        if isinstance(module, base):
            return category
    cls = type(module)
    if (cls.__module__, cls.__name__) in _NOT_A_CATEGORY:
        return None
    return next((category for key, category in _CATEGORY_NAMES if key in cls.__name__), None)


_INLINE: dict = {}


def _calls_intercepted(cls: type) -> bool:
    """Whether cls.forward calls one of the functions FunctionalMode routes (by name in its
    source): with swap(functional=True) such a module's work runs on fastnets ops."""
    if cls not in _INLINE:
        import inspect
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        names = {getattr(f, "__name__", "") for f in intercept.FUNCTIONS}
        _INLINE[cls] = any(f"{n}(" in source for n in names if n)
    return _INLINE[cls]


def _list_uncovered(model: nn.Module, report: "SwapReport", functional: bool) -> None:
    """Every module whose work falls in a category fastnets has kernels for, left on torch:
    not converted, not a fastnets module, not under a converted module (whose forward no
    longer calls it) and not covered otherwise (an attention implementation a rule set)."""
    done = {name for name, m in model.named_modules() if _records(m) or type(m).__module__.startswith("fastnets.")}
    # A module whose forward a rule replaced may no longer call its children (GPT-2's MLP
    # never calls its `act`): what it still calls is converted or listed on its own.
    rewritten = [name for name, m in model.named_modules()
                 if any(_rule_replaces_forward(r) for r in _records(m)) and list(m.children())]
    skipped = {name: why for name, _, why in report.skipped}
    for name, module in model.named_modules():
        if name in done or name in report.covered or any(d == "" or name.startswith(d + ".") for d in rewritten):
            continue
        category = _category(module)
        if category is None or (functional and _calls_intercepted(type(module))):
            continue
        if list(module.children()) and any(_category(c) for c in module.modules() if c is not module):
            continue   # a container: its children are listed themselves
        why = skipped.get(name)
        if why is None:
            cls = type(module)
            kernel = next((what for base, what in _NO_KERNEL.items() if isinstance(module, base)), None)
            if kernel is not None:
                why = f"fastnets has no {kernel} kernel"
            elif not functional and not list(module.children()):
                why = "no swap rule matches this class (if its forward calls F.* inline, swap(functional=True) covers it)"
            else:
                why = "no swap rule matches this class"
        report.uncovered.append((name, type(module).__name__, category, why))


def _rule_replaces_forward(record: SwapRecord) -> bool:
    try:
        rule = _rule(record.rule)
    except KeyError:
        return False
    return rule.changes_class and rule.replaces_forward


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
            why = (f"subclass of {base.__name__} with its own forward" if cls.forward is not base.forward else
                   f"subclass of {base.__name__} redefining {', '.join(_overrides(cls, base))}")
            report.skipped.append((name, cls.__name__, why))


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
