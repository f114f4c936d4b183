"""What share of a model's work runs on fastnets kernels: every aten and fastnets op a forward
and backward dispatch, recorded by a TorchDispatchMode, with the bytes it reads and writes and,
for convolutions and attention, its FLOPs, grouped by the categories fastnets claims.

A fastnets custom op (torch.ops.fastnets.*) is seen as one call; the aten ops it runs inside
are not (a dispatch mode is off while it handles a call), so nothing is counted twice."""
from __future__ import annotations

import collections
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# aten op name (overload packet) -> category
_ATEN = {}
for names, category in (
        (("convolution", "convolution_backward", "_convolution", "mkldnn_convolution", "cudnn_convolution",
          "conv_depthwise2d", "_slow_conv2d_forward", "_slow_conv2d_backward", "slow_conv_transpose2d"), "convolution"),
        (("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
          "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
          "_softmax", "_softmax_backward_data", "_safe_softmax"), "attention"),
        (("native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward",
          "native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
          "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "batch_norm_backward",
          "_fused_rms_norm", "_fused_rms_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward"), "norm"),
        (("max_pool2d_with_indices", "max_pool2d_with_indices_backward", "avg_pool2d", "avg_pool2d_backward",
          "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "adaptive_max_pool2d",
          "adaptive_max_pool2d_backward", "max_pool2d"), "pooling"),
        (("lstm", "gru", "rnn_tanh", "rnn_relu", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "mkldnn_rnn_layer",
          "mkldnn_rnn_layer_backward", "_cudnn_rnn", "_cudnn_rnn_backward"), "recurrent"),
        (("relu", "relu_", "threshold_backward", "gelu", "gelu_backward", "silu", "silu_", "silu_backward",
          "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "leaky_relu", "leaky_relu_backward", "hardswish",
          "hardswish_", "hardswish_backward", "hardsigmoid", "hardsigmoid_", "hardsigmoid_backward", "hardtanh",
          "hardtanh_", "hardtanh_backward", "elu", "elu_backward", "mish", "mish_backward"), "activation"),
        (("nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward", "_log_softmax",
          "_log_softmax_backward_data"), "loss")):
    for n in names:
        _ATEN[n] = category

_FASTNETS = {"conv2d_fwd": "convolution", "conv2d_bwd": "convolution", "conv_transpose2d_fwd": "convolution",
             "conv_transpose2d_bwd": "convolution", "flash_attn_fwd": "attention", "flash_attn_bwd": "attention",
             "batch_norm_fwd": "norm", "batch_norm_bwd": "norm", "row_norm_fwd": "norm", "row_norm_bwd": "norm",
             "group_norm_fwd": "norm", "group_norm_bwd": "norm", "pool2d_fwd": "pooling", "pool2d_bwd": "pooling",
             "rnn_recurrence": "recurrent", "rnn_recurrence_bwd": "recurrent", "bias_act_fwd": "activation",
             "bias_act_bwd": "activation", "cross_entropy_fwd": "loss", "cross_entropy_bwd": "loss",
             "cross_entropy_fwd_grad_": "loss", "clip_loss_stats": "loss", "clip_loss_bwd": "loss"}


def _tensors(tree):
    out = []
    for x in torch.utils._pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            out.append(x)
    return out


def _bytes(args, kwargs, out) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors((args, kwargs, out)))


def _conv_flops(x, w, out) -> int:
    # 2 * output elements * (input channels per group * kernel taps)
    return 2 * out.numel() * (w.shape[1] * math.prod(w.shape[2:]))


def _fastnets_flops(name, args, out) -> int:
    if name == "conv2d_fwd":
        return _conv_flops(args[0], args[1], out[0])
    if name == "conv2d_bwd":   # dx and dw: each the forward's count
        dy, w = args[0], args[2]
        return 2 * _conv_flops(None, w, dy)
    if name in ("flash_attn_fwd", "flash_attn_bwd"):
        q, k = args[0], args[1]
        if q.dim() == 4:
            b, h, sq, d = q.shape
            sk = k.shape[2]
            n = 4 * b * h * sq * sk * d
            return n if name == "flash_attn_fwd" else int(2.5 * n)
    return 0


class WorkCounter(TorchDispatchMode):
    """with WorkCounter() as c: ...; c.bytes[(category, "fastnets" | "torch")], c.flops[...]."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.flops = collections.Counter()
        self.torch_ops = collections.Counter()   # (category, aten op) -> bytes left on torch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns, name = func.namespace, func.__name__.split(".")[0]
        if ns == "fastnets" and name in _FASTNETS:
            category, who = _FASTNETS[name], "fastnets"
            flops = _fastnets_flops(name, args, out)
        elif ns == "aten" and name in _ATEN:
            category, who = _ATEN[name], "torch"
            packet = func.overloadpacket
            flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        else:
            return out
        size = _bytes(args, kwargs, out)
        self.bytes[(category, who)] += size
        self.flops[(category, who)] += int(flops)
        if who == "torch":
            self.torch_ops[(category, name)] += size
        return out

    def share(self, what: str = "bytes") -> float:
        table = self.bytes if what == "bytes" else self.flops
        ours = sum(v for (c, who), v in table.items() if who == "fastnets")
        total = sum(table.values())
        return 1.0 if total == 0 else ours / total

    def summary(self) -> str:
        return (f"fastnets share: {self.share('bytes'):.1%} of bytes, {self.share('flops'):.1%} of FLOPs; left on "
                f"torch: {dict(self.torch_ops.most_common(8))}")
