"""Hugging Face transformers on fastnets kernels.

    from fastnets.integrations.transformers import register, apply_fastnets
    register()                                   # adds attn_implementation="fastnets"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastnets")
    apply_fastnets(model)                        # norms, MLPs and the loss too (Liger-style)

transformers is optional: importing this module works without it, and register() /
apply_fastnets() raise a clear ImportError when it is missing or too old (the attention
registry appeared in transformers 4.48).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

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
    if position_bias is not None:
        bias = position_bias[..., :key.shape[-2]]
        if mask is not None and mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias if mask is None else bias + mask
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the causal flag only when no mask was built and this is not
    # a single decoding query; top-left alignment (keys past Sq are empty static-cache slots).
    causal = "top_left" if (mask is None and is_causal and query.shape[2] > 1) else False
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


# --- the Liger-style patcher ----------------------------------------------------------------------

def _rms_forward(self, hidden_states: Tensor) -> Tensor:
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return ops.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, eps, offset=self._fastnets_offset)


def _gated_mlp_forward(self, x: Tensor) -> Tensor:
    # [gate | up] from one GEMM, then silu(gate) * up in one pass.
    w = torch.cat((self.gate_proj.weight, self.up_proj.weight), 0)
    b = (torch.cat((self.gate_proj.bias, self.up_proj.bias), 0) if self.gate_proj.bias is not None else None)
    return self.down_proj(ops.bias_act(F.linear(x, w), b, self._fastnets_act))


def _gpt2_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    h = ops.bias_act(hidden_states @ self.c_fc.weight, self.c_fc.bias, "gelu_tanh")   # Conv1D: (in, out) weight
    return self.dropout(self.c_proj(h))


def _bert_intermediate_forward(self, hidden_states: Tensor) -> Tensor:
    return ops.bias_act(F.linear(hidden_states, self.dense.weight), self.dense.bias, self._fastnets_act)


def _act_name(act: nn.Module) -> Optional[str]:
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name in ("GELUActivation",) or (name == "GELU" and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh") or (
            name == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_tanh"
    return None


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


def _reduce_hf(logits, target, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        return ops.cross_entropy(logits, target, ignore_index=ignore_index, out_dtype=torch.float32)
    total = ops.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum", out_dtype=torch.float32)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def apply_fastnets(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                   cross_entropy: bool = True) -> dict:
    """Put fastnets kernels into a transformers model in place, sharing its parameters:

    - attention: attn_implementation "fastnets" (registered on first use);
    - norms: LayerNorm -> fastnets.nn.LayerNorm; *RMSNorm modules (Llama, Mistral, Qwen;
      Gemma's 1 + weight convention) -> fastnets rms_norm;
    - mlp: gated MLPs (gate_proj / up_proj / down_proj with SiLU or GELU) as one GEMM + a
      fused SwiGLU / GeGLU; GPT-2's MLP and BERT's intermediate with a fused bias + GELU;
    - cross_entropy: the causal-LM / masked-LM loss on fastnets' cross-entropy.
    Returns {what: [module names]} for what was patched.
    """
    _transformers()
    from .. import swap
    done: dict = {"attention": [], "norms": [], "mlp": [], "cross_entropy": []}
    if attention:
        register()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
        else:
            for m in model.modules():
                if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                    m.config._attn_implementation = NAME
        done["attention"].append(NAME)
    if norms:
        done["norms"] += [name for name, _, _ in swap(model, include=[nn.LayerNorm], fuse=False).replaced]
    for name, m in model.named_modules():
        cls = type(m).__name__
        if norms and cls.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter):
            m._fastnets_offset = 1.0 if cls.startswith("Gemma") else 0.0
            m.forward = types.MethodType(_rms_forward, m)
            done["norms"].append(name)
        elif mlp and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")) and hasattr(m, "act_fn"):
            act = _act_name(m.act_fn)
            if act in ("silu", "gelu", "gelu_tanh"):
                m._fastnets_act = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}[act]
                m.forward = types.MethodType(_gated_mlp_forward, m)
                done["mlp"].append(name)
        elif mlp and cls == "GPT2MLP" and _act_name(m.act) == "gelu_tanh":
            m.forward = types.MethodType(_gpt2_mlp_forward, m)
            done["mlp"].append(name)
        elif mlp and cls == "BertIntermediate" and _act_name(m.intermediate_act_fn) in ("gelu", "gelu_tanh"):
            m._fastnets_act = _act_name(m.intermediate_act_fn)
            m.forward = types.MethodType(_bert_intermediate_forward, m)
            done["mlp"].append(name)
    if cross_entropy and hasattr(type(model), "loss_function"):
        cls = type(model).__name__
        if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
            model.loss_function = causal_lm_loss
            done["cross_entropy"].append("ForCausalLM")
        elif cls.endswith("ForMaskedLM"):
            model.loss_function = masked_lm_loss
            done["cross_entropy"].append("ForMaskedLM")
    return done
