"""TransformerEncoderLayer, TransformerDecoderLayer and TransformerEncoder on fastnets
attention, LayerNorm and a fused bias + activation in the feed-forward block. Each
subclasses the torch class it replaces: same constructor, attributes and state_dict keys."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _dispatch, ops
from .activation import fused_activation_name
from .attention import MultiheadAttention
from .norm import LayerNorm


def _to_fast(layer: nn.Module) -> None:
    """Give a freshly constructed layer fastnets attention and norms, in place (the same
    Parameter objects: subclasses without extra state). swap() does this through its rules."""
    for child in layer.children():
        if type(child) is nn.MultiheadAttention:
            child.__class__ = MultiheadAttention
        elif type(child) is nn.LayerNorm:
            child.__class__ = LayerNorm


class _FeedForward:
    def _ff_block(self, x: Tensor) -> Tensor:
        act = fused_activation_name(self.activation)
        if act is None:
            h = self.activation(self.linear1(x))
        else:
            # linear1's bias and the activation in one kernel after a bias-free GEMM.
            h = ops.bias_act(F.linear(x, self.linear1.weight), self.linear1.bias, act)
        return self.dropout2(self.linear2(self.dropout(h)))


class TransformerEncoderLayer(_FeedForward, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fastnets attention, LayerNorm and a fused
    bias + activation in the feed-forward block. Same arguments; torch's fused inference
    path (``torch._transformer_encoder_layer_fwd`` and nested tensors) is not used:
    fastnets.nn.TransformerEncoder hands its layers padded tensors and the padding mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _to_fast(self)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            # Only a torch.nn.TransformerEncoder (not swapped) hands over nested tensors.
            _dispatch.fallback("scaled_dot_product_attention", "a nested-tensor input to TransformerEncoderLayer "
                               "(torch.nn.TransformerEncoder's inference path) runs torch's fused layer; swap() the "
                               "encoder too, or build it from fastnets.nn.TransformerEncoder")
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(_FeedForward, nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fastnets attention (self and cross), LayerNorm
    and a fused bias + activation in the feed-forward block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _to_fast(self)


def _set_use_nested_tensor(self, value) -> None:
    self.__dict__["use_nested_tensor"] = value


class TransformerEncoder(nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` whose layers always get padded tensors and the padding
    mask, so fastnets attention runs where torch would switch to nested tensors and its own
    fused layer (eval mode, a src_key_padding_mask, no autograd recording). The result is
    torch's in both cases: where torch would have nested, padded positions come out as zeros
    (before the final norm), as torch's to_padded_tensor(0) gives them."""

    # A data descriptor wins over the instance attribute torch's __init__ sets, so torch's
    # forward never sees True; the instance keeps its value for when the class is reverted.
    use_nested_tensor = property(lambda self: False, _set_use_nested_tensor)

    def _torch_would_nest(self, src: Tensor, mask: Optional[Tensor], padding: Optional[Tensor]) -> bool:
        """torch.nn.TransformerEncoder.forward's conditions for its nested-tensor path."""
        first = self.layers[0] if len(self.layers) else None
        if (first is None or not self.__dict__.get("use_nested_tensor", False) or first.training or src.dim() != 3
                or padding is None or mask is not None or src.is_nested or torch.is_autocast_enabled()
                or not torch.backends.mha.get_fastpath_enabled()):
            return False
        if getattr(self, "mask_check", True) and (torch.compiler.is_compiling() or not
                                                  torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not())):
            return False
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())):
            return False
        return True

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        zero_padded = self._torch_would_nest(src, mask, src_key_padding_mask)
        batch_first = self.layers[0].self_attn.batch_first if len(self.layers) else True
        seq_len = src.shape[1 if batch_first else 0] if src.dim() == 3 else src.shape[0]
        is_causal = nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if zero_padded:
            pad = src_key_padding_mask != 0     # canonical float mask: -inf where padded
            output = output.masked_fill((pad if batch_first else pad.t()).unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output
