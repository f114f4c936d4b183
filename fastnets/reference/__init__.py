"""Plain-PyTorch implementations of every fastnets op: the ground truth of the tests and
the fallback for CPU tensors. Each computes in float32 (float64 for float64 input), like
the kernels, and returns the input's dtype. Autograd differentiates them directly."""
from .activation import bias_act
from .conv import conv1d, conv2d, conv_transpose2d
from .norm import group_norm, layer_norm, rms_norm

__all__ = ["bias_act", "group_norm", "layer_norm", "rms_norm"]
