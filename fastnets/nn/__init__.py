"""Drop-in modules: same constructor arguments, attributes and state_dict keys as the
torch.nn classes they replace (each subclasses it), forward through fastnets.ops."""
from . import conv
from .attention import (CrossEntropyLoss, MultiheadAttention, TransformerDecoderLayer,
                        TransformerEncoderLayer)
from .conv import (AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, BatchNorm2d, Conv1d, Conv2d, ConvTranspose2d,
                   MaxPool2d, ReLU, conv_bn_act)
from .norm import GroupNorm, LayerNorm, RMSNorm

__all__ = ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "AvgPool2d", "BatchNorm2d", "Conv1d", "Conv2d", "ConvTranspose2d",
           "CrossEntropyLoss", "GroupNorm", "LayerNorm", "MaxPool2d", "MultiheadAttention", "RMSNorm", "ReLU",
           "TransformerDecoderLayer", "TransformerEncoderLayer", "conv", "conv_bn_act"]
