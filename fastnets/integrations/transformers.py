"""Hugging Face transformers on fastnets kernels, as swap rules.

    fastnets.swap(model)            # attention, norms, MLPs and the loss on fastnets kernels
    fastnets.unswap(model)          # and off again, exactly
    # or piecewise:
    from fastnets.integrations.transformers import register, apply_fastnets
    register()                      # adds attn_implementation="fastnets"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastnets")
    apply_fastnets(model, mlp=False)   # swap() restricted to these rule groups

The rules (RULES below, registered into fastnets.swap at import) match transformers'
modules by structure or class name; none imports transformers until it matches one of its
modules. transformers is optional: importing this module works without it, and register() /
apply_fastnets() raise a clear ImportError when it is missing or too old (the attention
registry appeared in transformers 4.48).
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..swap import Match, Rule, patched_class, register_rule, swap
from ..nn import fused_activation_name

NAME = "fastnets"


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as err:  # missing, or older than the attention registry
        raise ImportError("fastnets.integrations.transformers needs transformers >= 4.48 "
                          "(pip install 'transformers>=4.48')") from err
    return transformers, AttentionInterface


def fastnets_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               position_bias: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, Sq, D), key / value
    (B, Hkv, Sk, D) (GQA read in place, never repeated), attention_mask bool (True = attend)
    or additive, or None. Returns ((B, Sq, H, D), None): attention weights are never formed."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fastnets attention does not support softcap; use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        raise ValueError("fastnets attention never forms the attention matrix; output_attentions=True needs "
                         "attn_implementation='eager'")
    mask = attention_mask
    if mask is not None and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., :key.shape[-2]]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: causality from the flag only when the model built no mask
    # (its mask function returns None for a purely causal pattern) and this is not a single
    # decoding query; top-left alignment (keys past Sq are empty static-cache slots). This is
    # decided from the model's mask alone, before a position bias (T5's relative bias, MPT's
    # ALiBi) is merged in: the bias adds to the scores, it never stands in for the mask, and
    # the kernel takes the causal flag and the additive bias together.
    causal = "top_left" if (attention_mask is None and is_causal and query.shape[2] > 1) else False
    if position_bias is not None:
        bias = position_bias[..., :key.shape[-2]]
        if mask is not None and mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias if mask is None else bias + mask
    out = ops.flash_attention(query, key, value, causal=causal, scale=scaling, attn_mask=mask,
                              dropout_p=dropout)
    return out.transpose(1, 2), None


def register() -> None:
    """Make attn_implementation="fastnets" available to every transformers model that uses
    the attention-function registry (GPT-2, BERT, Llama, Mistral, Qwen, ... in recent versions)."""
    _, AttentionInterface = _transformers()
    AttentionInterface.register(NAME, fastnets_attention_forward)
    try:  # transformers >= 4.53 also looks the mask builder up by implementation name
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionMaskInterface.register(NAME, sdpa_mask)
    except ImportError:
        pass


# --- the rules -------------------------------------------------------------------------------------

def _from_transformers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.")


def _rms_forward(self, hidden_states: Tensor) -> Tensor:
    """RMSNorm on fastnets' rms_norm kernel (Gemma's (1 + w) as offset=1)."""
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return ops.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, eps, offset=self._fastnets_offset)


def _gate_up(self) -> tuple:
    """[gate | up] weight (and bias), concatenated. With autograd recording (training) it is
    rebuilt every call, so gradients reach both projections; in inference (generation, one
    token a step) it is kept until a weight changes (their version counters say so), in a
    `_fastnets_` entry that unswap() drops."""
    tensors = (self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias)
    cacheable = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    key = tuple(None if t is None else (id(t), t._version) for t in tensors)
    cached = self.__dict__.get("_fastnets_gate_up")
    if cacheable and cached is not None and cached[0] == key:
        return cached[1]
    w = torch.cat(tensors[:2], 0)
    b = torch.cat(tensors[2:], 0) if tensors[2] is not None else None
    if cacheable:
        self.__dict__["_fastnets_gate_up"] = (key, (w, b))
    return w, b


def _gated_mlp_forward(self, x: Tensor) -> Tensor:
    """[gate | up] from one GEMM, then act(gate) * up in one pass (SwiGLU / GeGLU)."""
    w, b = _gate_up(self)
    return self.down_proj(ops.bias_act(F.linear(x, w), b, self._fastnets_act))


def _gpt2_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """GPT-2's MLP: the fc bias and GELU (tanh) fused after the GEMM (Conv1D: (in, out) weight)."""
    h = ops.bias_act(hidden_states @ self.c_fc.weight, self.c_fc.bias, "gelu_tanh")
    return self.dropout(self.c_proj(h))


