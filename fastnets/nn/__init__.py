"""Drop-in modules, one file per kernel family: same constructor arguments, attributes and
state_dict keys as the torch.nn classes they replace (each subclasses it), forward
through fastnets.ops."""
from .activation import GELU, FoldedReLU, LeakyReLU, ReLU, Sigmoid, SiLU, Tanh, fused_activation_name
from .attention import MultiheadAttention
from .batchnorm import BatchNorm2d, FoldedBatchNorm2d
from .conv import Conv1d, Conv2d, ConvTranspose2d, FusedConv2d, conv_bn_act
from .loss import ClipLoss, CrossEntropyLoss, SigLipLoss
from .norm import GroupNorm, LayerNorm, RMSNorm
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .pool import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d
from .transformer import TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer

__all__ = ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "AvgPool2d", "BatchNorm2d", "ClipLoss", "Conv1d", "Conv2d", "ConvTranspose2d",
           "CrossEntropyLoss", "FoldedBatchNorm2d", "FoldedReLU", "FusedConv2d", "GELU", "GRU", "GRUCell", "GroupNorm", "LSTM", "LSTMCell", "LayerNorm", "LeakyReLU", "MaxPool2d",
           "MultiheadAttention", "RMSNorm", "RNN", "RNNCell", "ReLU", "SiLU", "SigLipLoss", "Sigmoid", "Tanh", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer",
           "conv_bn_act", "fused_activation_name"]
