"""Inline functional calls onto fastnets ops: the one table, and the TorchFunctionMode that
applies it around a swapped model's forward.

Module rules (fastnets.swap) cover work a model does through its submodules. Some models do
it inline instead: T5 and Whisper build `CrossEntropyLoss()` inside `forward`, timm's
`Attention` calls `F.scaled_dot_product_attention`, diffusers' `GEGLU` calls `F.gelu`. For
those, `swap(model, functional=True)` registers a forward pre-hook / hook pair on the model
that enters `FunctionalMode` for the duration of its forward, and `unswap()` removes both.

The mode sees every torch function call made in the forward. Calls to a function in
FUNCTIONS go to the fastnets op with the same signature; everything else passes through
untouched. Arguments fastnets does not take (probability targets, in-place activations,
integer tensors, ...) run torch's function and say so once (fastnets' fallback warning,
naming the function and why). Calls made inside a fastnets op run with the mode off (a
TorchFunctionMode is popped while its handler runs), so nothing recurses.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _dispatch, ops


def _floating(*tensors) -> Optional[str]:
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            return f"{t.dtype} input"
    return None


def _activation(name: str):
    def handler(args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if kwargs.get("inplace") or (len(args) > 1 and args[1] is True):
            return None, "inplace=True"
        if not isinstance(x, torch.Tensor) or _floating(x):
            return None, "a non-floating input"
        return ops.bias_act(x, None, name), None
    return handler


def _gelu(args, kwargs):
    x = args[0] if args else kwargs["input"]
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    if _floating(x):
        return None, "a non-floating input"
    return ops.bias_act(x, None, "gelu_tanh" if approximate == "tanh" else "gelu"), None


def _leaky_relu(args, kwargs):
    x = args[0] if args else kwargs["input"]
    slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
    if kwargs.get("inplace") or (len(args) > 2 and args[2]):
        return None, "inplace=True"
    if _floating(x):
        return None, "a non-floating input"
    return ops.bias_act(x, None, "leaky_relu", negative_slope=slope), None


def _cross_entropy(args, kwargs):
    logits = args[0] if args else kwargs["input"]
    target = args[1] if len(args) > 1 else kwargs["target"]
    if target.is_floating_point():
        return None, "probability targets"
    if logits.dim() != 2 or target.dim() != 1:
        return None, f"{logits.dim()}-D logits (fastnets takes (N, C))"
    return ops.cross_entropy(*args, **kwargs), None


def _same_signature(op: Callable, check: Optional[Callable] = None):
    def handler(args, kwargs):
        why = check(args, kwargs) if check else None
        if why is None:   # the input (a bool attn_mask or int64 running count may follow)
            why = _floating(args[0] if args else kwargs.get("input", kwargs.get("query")))
        if why is not None:
            return None, why
        return op(*args, **kwargs), None
    return handler


def _four_d(args, kwargs):
    x = args[0] if args else kwargs["input"]
    return None if x.dim() in (3, 4) else f"a {x.dim()}-D input"


def _batch_norm_4d(args, kwargs):
    x = args[0] if args else kwargs["input"]
    return None if x.dim() == 4 else f"a {x.dim()}-D input (fastnets' batch_norm is BatchNorm2d's)"


def _conv2d_check(args, kwargs):
    x = args[0] if args else kwargs["input"]
    return None if x.dim() in (3, 4) else f"a {x.dim()}-D input"


def _sdpa_check(args, kwargs):
    q = args[0] if args else kwargs["query"]
    return None if q.dim() >= 3 else f"a {q.dim()}-D query"


# The one table: torch function -> (handler, the fastnets op it runs, by its dispatch name). A handler returns
# (result, None), or (None, why) to run torch's function.
FUNCTIONS: dict = {
    F.scaled_dot_product_attention: (_same_signature(ops.scaled_dot_product_attention, _sdpa_check), "scaled_dot_product_attention"),
    F.cross_entropy: (_cross_entropy, "cross_entropy"),
    F.layer_norm: (_same_signature(ops.layer_norm), "layer_norm"),
    F.group_norm: (_same_signature(ops.group_norm), "group_norm"),
    F.batch_norm: (_same_signature(ops.batch_norm, _batch_norm_4d), "batch_norm"),
    F.conv2d: (_same_signature(ops.conv2d, _conv2d_check), "conv2d"),
    F.max_pool2d: (_same_signature(ops.max_pool2d, _four_d), "max_pool2d"),
    F.avg_pool2d: (_same_signature(ops.avg_pool2d, _four_d), "avg_pool2d"),
    F.adaptive_avg_pool2d: (_same_signature(ops.adaptive_avg_pool2d, _four_d), "adaptive_avg_pool2d"),
    F.gelu: (_gelu, "bias_act"),
    F.silu: (_activation("silu"), "bias_act"),
    F.relu: (_activation("relu"), "bias_act"),
    torch.relu: (_activation("relu"), "bias_act"),
    F.leaky_relu: (_leaky_relu, "bias_act"),
}
if hasattr(F, "rms_norm"):
    FUNCTIONS[F.rms_norm] = (_same_signature(ops.rms_norm), "rms_norm")


class FunctionalMode(TorchFunctionMode):
    """Routes the torch functions in FUNCTIONS to fastnets ops (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = FUNCTIONS.get(func)
        if entry is not None:
            handler, op = entry
            result, why = handler(args, kwargs)
            if why is None:
                return result
            _dispatch.fallback(op, f"{getattr(func, '__name__', func)} called inline with {why}: torch's ran")
        return func(*args, **kwargs)


_MODE = "_fastnets_functional_mode"


def _enter(module, args, kwargs=None):
    mode = FunctionalMode()
    module.__dict__.setdefault(_MODE, []).append(mode)
    mode.__enter__()


def _exit(module, args, output, kwargs=None):
    stack = module.__dict__.get(_MODE)
    if stack:
        stack.pop().__exit__(None, None, None)


def install(module: torch.nn.Module) -> dict:
    """Hooks that run `module`'s forward inside FunctionalMode; returns what uninstall needs."""
    pre = module.register_forward_pre_hook(_enter)
    post = module.register_forward_hook(_exit, always_call=True)
    return {"hooks": (pre.id, post.id)}


def uninstall(module: torch.nn.Module, saved: dict) -> None:
    pre, post = saved["hooks"]
    module._forward_pre_hooks.pop(pre, None)
    module._forward_hooks.pop(post, None)
    module._forward_hooks_always_called.pop(post, None)
    module.__dict__.pop(_MODE, None)