def _bert_intermediate_forward(self, hidden_states: Tensor) -> Tensor:
    """BERT's intermediate: the dense bias and GELU fused after the GEMM."""
    return ops.bias_act(F.linear(hidden_states, self.dense.weight), self.dense.bias, self._fastnets_act)


def _clip_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """CLIP's (and SigLIP's) MLP: fc1's bias and quick-GELU / GELU fused after the GEMM."""
    return self.fc2(ops.bias_act(F.linear(hidden_states, self.fc1.weight), self.fc1.bias, self._fastnets_act))


def _clip_model_forward(self, *args, return_loss=None, **kwargs):
    """CLIPModel / SiglipModel.forward with the contrastive loss on fastnets' tiled clip_loss
    (the same loss on the same normalised embeddings, scale and, for SigLIP, bias)."""
    out = type(self).__bases__[0].forward(self, *args, return_loss=False, **kwargs)
    if return_loss:
        if self._fastnets_sigmoid:
            out.loss = ops.clip_loss(out.image_embeds, out.text_embeds, self.logit_scale.exp(), self.logit_bias,
                                     kind="sigmoid")
        else:
            out.loss = ops.clip_loss(out.image_embeds, out.text_embeds, self.logit_scale.exp())
    return out


_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}



def _find(model: nn.Module, pred) -> list:
    return [Match((name,)) for name, m in model.named_modules() if _from_transformers(m) and pred(m)]


def _reclass(model: nn.Module, match, forward, **attrs) -> dict:
    m = model.get_submodule(match.names[0])
    m.__class__ = patched_class(type(m), forward, sys.modules[__name__], **attrs)
    return {match.names[0]: {}}


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)


def _is_gated_mlp(m: nn.Module) -> bool:
    return (all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj"))
            and fused_activation_name(getattr(m, "act_fn", None)) in _GATED)


def _top_models(model: nn.Module) -> list:
    """The outermost transformers PreTrainedModels in `model` (the attention implementation
    and the loss are set on them)."""
    out = []
    for name, m in model.named_modules():
        if (_from_transformers(m) and hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
                and not any(name.startswith(p + ".") or p == "" for p in out)):
            out.append(name)
    return [Match((n,)) for n in out]


def _attention_modules(model: nn.Module, match) -> list:
    """The attention modules under a model whose attention implementation is now fastnets'
    (they call transformers' attention-function registry)."""
    top = match.names[0]
    root = model.get_submodule(top)
    prefix = f"{top}." if top else ""
    return [prefix + name for name, m in root.named_modules()
            if _from_transformers(m) and "Attention" in type(m).__name__]


def _set_attention(model: nn.Module, impl) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:   # transformers before set_attn_implementation: every config carries it
        for m in model.modules():
            if hasattr(getattr(m, "config", None), "_attn_implementation"):
                m.config._attn_implementation = impl


def _attention_convert(model: nn.Module, match) -> dict:
    register()
    m = model.get_submodule(match.names[0])
    saved = {"attn_implementation": m.config._attn_implementation}
    _set_attention(m, NAME)
    return {match.names[0]: saved}


