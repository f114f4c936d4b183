"""Plain-PyTorch implementations of every fastnets op: the ground truth of the tests and
the fallback for CPU tensors. Each computes in float32 (float64 for float64 input), like
the kernels, and returns the input's dtype. Autograd differentiates them directly."""
from .activation import bias_act
from .attention import attention, scaled_dot_product_attention, varlen_attention
from .batchnorm import batch_norm
from .conv import conv1d, conv2d, conv_transpose2d
from .loss import cross_entropy, linear_cross_entropy
from .norm import group_norm, layer_norm, rms_norm
from .rope import apply_rotary_emb, rope_cos_sin
from . import contrastive, diffusion, gan, rnn, upfirdn, vae
from .pool import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d

__all__ = ["adaptive_avg_pool2d", "adaptive_max_pool2d", "apply_rotary_emb", "attention", "avg_pool2d", "batch_norm",
           "bias_act", "contrastive", "conv1d", "conv2d", "conv_transpose2d", "cross_entropy", "diffusion", "gan", "group_norm", "layer_norm",
           "linear_cross_entropy", "max_pool2d", "rms_norm", "rnn", "rope_cos_sin", "scaled_dot_product_attention",
           "upfirdn", "vae", "varlen_attention"]
