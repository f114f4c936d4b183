"""fastnets' functional API. Where torch.nn.functional has the op, the signature is the
same (fastnets-only options are extra keyword arguments)."""
from .activation import bias_act
from .attention import flash_attention, scaled_dot_product_attention
from .batchnorm import batch_norm, fold_conv_bn
from .contrastive import clip_loss, gather_with_grad, zero_shot_logits
from .conv import conv1d, conv2d, conv_transpose2d, patch_embed
from .diffusion import q_sample, sampler_step, timestep_embedding
from .gan import gan_loss, gradient_penalty
from .loss import cross_entropy, linear_cross_entropy
from .norm import group_norm, layer_norm, rms_norm
from .rope import apply_rotary_emb, rope, rope_cos_sin
from .rnn import gru, gru_cell, lstm, lstm_cell, rnn, rnn_relu, rnn_relu_cell, rnn_tanh, rnn_tanh_cell
from .pool import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d
from .upfirdn import filtered_lrelu, upfirdn2d
from .vae import gaussian_sample_kl

__all__ = ["adaptive_avg_pool2d", "adaptive_max_pool2d", "apply_rotary_emb", "avg_pool2d", "batch_norm", "bias_act",
           "clip_loss", "conv1d", "conv2d", "conv_transpose2d", "cross_entropy", "q_sample", "sampler_step", "timestep_embedding", "flash_attention", "filtered_lrelu", "fold_conv_bn", "gan_loss", "gather_with_grad", "gaussian_sample_kl", "gradient_penalty", "group_norm",
           "layer_norm", "linear_cross_entropy", "gru", "gru_cell", "lstm", "lstm_cell", "max_pool2d", "patch_embed", "rms_norm", "rnn", "rnn_relu",
           "rnn_relu_cell", "rnn_tanh", "rnn_tanh_cell", "rope", "rope_cos_sin",
           "scaled_dot_product_attention", "upfirdn2d", "zero_shot_logits"]
