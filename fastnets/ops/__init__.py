"""fastnets' functional API. Where torch.nn.functional has the op, the signature is the
same (fastnets-only options are extra keyword arguments)."""
from .activation import bias_act
from .conv import conv1d, conv2d, conv_transpose2d
from .norm import group_norm, layer_norm, rms_norm

__all__ = ["bias_act", "group_norm", "layer_norm", "rms_norm"]