def _loss_kind(m: nn.Module) -> Optional[str]:
    if not hasattr(type(m), "loss_function"):
        return None
    cls = type(m).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal"
    if cls.endswith("ForMaskedLM"):
        return "masked"
    if any(cls.endswith(k) for k in ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification",
                                       "ForVideoClassification")):
        return "sequence"
    return "token" if cls.endswith("ForTokenClassification") else None


def _loss_convert(model: nn.Module, match) -> dict:
    m = model.get_submodule(match.names[0])
    saved = {"had": "_loss_function" in m.__dict__, "loss_function": m.__dict__.get("_loss_function")}
    m.loss_function = _LOSSES[_loss_kind(m)]
    return {match.names[0]: saved}


def _loss_revert(m: nn.Module, saved: dict) -> None:
    if saved["had"]:
        m.__dict__["_loss_function"] = saved["loss_function"]
    else:
        m.__dict__.pop("_loss_function", None)


# --- rotary embeddings, through the kernels package's per-instance function hook -----------------
#
# transformers' attention modules call a module-level apply_rotary_pos_emb(q, k, cos, sin).
# With Hugging Face's `kernels` package installed (transformers >= 5 depends on it) that
# function is a hub "Func" and each attention instance owns a private wrapper of it
# (`module._kernel_funcs["rotary_pos_emb"]`, from @use_kernelized_func), which the call
# is routed to while that instance's forward runs (eager and torch.compile): the
# transformers-native place to plug a kernel in, per instance and reversibly. The rule sets
# the wrapper's forward, as `kernels.kernelize` does, and unswap() removes it.

# The wrappers' keys: the function's __name__ or, for a hub Func (which has none), its
# kernel layer name (transformers names it "rotary_pos_emb").
_ROTARY_FUNCS = ("rotary_pos_emb", "apply_rotary_pos_emb")
_ROTARY_SPECS: dict = {}   # the original function -> what _probe_rotary found (None: not rotary)
# The hub Func class -> (its function, spec): what the forward looks up at run time, keyed by
# a class so torch.compile traces the lookup as a constant (a closure cell would break the graph).
_ROTARY_BY_CLASS: dict = {}


def _hub_func_original(wrapper) -> Optional[object]:
    """The plain function a kernels-hub Func module wraps (held in its forward's closure)."""
    fwd = getattr(type(wrapper), "forward", None)
    for name, cell in zip(getattr(getattr(fwd, "__code__", None), "co_freevars", ()), getattr(fwd, "__closure__", None) or ()):
        if name == "func":
            return cell.cell_contents
    return None


