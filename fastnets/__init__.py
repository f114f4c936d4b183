"""fastnets: fused Triton / CUDA kernels for PyTorch models.

    import fastnets
    y = fastnets.ops.layer_norm(x, (d,), w, b)      # functional, like torch.nn.functional
    norm = fastnets.nn.LayerNorm(d)                 # drop-in modules, like torch.nn
    report = fastnets.swap(model)                   # put fast modules into any model
    with fastnets.backend("torch"): ...             # force a backend
    fastnets.backend_report()                       # which backend each op uses, and why

Importing fastnets imports torch only: no triton, no GPU query, no compilation.
"""
from . import _config  # noqa: F401  (applies FASTNETS_BACKEND=interpret before triton loads)
from . import diffusion, models, nn, ops, reference
from ._dispatch import backend, backend_report
from .fusion import fuse_conv_bn
from .swap import RULES, Rule, SwapReport, register_rule, swap, unswap
from . import integrations  # noqa: E402,F401  (adds the transformers swap rules; imports no transformers)

__version__ = "0.1.0"
__all__ = ["RULES", "Rule", "SwapReport", "register_rule", "backend", "backend_report", "diffusion", "fuse_conv_bn", "models", "nn", "ops", "reference",
           "swap", "unswap"]
