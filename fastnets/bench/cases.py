"""Benchmark cases per op family, each against torch eager, torch.compile of the same torch
code, and Liger-Kernel where installed. The byte formulas are the minimal traffic."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .cnn_cases import bn_pool_cases, conv_cases, resnet50_cases
from .diffusion_cases import diffusion_cases
from .clip_cases import clip_cases, contrastive_cases
from .gan_cases import gan_cases, vae_cases
from .harness import Case, dtype_size, peers
from .rnn_cases import rnn_cases
from .transformer_cases import (attention_cases, cross_entropy_cases, decode_cases, gpt2_cases,
                                linear_cross_entropy_cases, rope_cases)


def _liger():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        return LigerLayerNormFunction, LigerRMSNormFunction
    except Exception:  # not installed, or built for another triton
        return None


def _torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _torch_rms_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def norm_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
        rows = 4096 if quick else 8192
        widths = (1024, 4096) if quick else (1024, 2048, 4096, 8192)
        gn_shapes = [(16, 128, 64, 64)] if quick else [(16, 128, 64, 64), (16, 256, 32, 32), (16, 512, 16, 16),
                                                      (2, 320, 64, 64)]
    else:
        dtypes, rows, widths, gn_shapes = (torch.float32,), 16, (64, 256), [(2, 8, 8, 8)]
    liger = _liger() if cuda else None
    cases = []
    for dtype in dtypes:
        es = dtype_size(dtype)
        for n in widths:
            def ln_inputs(dev, n=n, dtype=dtype):
                mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, requires_grad=True)  # noqa: E731
                return mk(rows, n), mk(n), mk(n)

            def rms_inputs(dev, n=n, dtype=dtype):
                mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, requires_grad=True)  # noqa: E731
                return mk(rows, n), mk(n)

            # fwd: read x, write y; bwd: read x and dy, write dx. Weights and the 8 B/row of
            # statistics are under 0.2% at these sizes and left out.
            fwd, bwd = 2 * rows * n * es, 3 * rows * n * es
            impls = {"fastnets": lambda x, w, b: ops.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                     **peers(_torch_layer_norm, device)}
            if liger:
                impls["liger"] = lambda x, w, b: liger[0].apply(x, w, b, 1e-5)
            cases.append(Case("norm", "layer_norm", f"{rows}x{n}", n, dtype, ln_inputs, impls, fwd, bwd))
            impls = {"fastnets": lambda x, w: ops.rms_norm(x, (x.shape[-1],), w, 1e-6),
                     **peers(_torch_rms_norm, device)}
            if liger:
                impls["liger"] = lambda x, w: liger[1].apply(x, w, 1e-6, 0.0, "llama", False)
            cases.append(Case("norm", "rms_norm", f"{rows}x{n}", n, dtype, rms_inputs, impls, fwd, bwd))
        for shape in gn_shapes:
            B, C = shape[:2]

            def gn_inputs(dev, shape=shape, dtype=dtype, C=C):
                return (torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True),
                        torch.randn(C, device=dev, dtype=dtype, requires_grad=True),
                        torch.randn(C, device=dev, dtype=dtype, requires_grad=True))

            numel = 1
            for s in shape:
                numel *= s
            groups = min(32, C)
            impls = {"fastnets": lambda x, w, b, g=groups: ops.group_norm(x, g, w, b, 1e-5, activation="silu"),
                     **peers(lambda x, w, b, g=groups: F.silu(F.group_norm(x, g, w, b, 1e-5)), device)}
            label = "x".join(map(str, shape))
            cases.append(Case("norm", "group_norm_silu", label, numel, dtype, gn_inputs, impls,
                              2 * numel * es, 3 * numel * es))
    return cases


def activation_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    if cuda:
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
        rows = 8192
        widths = (4096,) if quick else (1024, 4096, 8192)
    else:
        dtypes, rows, widths = (torch.float32,), 16, (64, 256)
    cases = []
    for dtype in dtypes:
        es = dtype_size(dtype)
        for c in widths:
            for act, torch_fn in (("gelu", lambda x, b: F.gelu(x + b)), ("silu", lambda x, b: F.silu(x + b))):
                def inputs(dev, c=c, dtype=dtype):
                    return (torch.randn(rows, c, device=dev, dtype=dtype, requires_grad=True),
                            torch.randn(c, device=dev, dtype=dtype, requires_grad=True))
                impls = {"fastnets": lambda x, b, a=act: ops.bias_act(x, b, a), **peers(torch_fn, device)}
                # fwd: read x, write y; bwd: read x and dy, write dx (dbias partials are tiny).
                cases.append(Case("activation", f"bias_act_{act}", f"{rows}x{c}", c, dtype, inputs, impls,
                                  2 * rows * c * es, 3 * rows * c * es))
            h = c // 2

            def gated_inputs(dev, c=c, dtype=dtype):
                return (torch.randn(rows, c, device=dev, dtype=dtype, requires_grad=True),
                        torch.randn(c, device=dev, dtype=dtype, requires_grad=True))

            def torch_swiglu(x, b):
                gate, up = (x + b).chunk(2, dim=-1)
                return F.silu(gate) * up

            impls = {"fastnets": lambda x, b: ops.bias_act(x, b, "swiglu"), **peers(torch_swiglu, device)}
            # fwd: read (rows, 2h), write (rows, h); bwd: read x and dy, write dx (rows, 2h).
            cases.append(Case("activation", "bias_act_swiglu", f"{rows}x{c}", c, dtype, gated_inputs, impls,
                              (rows * c + rows * h) * es, (2 * rows * c + rows * h) * es))
    if cuda:
        from .. import _ext
        if _ext.status()[0]:
            for case in cases:
                if case.op in ("bias_act_gelu", "bias_act_silu", "bias_act_swiglu"):
                    act = case.op.split("_")[-1]
                    case.impls["fastnets-cuda"] = _cuda_impl(act)
    return cases


def _cuda_impl(act):
    from .. import backend

    def fn(x, b):
        with backend("cuda"):
            return ops.bias_act(x, b, act)
    return fn


def model_cases(device: torch.device, quick: bool) -> list[Case]:
    return resnet50_cases(device, quick) + gpt2_cases(device, quick)


FAMILIES = {"norm": norm_cases, "activation": activation_cases, "conv": conv_cases, "bn_pool": bn_pool_cases,
            "attention": attention_cases, "decode": decode_cases, "rope": rope_cases,
            "cross_entropy": cross_entropy_cases, "lm_head": linear_cross_entropy_cases, "rnn": rnn_cases,
            "diffusion": diffusion_cases, "gan": gan_cases, "vae": vae_cases,
            "contrastive": contrastive_cases, "clip": clip_cases, "model": model_cases}