def _rotary_reference(q, cos, sin, interleaved: bool, unsqueeze_dim: int):
    """transformers' q * cos + rotate_half(q) * sin on the first R dims (R = cos's last dim)."""
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    R = cos.shape[-1]
    rot, rest = q[..., :R], q[..., R:]
    if interleaved:
        half = torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2)
    else:
        half = torch.cat((-rot[..., R // 2:], rot[..., :R // 2]), -1)
    return torch.cat((rot * c + half * s, rest), -1)


def _probe_rotary(func) -> Optional[dict]:
    """What a model's apply_rotary_pos_emb computes, found by running it (float64, random
    tables whose halves differ, so every entry's role is pinned down): half-split or
    interleaved pairs, whether a table narrower than the head rotates only its first dims
    (partial rotary) and whether it takes unsqueeze_dim=2 ((B, S, H, D) inputs). None when it
    is neither form or takes arguments fastnets does not know."""
    if func in _ROTARY_SPECS:
        return _ROTARY_SPECS[func]
    spec = None
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    rest = params[4:]
    if len(params) >= 4 and all(p.default is not inspect.Parameter.empty for p in rest) and {
            p.name for p in rest} <= {"position_ids", "unsqueeze_dim"}:
        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(2, 2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
        cos, sin = (torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))

        def matches(c, s, interleaved, dim=1, q=q, k=k):
            try:
                with torch.no_grad():
                    got = func(q, k, c, s) if dim == 1 else func(q, k, c, s, unsqueeze_dim=dim)
                return all(torch.allclose(g, _rotary_reference(t, c, s, interleaved, dim))
                           for g, t in zip(got, (q, k)))
            except Exception:   # another shape contract or another formula: not this form
                return False

        for interleaved in (False, True):
            if matches(cos, sin, interleaved):
                spec = {"interleaved": interleaved, "partial": matches(cos[..., :4], sin[..., :4], interleaved),
                        "unsqueeze_dim": "unsqueeze_dim" in {p.name for p in rest} and matches(
                            cos, sin, interleaved, 2, q=q.transpose(1, 2), k=k.transpose(1, 2)),
                        "signature": inspect.signature(func)}
                break
    _ROTARY_SPECS[func] = spec
    return spec


def _fastnets_rotary_forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs):
    """apply_rotary_pos_emb on fastnets' rope kernel (one pass each for q and k, the tables as
    transformers built them: tables="full"). Anything else (other table shapes, dtypes that
    would promote, tables that need a gradient) goes to the model's own function. `self` is
    the instance's wrapper or, under torch.compile, the module-level Func: nothing is read
    from it but the function it wraps."""
    entry = _ROTARY_BY_CLASS.get(type(self))
    if entry is None:   # a model swapped in another process and unpickled here
        func = _hub_func_original(self)
        entry = _ROTARY_BY_CLASS[type(self)] = (func, _probe_rotary(func))
    func, spec = entry
    unsqueeze_dim = 1
    if args or kwargs:
        bound = spec["signature"].bind(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = bound.arguments.get("unsqueeze_dim", 1)
    R = cos.shape[-1] if cos.dim() else 0
    ok = (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape and q.is_floating_point()
          and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.device == q.device == k.device
          and (unsqueeze_dim == 1 or (unsqueeze_dim == 2 and spec["unsqueeze_dim"])) and R > 0 and R % 2 == 0
          and (R == q.shape[-1] or (spec["partial"] and R < q.shape[-1])) and q.shape[-1] == k.shape[-1]
          and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)))
    if not ok:
        return func(q, k, cos, sin, *args, **kwargs)
    return ops.rope(q, k, cos, sin, spec["interleaved"], layout="bhsd" if unsqueeze_dim == 1 else "bshd",
                    tables="full")


def _rotary_wrappers(m: nn.Module) -> dict:
    """{function name: the instance's hub wrapper} for the rotary functions fastnets takes."""
    funcs = m.__dict__.get("_kernel_funcs")
    if not isinstance(funcs, dict):
        return {}
    out = {}
    for name in _ROTARY_FUNCS:
        w = funcs.get(name)
        func = _hub_func_original(w) if isinstance(w, nn.Module) and "forward" not in w.__dict__ else None
        if func is not None and _probe_rotary(func):
            _ROTARY_BY_CLASS[type(w)] = (func, _probe_rotary(func))
            out[name] = w
    return out


def _rotary_find(model: nn.Module) -> list:
    return [Match((name,)) for name, m in model.named_modules() if _from_transformers(m) and _rotary_wrappers(m)]


def _rotary_convert(model: nn.Module, match) -> dict:
    m = model.get_submodule(match.names[0])
    names = []
    for name, w in _rotary_wrappers(m).items():
        w.forward = types.MethodType(_fastnets_rotary_forward, w)
        names.append(name)
    return {match.names[0]: {"funcs": names}}


def _rotary_revert(m: nn.Module, saved: dict) -> None:
    for name in saved["funcs"]:
        m.__dict__["_kernel_funcs"][name].__dict__.pop("forward", None)


def _calls_rotary(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "apply_rotary_pos_emb(" in source


def _kernels_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("kernels") is not None


_NO_HOOK = ("its forward calls the module-level apply_rotary_pos_emb, which fastnets takes only through the kernels "
            "package's per-instance hook: {}")


def _rotary_misses(model: nn.Module) -> list:
    """Attention modules whose rotary embedding stays on torch: no per-instance hook to take
    it (the `kernels` package is not installed, or the class is not decorated), or a function
    the probe does not recognise (another formula)."""
    out = []
    for name, m in model.named_modules():
        if not _from_transformers(m):
            continue
        funcs = m.__dict__.get("_kernel_funcs")
        if funcs is None and _calls_rotary(type(m)):
            out.append((name, type(m).__name__, "rotary", _NO_HOOK.format(
                "transformers does not decorate this class with use_kernelized_func" if _kernels_installed()
                else "the kernels package is not installed (pip install kernels)")))
        elif isinstance(funcs, dict):
            for key in _ROTARY_FUNCS:
                w = funcs.get(key)
                if isinstance(w, nn.Module) and "forward" not in w.__dict__ and not _probe_rotary(
                        _hub_func_original(w)):
                    out.append((name, type(m).__name__, "rotary", f"its {key} is not transformers' rotate_half "
                                "form on a probe input (half-split or interleaved, full tables)"))
    return out


RULES = [
    Rule("transformers.attention", _top_models, _attention_convert,
               lambda m, saved: _set_attention(m, saved["attn_implementation"]),
               target='attn_implementation="fastnets"', changes_class=False, covers=_attention_modules,
               note="attention on fastnets' flash kernels (output_attentions=True and softcap raise)"),
    Rule("transformers.rotary", _rotary_find, _rotary_convert, _rotary_revert, changes_class=False,
         misses=_rotary_misses, target="fastnets rope (apply_rotary_pos_emb through the kernels hub hook)",
         note="apply_rotary_pos_emb on fastnets' rope kernel for this instance (the kernels package's hook)"),
    Rule("transformers.rms_norm", lambda model: _find(model, _is_rms_norm),
               lambda model, match: _reclass(model, match, _rms_forward, _fastnets_offset=(
                   1.0 if type(model.get_submodule(match.names[0])).__name__.startswith("Gemma") else 0.0)),
               target="fastnets rms_norm"),
    Rule("transformers.gated_mlp", lambda model: _find(model, _is_gated_mlp),
               lambda model, match: _reclass(model, match, _gated_mlp_forward, _fastnets_act=_GATED[
                   fused_activation_name(model.get_submodule(match.names[0]).act_fn)]),
               target="one GEMM + fused SwiGLU / GeGLU"),
    Rule("transformers.gpt2_mlp",
               lambda model: _find(model, lambda m: type(m).__name__ == "GPT2MLP"
                                   and fused_activation_name(m.act) == "gelu_tanh"),
               lambda model, match: _reclass(model, match, _gpt2_mlp_forward), target="fused bias + GELU"),
    Rule("transformers.bert_intermediate",
               lambda model: _find(model, lambda m: type(m).__name__ == "BertIntermediate"
                                   and fused_activation_name(m.intermediate_act_fn) in ("gelu", "gelu_tanh")),
               lambda model, match: _reclass(model, match, _bert_intermediate_forward, _fastnets_act=(
                   fused_activation_name(model.get_submodule(match.names[0]).intermediate_act_fn))),
               target="fused bias + GELU"),
    Rule("transformers.clip_mlp",
               lambda model: _find(model, lambda m: type(m).__name__ in ("CLIPMLP", "SiglipMLP")
                                   and fused_activation_name(m.activation_fn) in ("quick_gelu", "gelu", "gelu_tanh")),
               lambda model, match: _reclass(model, match, _clip_mlp_forward, _fastnets_act=(
                   fused_activation_name(model.get_submodule(match.names[0]).activation_fn))),
               target="fused bias + quick-GELU / GELU"),
    Rule("transformers.clip_loss", lambda model: _find(model, lambda m: type(m).__name__ in ("CLIPModel", "SiglipModel")),
               lambda model, match: _reclass(model, match, _clip_model_forward, _fastnets_sigmoid=(
                   type(model.get_submodule(match.names[0])).__name__ == "SiglipModel")),
               target="fastnets clip_loss (tiled; SigLIP's sigmoid for SiglipModel)", replaces_forward=False),
    Rule("transformers.loss", lambda model: [m for m in _top_models(model)
                                                    if _loss_kind(model.get_submodule(m.names[0]))],
               _loss_convert, _loss_revert, target="fastnets cross_entropy", changes_class=False),
]
for _rule in RULES:
    register_rule(_rule)

GROUPS = {"attention": ("transformers.attention", "transformers.rotary"),
          "norms": ("transformers.rms_norm", "torch.nn.modules.normalization.LayerNorm"),
          "mlp": ("transformers.gated_mlp", "transformers.gpt2_mlp", "transformers.bert_intermediate",
                  "transformers.clip_mlp", "activation"),
          "cross_entropy": ("transformers.loss", "transformers.clip_loss")}


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLM loss on fastnets' cross-entropy (no float32 copy of the logits)."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return _reduce_hf(logits, shift_labels, num_items_in_batch, ignore_index)


def masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   **kwargs) -> Tensor:
    """transformers' ForMaskedLM loss on fastnets' cross-entropy."""
    return _reduce_hf(logits.reshape(-1, vocab_size), labels.reshape(-1).to(logits.device), num_items_in_batch,
                      ignore_index)


def sequence_classification_loss(labels: Tensor, pooled_logits: Tensor, config, **kwargs) -> Tensor:
    """transformers' ForSequenceClassification / ForImageClassification loss: single-label
    classification on fastnets' cross-entropy; regression and multi-label as transformers."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss
    single = config.problem_type == "single_label_classification" or (
        config.problem_type is None and config.num_labels > 1 and labels.dtype in (torch.long, torch.int))
    if not single:
        return ForSequenceClassificationLoss(labels, pooled_logits, config, **kwargs)
    config.problem_type = "single_label_classification"   # as transformers records it
    n = config.num_labels
    return _reduce_hf(pooled_logits.view(-1, n), labels.to(pooled_logits.device).view(-1),
                      kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100))


def token_classification_loss(logits: Tensor, labels: Tensor, config, **kwargs) -> Tensor:
    """transformers' ForTokenClassification loss on fastnets' cross-entropy."""
    n = config.num_labels
    return _reduce_hf(logits.view(-1, n), labels.view(-1).to(logits.device), kwargs.get("num_items_in_batch"),
                      kwargs.get("ignore_index", -100))


def _reduce_hf(logits, target, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        return ops.cross_entropy(logits, target, ignore_index=ignore_index, out_dtype=torch.float32)
    total = ops.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum", out_dtype=torch.float32)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


_LOSSES = {"causal": causal_lm_loss, "masked": masked_lm_loss, "sequence": sequence_classification_loss,
           "token": token_classification_loss}


def apply_fastnets(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                   cross_entropy: bool = True) -> dict:
    """fastnets.swap(model) restricted to the transformers rule groups asked for (and
    LayerNorm for norms); unswap() undoes it. Returns {group: [qualified module names]}.

    - attention: attn_implementation "fastnets" (registered on first use);
    - norms: LayerNorm -> fastnets.nn.LayerNorm; *RMSNorm modules (Llama, Mistral, Qwen;
      Gemma's 1 + weight convention) -> fastnets rms_norm;
    - mlp: gated MLPs (gate_proj / up_proj / down_proj with SiLU or GELU) as one GEMM + a
      fused SwiGLU / GeGLU; GPT-2's MLP, BERT's intermediate and CLIP / SigLIP's MLP with a
      fused bias + GELU / quick-GELU;
    - cross_entropy: the causal-LM / masked-LM loss on fastnets' cross-entropy; CLIPModel's
      contrastive loss on fastnets' tiled clip_loss.
    """
    _transformers()
    wanted = {"attention": attention, "norms": norms, "mlp": mlp, "cross_entropy": cross_entropy}
    include = [rule for group, on in wanted.items() if on for rule in GROUPS[group]]
    report = swap(model, include=include, fuse=False)
    done: dict = {group: [] for group in GROUPS}
    for name, _, _, rule in report.replaced:
        group = next(g for g, rules in GROUPS.items() if rule in rules)
        done[group].append(name)
    return done
